"""The realtime dialects, each driven by its real client: the ``openai`` SDK's
``client.realtime.connect`` (GA transcription sessions), raw websockets for OpenAI's beta
shape, and the ``mistralai`` SDK's ``transcribe_stream``. Every turn's final text must equal
offline ``transcribe`` of the same samples, written as a file at the client's rate."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")
websockets = pytest.importorskip("websockets")
mistralai = pytest.importorskip("mistralai")

import mlx_voxtral  # noqa: E402
from mlx_voxtral.server.app import create_app  # noqa: E402
from mlx_voxtral.server.realtime.core import AudioFormat  # noqa: E402

from serving import Served  # noqa: E402


def resampled(src, path, rate: int, *effects: str):
    """``src`` as a mono file at ``rate`` (sox), e.g. PCM16 or u-law (``-e u-law``)."""
    subprocess.run(["sox", str(src), "-r", str(rate), "-c", "1", *effects, str(path)], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def clips(speech_5s, speech_stereo_44k, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("live")
    return {
        "a24": resampled(speech_5s, folder / "a24.wav", 24000, "-b", "16"),
        "b24": resampled(speech_stereo_44k, folder / "b24.wav", 24000, "-b", "16"),
        "a16": resampled(speech_5s, folder / "a16.wav", 16000, "-b", "16"),
        "ulaw": resampled(speech_5s, folder / "ulaw.wav", 8000, "-e", "u-law"),
        "alaw": resampled(speech_5s, folder / "alaw.wav", 8000, "-e", "a-law"),
    }


def raw(path) -> bytes:
    """The sample bytes of a wav file (its ``data`` chunk), as a client would send them."""
    data = open(path, "rb").read()
    i = 12
    while i + 8 <= len(data):
        size = int.from_bytes(data[i + 4:i + 8], "little")
        if data[i:i + 4] == b"data":
            return data[i + 8:i + 8 + size]
        i += 8 + size + (size & 1)
    raise AssertionError(f"no data chunk in {path}")


@pytest.fixture(scope="module")
def live(fp32):
    served = Served(create_app(fp32, model_name="default"))
    yield served
    served.close()


def chunks(data: bytes, size: int):
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_g711_decoding_matches_libsndfile(clips):
    for name, encoding in (("ulaw", "pcm_mulaw"), ("alaw", "pcm_alaw")):
        want, rate = sf.read(str(clips[name]), dtype="float32")
        assert rate == 8000
        assert np.array_equal(AudioFormat(encoding, 8000).decode(raw(clips[name])), want), name


# OpenAI GA, through the official SDK --------------------------------------------------------
async def openai_turns(live, turns: list[bytes], session: dict) -> tuple[list, dict]:
    """One GA transcription session, a turn per item of ``turns``; its events by type."""
    client = openai.AsyncOpenAI(api_key="unused", base_url=live.url + "/v1")
    events: list = []
    async with client.realtime.connect(model="default") as conn:
        assert (await conn.recv()).type == "session.created"
        await conn.session.update(session=session)
        updated = await conn.recv()
        assert updated.type == "session.updated", updated
        for audio in turns:
            for piece in chunks(audio, 4800):  # 100 ms at 24 kHz
                await conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
            await conn.input_audio_buffer.commit()
            while True:
                event = await conn.recv()
                events.append(event)
                if event.type == "conversation.item.done":
                    break
                assert event.type != "error", event
    return events, updated


def test_openai_client_turns_equal_offline(live, fp32, clips):
    """24 kHz PCM16, delay "high" (960 ms), two turns on one connection."""
    session = {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None,
        "transcription": {"model": "default", "delay": "high"}}}}
    events, updated = asyncio.run(openai_turns(live, [raw(clips["a24"]), raw(clips["b24"])], session))
    assert updated.session.audio.input.format.rate == 24000
    items = [e.item_id for e in events if e.type == "input_audio_buffer.committed"]
    assert len(items) == 2 and len(set(items)) == 2
    for item, clip in zip(items, ("a24", "b24")):
        want = mlx_voxtral.transcribe(fp32, clips[clip], delay_ms=960)
        mine = [e for e in events if getattr(e, "item_id", None) == item or getattr(
            getattr(e, "item", None), "id", None) == item]
        kinds = [e.type for e in mine]
        assert kinds[0] == "input_audio_buffer.committed" and kinds[-1] == "conversation.item.done", kinds
        assert "conversation.item.added" in kinds
        deltas = [e.delta for e in mine if e.type == "conversation.item.input_audio_transcription.delta"]
        done = next(e for e in mine if e.type == "conversation.item.input_audio_transcription.completed")
        assert done.transcript == want.text == "".join(deltas)
        assert all(deltas)
        assert done.usage.output_tokens == len(want.token_ids)
        segments = [e for e in mine if e.type == "conversation.item.input_audio_transcription.segment"]
        assert [s.text for s in segments] == [s.text for s in want.segments]
        assert mine[-1].item.content[0].transcript == want.text


def test_openai_errors_and_clear(live, fp32, clips):
    """Bad options are error events with OpenAI's fields, and the session goes on; clear drops
    the turn's audio."""
    async def run():
        client = openai.AsyncOpenAI(api_key="unused", base_url=live.url + "/v1")
        errors = []
        async with client.realtime.connect(model="default") as conn:
            assert (await conn.recv()).type == "session.created"
            bad = [
                {"type": "realtime"},
                {"type": "transcription", "audio": {"input": {"format": {"type": "audio/flac"}}}},
                {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 1}}}},
                {"type": "transcription", "audio": {"input": {"transcription": {"delay": "eventually"}}}},
                {"type": "transcription", "audio": {"input": {"transcription": {"delay_ms": 100}}}},
                {"type": "transcription", "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
            ]
            for session in bad:
                await conn.session.update(session=session, event_id="evt_client")
                errors.append(await conn.recv())
            await conn.input_audio_buffer.commit()
            errors.append(await conn.recv())
            await conn.session.update(session={"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 16000}}}})
            assert (await conn.recv()).type == "session.updated"
            await conn.input_audio_buffer.append(audio=base64.b64encode(b"\x01\x02" * 4000).decode())
            await conn.input_audio_buffer.clear()
            assert (await conn.recv()).type == "input_audio_buffer.cleared"
            for piece in chunks(raw(clips["a16"]), 3200):
                await conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
            await conn.input_audio_buffer.commit()
            while (event := await conn.recv()).type != "conversation.item.input_audio_transcription.completed":
                assert event.type != "error", event
        return errors, event

    errors, done = asyncio.run(run())
    assert [e.type for e in errors] == ["error"] * 7
    params = [e.error.param for e in errors]
    assert params[:6] == ["session.type", "session.audio.input.format.type", "session.audio.input.format.rate",
                          "session.audio.input.transcription.delay", "session.audio.input.transcription.delay_ms",
                          "session.audio.input.turn_detection"]
    assert errors[0].error.event_id == "evt_client"
    assert errors[6].error.code == "input_audio_buffer_commit_empty"
    assert all(e.error.message and e.error.type == "invalid_request_error" for e in errors)
    assert done.transcript == mlx_voxtral.transcribe(fp32, clips["a16"]).text  # only what followed the clear


# OpenAI beta shape, raw websockets ------------------------------------------------------------
def test_openai_beta_shape_g711(live, fp32, clips):
    """``transcription_session.update`` with ``g711_ulaw`` (8 kHz) and an explicit delay."""
    async def run():
        async with websockets.connect(live.ws_url + "/v1/realtime?intent=transcription") as ws:
            created = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "transcription_session.update", "session": {
                "input_audio_format": "g711_ulaw", "input_audio_transcription": {"model": "x", "delay_ms": 240},
                "turn_detection": None}}))
            updated = json.loads(await ws.recv())
            for piece in chunks(raw(clips["ulaw"]), 800):
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(piece).decode()}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            events = []
            while not events or events[-1]["type"] != "conversation.item.input_audio_transcription.completed":
                events.append(json.loads(await ws.recv()))
            return created, updated, events

    created, updated, events = asyncio.run(run())
    assert created["type"] == "session.created" and created["session"]["audio"]["input"]["format"]["rate"] == 24000
    assert updated["type"] == "transcription_session.updated"
    assert updated["session"]["input_audio_format"] == "g711_ulaw"
    assert updated["session"]["input_audio_transcription"]["delay_ms"] == 240
    kinds = [e["type"] for e in events]
    assert "input_audio_buffer.committed" in kinds and "conversation.item.created" in kinds
    want = mlx_voxtral.transcribe(fp32, clips["ulaw"], delay_ms=240)
    deltas = [e["delta"] for e in events if e["type"].endswith(".delta")]
    assert events[-1]["transcript"] == want.text == "".join(deltas)


# Mistral, through the official SDK ---------------------------------------------------------
async def mistral_stream(live, audio: bytes, rate: int, delay_ms=None, encoding="pcm_s16le") -> list:
    from mistralai.client import Mistral
    from mistralai.client.models import AudioFormat as MistralFormat

    async def source():
        for piece in chunks(audio, rate // 5):
            yield piece

    client = Mistral(api_key="unused")
    return [e async for e in client.audio.realtime.transcribe_stream(
        source(), model="default", audio_format=MistralFormat(encoding=encoding, sample_rate=rate),
        target_streaming_delay_ms=delay_ms, server_url=live.url)]


@pytest.mark.parametrize("clip, rate, delay", [("a16", 16000, 240), ("a24", 24000, None)])
def test_mistral_client_equals_offline(live, fp32, clips, clip, rate, delay):
    events = asyncio.run(mistral_stream(live, raw(clips[clip]), rate, delay))
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RealtimeTranscriptionSessionCreated" and kinds[1] == "RealtimeTranscriptionSessionUpdated"
    assert events[1].session.audio_format.sample_rate == rate
    assert events[1].session.target_streaming_delay_ms == (delay or 480)
    done = events[-1]
    assert type(done).__name__ == "TranscriptionStreamDone", kinds
    want = mlx_voxtral.transcribe(fp32, clips[clip], delay_ms=delay)
    deltas = [e.text for e in events if type(e).__name__ == "TranscriptionStreamTextDelta"]
    assert done.text == want.text == "".join(deltas) and all(deltas)
    segments = [e for e in events if type(e).__name__ == "TranscriptionStreamSegmentDelta"]
    assert [(s.text, s.start, s.end) for s in segments] == [(s.text, round(s.start, 3), round(s.end, 3))
                                                             for s in want.segments]
    assert [s.text for s in done.segments] == [s.text for s in want.segments]
    assert done.usage.completion_tokens == len(want.token_ids)


def test_mistral_errors(live, clips):
    from mistralai.client.models import RealtimeTranscriptionError

    events = asyncio.run(mistral_stream(live, raw(clips["a16"]), 16000, delay_ms=100))
    assert isinstance(events[-1], RealtimeTranscriptionError)
    assert "delay" in str(events[-1].error.message) and events[-1].error.code == 400

    async def raw_errors():  # what the SDK's own validation would not send
        async with websockets.connect(live.ws_url + "/v1/audio/transcriptions/realtime?model=x") as ws:
            assert json.loads(await ws.recv())["session"]["model"] == "x"
            errors = []
            for event in ({"type": "input_audio.rewind"},
                          {"type": "session.update", "session": {"audio_format": {"encoding": "pcm_s24le"}}},
                          {"type": "session.update", "session": {"audio_format": {"sample_rate": 1}}},
                          {"type": "input_audio.append", "audio": base64.b64encode(b"abc").decode()}):
                await ws.send(json.dumps(event))
                errors.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "input_audio.end"}))  # no turn: the server closes
            with pytest.raises(websockets.exceptions.ConnectionClosedOK):
                await ws.recv()
            return errors

    errors = asyncio.run(raw_errors())
    assert all(e["type"] == "error" and e["error"]["code"] == 400 for e in errors), errors
    assert ["rewind" in errors[0]["error"]["message"], "pcm_s24le" in errors[1]["error"]["message"],
            "sample rate" in errors[2]["error"]["message"], "whole number" in errors[3]["error"]["message"]] == [True] * 4


# server-side turn detection -------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_utterances(clips) -> np.ndarray:
    """16 kHz PCM16: speech, 3 s of silence, other speech, 1 s of silence."""
    a, _ = sf.read(str(clips["a16"]), dtype="int16")
    b, _ = sf.read(str(resampled(clips["b24"], clips["b24"].with_name("b16.wav"), 16000, "-b", "16")), dtype="int16")
    return np.concatenate([a, np.zeros(48000, np.int16), b, np.zeros(16000, np.int16)])


def test_openai_server_vad_turns_equal_offline(live, fp32, two_utterances):
    """With ``server_vad`` the server ends the turns itself; each turn's transcript is offline
    ``transcribe`` of exactly the samples between its ``audio_start_ms`` and ``audio_end_ms``,
    and the silence between them reaches no turn."""
    async def run():
        client = openai.AsyncOpenAI(api_key="unused", base_url=live.url + "/v1")
        events = []
        async with client.realtime.connect(model="default") as conn:
            assert (await conn.recv()).type == "session.created"
            await conn.session.update(session={"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 16000},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 900, "prefix_padding_ms": 300}}}})
            updated = await conn.recv()
            for piece in chunks(two_utterances.tobytes(), 3200):
                await conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
            while True:  # until every turn heard is done and no more come
                try:
                    events.append(await asyncio.wait_for(conn.recv(), 10))
                except asyncio.TimeoutError:
                    break
                assert events[-1].type != "error", [e.type for e in events]
        return updated, events

    updated, events = asyncio.run(run())
    assert updated.session.audio.input.turn_detection.type == "server_vad"
    started = [e for e in events if e.type == "input_audio_buffer.speech_started"]
    stopped = [e for e in events if e.type == "input_audio_buffer.speech_stopped"]
    assert len(started) == len(stopped) >= 2
    assert stopped[0].audio_end_ms < started[1].audio_start_ms  # the first turn ended in the gap
    for start, stop in zip(started, stopped):
        assert start.item_id == stop.item_id and start.audio_start_ms < stop.audio_end_ms
        audio = two_utterances[start.audio_start_ms * 16:stop.audio_end_ms * 16].astype(np.float32) / 32768
        done = next(e for e in events if e.type == "conversation.item.input_audio_transcription.completed"
                    and e.item_id == start.item_id)
        assert done.transcript == mlx_voxtral.transcribe(fp32, audio).text
    heard = sum(s.audio_end_ms - t.audio_start_ms for t, s in zip(started, stopped))
    assert heard < len(two_utterances) / 16 - 1500  # the gap, less padding and 0.9 s, was not decoded


def test_mistral_turn_detection(live, two_utterances):
    from mistralai.client import Mistral
    from mistralai.client.models import AudioFormat as MistralFormat

    async def run():
        client = Mistral(api_key="unused")
        kinds = []
        async with await client.audio.realtime.connect(
                model="default", audio_format=MistralFormat(encoding="pcm_s16le", sample_rate=16000),
                turn_detection={"min_silence_ms": 900}, server_url=live.url) as conn:
            for piece in chunks(two_utterances.tobytes(), 3200):
                await conn.send_audio(piece)
            await conn.end_audio()
            async for event in conn:
                kinds.append(getattr(event, "type", None))
        return kinds

    kinds = asyncio.run(run())
    assert kinds.count("turn.start") == kinds.count("turn.end") == kinds.count("transcription.done") >= 2, kinds


# dual delay ------------------------------------------------------------------------------------
def provisional_ok(texts: list, fast: str) -> bool:
    """Some provisional text came, and each is a piece of the fast delay's own text (no
    restart happens on this checkpoint, so the follower's text is the fast delay's alone)."""
    return any(texts) and all(t.strip() in fast for t in texts)


async def raw_session(url: str, update: dict, audio: bytes, append: str, end: dict, last: str) -> list:
    async with websockets.connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps(update))
        events = []
        for piece in chunks(audio, 3200):
            await ws.send(json.dumps({"type": append, "audio": base64.b64encode(piece).decode()}))
        await ws.send(json.dumps(end))
        while not events or events[-1]["type"] not in (last, "error"):
            events.append(json.loads(await ws.recv()))
        return events


def test_dual_delay_vllm_and_mistral(live, fp32, clips):
    """One encoder pass, two delays: the final text is the slow delay's, exactly; the
    provisional text comes from the fast one."""
    want = mlx_voxtral.transcribe(fp32, clips["a16"], delay_ms=720)
    fast = mlx_voxtral.transcribe(fp32, clips["a16"], delay_ms=160).text
    events = asyncio.run(raw_session(
        live.ws_url + "/v1/realtime", {"type": "session.update", "delay_ms": 720, "provisional_delay_ms": 160},
        raw(clips["a16"]), "input_audio_buffer.append", {"type": "input_audio_buffer.commit", "final": True},
        "transcription.done"))
    deltas = [e["delta"] for e in events if e["type"] == "transcription.delta"]
    assert events[-1]["type"] == "transcription.done" and events[-1]["text"] == want.text == "".join(deltas)
    assert provisional_ok([e["text"] for e in events if e["type"] == "transcription.provisional"], fast)

    events = asyncio.run(raw_session(
        live.ws_url + "/v1/audio/transcriptions/realtime",
        {"type": "session.update", "session": {"target_streaming_delay_ms": 720,
                                               "provisional_streaming_delay_ms": 160}},
        raw(clips["a16"]), "input_audio.append", {"type": "input_audio.end"}, "transcription.done"))
    assert events[0]["type"] == "session.updated" and events[0]["session"]["provisional_streaming_delay_ms"] == 160
    assert events[-1]["text"] == want.text
    assert provisional_ok([e["text"] for e in events if e["type"] == "transcription.text.provisional"], fast)


def test_dual_delay_openai_client(live, fp32, clips):
    session = {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None,
        "transcription": {"model": "default", "delay": "high", "provisional_delay": "minimal"}}}}
    events, updated = asyncio.run(openai_turns(live, [raw(clips["a24"])], session))
    assert updated.session.audio.input.transcription.provisional_delay_ms == 160
    want = mlx_voxtral.transcribe(fp32, clips["a24"], delay_ms=960)
    fast = mlx_voxtral.transcribe(fp32, clips["a24"], delay_ms=160).text
    done = next(e for e in events if e.type == "conversation.item.input_audio_transcription.completed")
    assert done.transcript == want.text
    provisional = [e for e in events if e.type == "conversation.item.input_audio_transcription.provisional"]
    assert provisional_ok([e.text for e in provisional], fast)
    assert {e.item_id for e in provisional} == {done.item_id}


def test_dual_delay_errors(live):
    async def run():
        async with websockets.connect(live.ws_url + "/v1/realtime") as ws:
            await ws.recv()
            errors = []
            for update in ({"provisional_delay_ms": 480}, {"delay_ms": 240, "provisional_delay_ms": 320},
                           {"provisional_delay_ms": 100}, {"provisional_delay_ms": "fast"}):
                await ws.send(json.dumps({"type": "session.update", **update}))
                errors.append(json.loads(await ws.recv()))
            return errors

    errors = asyncio.run(run())
    assert all(e["type"] == "error" and e["error"]["param"] == "provisional_delay_ms" for e in errors), errors
    assert "shorter than the delay (480 ms)" in errors[0]["error"]["message"]


# vLLM's dialect at the client's rate (the live page sends its microphone's) ------------------
def test_vllm_audio_format_at_the_device_rate(live, fp32, clips):
    """``audio_format`` in vLLM's session.update: 24 kHz PCM16 is resampled by the server and
    equals offline ``transcribe`` of the 24 kHz file; a bad format is an error event and the
    session keeps its previous settings."""
    async def run():
        async with websockets.connect(live.ws_url + "/v1/realtime", max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            errors = []
            for fmt in ("pcm", {"encoding": "pcm_s16le", "sample_rate": 1}, {"encoding": "mp3"}):
                await ws.send(json.dumps({"type": "session.update", "delay_ms": 960, "audio_format": fmt}))
                errors.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "session.update", "model": "default",
                                      "audio_format": {"encoding": "pcm_s16le", "sample_rate": 24000}}))
            for piece in chunks(raw(clips["a24"]), 4800):
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(piece).decode()}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
            deltas = []
            while (event := json.loads(await ws.recv()))["type"] != "transcription.done":
                assert event["type"] in ("transcription.delta", "transcription.word"), event
                if event["type"] == "transcription.delta":
                    deltas.append(event["delta"])
            return errors, deltas, event

    errors, deltas, done = asyncio.run(run())
    assert [e["error"]["param"] for e in errors] == ["audio_format"] * 3, errors
    assert "sample rate" in errors[1]["error"]["message"] and "mp3" in errors[2]["error"]["message"]
    want = mlx_voxtral.transcribe(fp32, clips["a24"])  # the default delay: the bad updates set nothing
    assert done["text"] == "".join(deltas) == want.text
