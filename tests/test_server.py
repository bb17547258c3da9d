"""The HTTP/WebSocket server end to end: a real uvicorn on loopback, the tiny checkpoint.

Every answer is compared with offline ``transcribe`` of the same audio (greedy decoding,
which the engine's batched decoding reproduces token for token).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("multipart")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
websockets = pytest.importorskip("websockets")

import soundfile as sf  # noqa: E402

import mlx_voxtral  # noqa: E402
from mlx_voxtral.audio import load_audio  # noqa: E402
from mlx_voxtral.audio_url import SourcePolicy  # noqa: E402
from mlx_voxtral.results import Failed, Finished  # noqa: E402
from mlx_voxtral.server.app import create_app  # noqa: E402
from mlx_voxtral.server.engine import Engine  # noqa: E402
from mlx_voxtral.writers import render  # noqa: E402

from serving import Served, b64, chat_body, data_url, realtime, write_wav  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "sekrit"
MAX_UPLOAD = 2 * 1024 * 1024
MAX_SECONDS = 20.0


@pytest.fixture(scope="module")
def clips(speech_5s, speech_40s, silence_2s, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("server_audio")
    speech = load_audio(speech_5s)
    long = load_audio(speech_40s)
    out = {"speech_5s": speech_5s, "silence_2s": silence_2s}
    for seconds in (0.5, 1.0, 1.5, 2.0):
        out[f"speech_{seconds}s"] = write_wav(folder / f"speech_{seconds}s.wav", speech[: int(seconds * 16000)])
    out["too_long"] = write_wav(folder / "too_long.wav", np.zeros(int((MAX_SECONDS + 5) * 8000), np.float32), 8000)
    out["long"] = write_wav(folder / "long.wav", np.concatenate([long] * 3))  # about 2 minutes
    allowed = folder / "allowed"
    allowed.mkdir()
    out["allowed"] = allowed
    write_wav(allowed / "inside.wav", speech[:16000])
    (allowed / "notes.txt").write_text("not audio\n" * 100)
    return out


CONCURRENT = ["silence_2s", "speech_0.5s", "speech_1.0s", "speech_1.5s", "speech_2.0s"]


@pytest.fixture(scope="module")
def refs(model_fp32, clips) -> dict:
    """Offline results, computed before any server thread touches the model."""
    out = {name: mlx_voxtral.transcribe(model_fp32, clips[name]) for name in CONCURRENT}
    out["seed"] = mlx_voxtral.transcribe(model_fp32, clips["speech_5s"], max_tokens=256)
    out["inside"] = mlx_voxtral.transcribe(model_fp32, clips["allowed"] / "inside.wav")
    pcm16 = np.round(np.clip(load_audio(clips["speech_5s"]), -1, 1) * 32767).astype(np.int16)
    out["pcm16_samples"] = pcm16
    out["pcm16"] = mlx_voxtral.transcribe(model_fp32, pcm16.astype(np.float32) / 32768.0)
    return out


@pytest.fixture(scope="module")
def engine(model_fp32, refs):
    engine = Engine(model_fp32, max_concurrency=16, max_queue=32, request_timeout=300)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine, clips):
    # port 1234 when free, so that the seed example runs with its own base_url
    policy = SourcePolicy(local_root=str(clips["allowed"]), allow_remote=False)
    app = create_app(engine, model_name="default", policy=policy, max_upload_bytes=MAX_UPLOAD,
                     max_audio_seconds=MAX_SECONDS)
    served = Served(app, port=1234)
    yield served
    served.close()


@pytest.fixture(scope="module")
def auth_server(engine):
    served = Served(create_app(engine, model_name="default", api_key=API_KEY))
    yield served
    served.close()


@pytest.fixture(scope="module")
def small_server(model_fp32, refs):
    """One slot, no queue: the second concurrent request is refused."""
    app = create_app(model_fp32, model_name="small", max_concurrency=1, max_queue=0)
    served = Served(app)
    yield served
    served.close()


def check_error(response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


# OpenAI clients ----------------------------------------------------------------------------
def test_seed_example(server, clips, refs, tmp_path, monkeypatch, capsys):
    (tmp_path / "sample.wav").write_bytes(clips["speech_5s"].read_bytes())
    monkeypatch.chdir(tmp_path)
    base_url = f"http://localhost:{server.port}/v1/"

    # greedy (temperature 0): exactly the offline transcription
    client = openai.OpenAI(api_key="foobar", base_url=base_url)
    with open("sample.wav", "rb") as f:
        audio_b64 = base64.b64encode(f.read()).decode()
    messages = [{"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{audio_b64}"}},
        {"type": "text", "text": "Transcribe this audio."}]}]
    completion = client.chat.completions.create(model="default", messages=messages, max_tokens=256, temperature=0)
    assert completion.choices[0].message.content == refs["seed"].text
    assert completion.choices[0].finish_reason == ("length" if refs["seed"].finish_reason == "length" else "stop")
    assert completion.usage.completion_tokens == len(refs["seed"].token_ids)

    # the seed example verbatim (file name aside; the port is the test server's, 1234 when
    # free): temperature 0.1 samples, so only a non-empty answer is pinned
    from openai import OpenAI
    client = OpenAI(api_key="foobar", base_url=f"http://localhost:{server.port}/v1/")
    with open("sample.wav","rb") as f: audio_b64 = base64.b64encode(f.read()).decode()  # noqa: E231,E701
    completion = client.chat.completions.create(model="default", messages=[{"role":"user","content":[{"type":"audio_url","audio_url":{"url":f"data:audio/wav;base64,{audio_b64}"}},{"type":"text","text":"Transcribe this audio."}]}], max_tokens=256, temperature=0.1)  # noqa: E231,E501
    print(completion.choices[0].message.content)
    assert capsys.readouterr().out.strip()


def test_chat_stream_parts_and_usage(server, clips, refs):
    client = openai.OpenAI(api_key="x", base_url=f"{server.url}/v1/")
    a, b = clips["speech_1.0s"], clips["silence_2s"]
    expected = refs["speech_1.0s"].text + "\n" + refs["silence_2s"].text
    body = chat_body(data_url(a), data_url(b))
    completion = client.chat.completions.create(**body)
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 2 * refs["silence_2s"].prompt_tokens

    chunks = list(client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == completion.usage.total_tokens

    # input_audio parts and a max_tokens budget shared by the parts
    parts = [{"type": "input_audio", "input_audio": {"data": b64(a), "format": "wav"}}] * 2
    capped = server.http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": parts}], "max_tokens": 3}).json()
    assert capped["choices"][0]["finish_reason"] == "length"
    assert refs["speech_1.0s"].text.startswith(capped["choices"][0]["message"]["content"])


def test_local_file_inside_allowed_folder(server, clips, refs):
    path = clips["allowed"] / "inside.wav"
    for url in (str(path), f"file://{path}"):
        r = server.http.post("/v1/chat/completions", json=chat_body(url))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == refs["inside"].text


def test_transcription_formats(server, clips, refs):
    client = openai.OpenAI(api_key="x", base_url=f"{server.url}/v1/")
    ref = refs["speech_2.0s"]

    def create(**kwargs):
        with open(clips["speech_2.0s"], "rb") as f:
            return client.audio.transcriptions.create(file=f, model="default", **kwargs)

    assert create().text == ref.text
    assert create(response_format="json", language="en", prompt="ignored", temperature=0).text == ref.text
    assert create(response_format="text").strip() == ref.text
    assert create(response_format="srt") == render(ref, "srt")
    assert create(response_format="vtt") == render(ref, "vtt")
    verbose = create(response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert verbose.text == ref.text
    assert verbose.duration == pytest.approx(ref.audio_duration, abs=1e-3)
    assert [(w.word, w.start, w.end) for w in verbose.words] == [(w.text, w.start, w.end) for w in ref.words]
    assert [(s.id, s.start, s.end, s.text) for s in verbose.segments] == [
        (i, s.start, s.end, s.text) for i, s in enumerate(ref.segments)]
    plain = server.http.post("/v1/audio/transcriptions", files={"file": clips["speech_2.0s"].read_bytes()},
                             data={"response_format": "verbose_json"}).json()
    assert "words" not in plain and plain["segments"]

    with open(clips["speech_2.0s"], "rb") as f:
        events = list(client.audio.transcriptions.create(file=f, model="default", stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert events[-1].type == "transcript.text.done" and events[-1].text == ref.text
    assert "".join(deltas) == ref.text and len(deltas) > 1


def test_delay_per_request(server, model_fp32, clips):
    """``delay_ms`` on chat completions (a body field) and transcriptions (a form field) is the
    model's delay for that request: the answer is offline ``transcribe`` at that delay."""
    clip = clips["speech_2.0s"]
    for delay in (240, 960):
        want = mlx_voxtral.transcribe(model_fp32, clip, delay_ms=delay)
        chat = server.http.post("/v1/chat/completions", json={**chat_body(data_url(clip)), "delay_ms": delay})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == want.text
        form = server.http.post("/v1/audio/transcriptions", files={"file": clip.read_bytes()},
                                data={"delay_ms": str(delay)})
        assert form.status_code == 200 and form.json()["text"] == want.text
    assert want.text != mlx_voxtral.transcribe(model_fp32, clip, delay_ms=240).text  # the delay matters


def test_models_and_health(server):
    models = openai.OpenAI(api_key="x", base_url=f"{server.url}/v1/").models.list()
    assert [m.id for m in models.data] == ["default"]
    health = server.http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "default"


# realtime -----------------------------------------------------------------------------------
def test_realtime_equals_offline(server, refs):
    url = server.url.replace("http", "ws") + "/v1/realtime"
    words = []
    deltas, done, created = asyncio.run(realtime(url, refs["pcm16_samples"], words=words))
    assert created["type"] == "session.created" and created["id"]
    assert [(w["text"], w["start"], w["end"]) for w in words] == [(w.text, w.start, w.end) for w in refs["pcm16"].words]
    assert done["type"] == "transcription.done", done
    assert "".join(deltas) == done["text"] == refs["pcm16"].text
    assert done["usage"]["completion_tokens"] == len(refs["pcm16"].token_ids)


def test_realtime_bad_events(server, refs):
    url = server.url.replace("http", "ws") + "/v1/realtime"
    bad = [
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"type": "no.such.event"}),
        json.dumps({"type": "input_audio_buffer.append", "audio": "!!!not base64"}),
        json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}),
        json.dumps({"type": "input_audio_buffer.append"}),
        json.dumps({"type": "session.update", "delay_ms": 100}),
        json.dumps({"type": "session.update", "model": 3}),
        json.dumps({"type": "session.update", "audio_format": {"sample_rate": 1}}),
        json.dumps({"type": "session.update", "audio_format": "pcm"}),
    ]

    async def run():
        async with websockets.connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            errors = []
            for message in bad:
                await ws.send(message)
                errors.append(json.loads(await ws.recv()))
            await ws.send(b"\x00\x01")
            errors.append(json.loads(await ws.recv()))
            # the connection still works
            await ws.send(json.dumps({"type": "session.update", "delay_ms": 480}))
            audio = base64.b64encode(refs["pcm16_samples"][:16000].tobytes()).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
            while (event := json.loads(await ws.recv()))["type"] in ("transcription.delta", "transcription.word"):
                pass
            return errors, event

    errors, done = asyncio.run(run())
    for e in errors:
        assert e["type"] == "error" and e["error"]["message"] and e["error"]["code"], e
    assert done["type"] == "transcription.done"


def test_realtime_needs_api_key(auth_server, refs):
    url = auth_server.url.replace("http", "ws") + "/v1/realtime"
    with pytest.raises(websockets.exceptions.InvalidStatus) as e:
        asyncio.run(realtime(url, refs["pcm16_samples"][:8000]))
    assert e.value.response.status_code == 401
    deltas, done, _ = asyncio.run(realtime(url, refs["pcm16_samples"][:8000],
                                           headers={"Authorization": f"Bearer {API_KEY}"}))
    assert done["type"] == "transcription.done" and "".join(deltas) == done["text"]


def test_realtime_key_as_subprotocol(auth_server, refs):
    """A browser's way (it cannot set headers on a websocket, and a key in a URL leaks): the key
    as the ``openai-insecure-api-key.<key>`` subprotocol; the server answers ``realtime``."""
    url = auth_server.url.replace("http", "ws") + "/v1/realtime"

    async def session(*protocols):
        async with websockets.connect(url, subprotocols=list(protocols)) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            return ws.subprotocol

    assert asyncio.run(session("realtime", f"openai-insecure-api-key.{API_KEY}")) == "realtime"
    for protocols in (("realtime", "openai-insecure-api-key.wrong"), ("realtime",),
                      ("realtime", f"openai-insecure-api-key.{API_KEY}x"),
                      ("realtime", "openai-insecure-api-key.wrong", f"openai-insecure-api-key.{API_KEY}")):
        with pytest.raises(websockets.exceptions.InvalidStatus) as e:
            asyncio.run(session(*protocols))
        assert e.value.response.status_code == 401, protocols


# concurrency --------------------------------------------------------------------------------
def test_32_concurrent_requests(server, engine, clips, refs):
    names = [CONCURRENT[i % len(CONCURRENT)] for i in range(32)]

    async def one(client, i, name):
        if i % 2:
            r = await client.post("/v1/audio/transcriptions", files={"file": clips[name].read_bytes()})
            return r.status_code, r.json().get("text")
        r = await client.post("/v1/chat/completions", json=chat_body(data_url(clips[name])))
        return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(*(one(client, i, n) for i, n in enumerate(names)))

    steps = engine.steps
    answers = asyncio.run(run())
    assert answers == [(200, refs[name].text) for name in names]
    # decoded together: one after another would take about 32 * 29 decoder steps
    assert engine.max_batch > 8
    assert engine.steps - steps < 32 * 20


def test_engine_survives_failing_jobs(model_fp32, clips, refs):
    async def run(engine):
        bad = engine.submit([np.zeros(16000, np.float32)], delay_ms=100)  # not a multiple of 80 ms
        good = engine.submit([load_audio(clips["speech_0.5s"])])
        nan = engine.start_live()
        nan.append(np.full(1600, np.nan, np.float32))
        out = []
        for job in (bad, good, nan):
            while not isinstance(event := await job.next_event(), (Finished, Failed)):
                pass
            out.append(event)
        return out

    engine = Engine(model_fp32, max_concurrency=4, max_queue=0)
    try:
        bad, good, nan = asyncio.run(run(engine))
    finally:
        engine.close()
    assert isinstance(bad, Failed) and "multiple of 80" in str(bad.error)
    assert isinstance(nan, Failed) and "NaN" in str(nan.error)
    assert isinstance(good, Finished) and good.results[0].text == refs["speech_0.5s"].text


def test_request_timeout_gives_504(model_fp32, clips):
    served = Served(create_app(model_fp32, request_timeout=1e-6))
    try:
        r = served.http.post("/v1/chat/completions", json=chat_body(data_url(clips["speech_0.5s"])))
        assert check_error(r, 504)["code"] == "timeout"
    finally:
        served.close()


# hostile input ------------------------------------------------------------------------------
GARBAGE = base64.b64encode(b"this is not audio at all " * 40).decode()
EMPTY_WAV = io.BytesIO()
sf.write(EMPTY_WAV, np.zeros(0, np.float32), 16000, format="WAV", subtype="PCM_16")
EMPTY_WAV = base64.b64encode(EMPTY_WAV.getvalue()).decode()
TONE = base64.b64encode(b"RIFF").decode()


def _chat(content=None, **options):
    parts = content if content is not None else [{"type": "audio_url", "audio_url": {"url": "data@speech"}}]
    return {"json": {"messages": [{"role": "user", "content": parts}], **options}}


def _url(url):
    return _chat([{"type": "audio_url", "audio_url": {"url": url}}])


def _form(files=None, **data):
    return {"files": files if files is not None else {"file": ("a.wav", "@speech")}, "data": data}


CHAT, TRANS = "/v1/chat/completions", "/v1/audio/transcriptions"
HOSTILE = [
    # chat completions: body and messages
    ("POST", CHAT, {"content": b"{bad json", "headers": {"content-type": "application/json"}}, 400),
    ("POST", CHAT, {"content": b"\xff\xfe\x00", "headers": {"content-type": "application/json"}}, 400),
    ("POST", CHAT, {"json": [1, 2]}, 400),
    ("POST", CHAT, {"json": "messages"}, 400),
    ("POST", CHAT, {"json": {}}, 400),
    ("POST", CHAT, {"json": {"messages": "hello"}}, 400),
    ("POST", CHAT, {"json": {"messages": []}}, 400),
    ("POST", CHAT, {"json": {"messages": [1]}}, 400),
    ("POST", CHAT, {"json": {"messages": [{"role": "robot", "content": "hi"}]}}, 400),
    ("POST", CHAT, {"json": {"messages": [{"role": "user", "content": 5}]}}, 400),
    ("POST", CHAT, _chat([{"type": "image_url", "image_url": {"url": "x"}}]), 400),
    ("POST", CHAT, _chat([{"audio_url": {"url": "x"}}]), 400),
    ("POST", CHAT, _chat([{"type": "text", "text": "Transcribe this audio."}]), 400),
    ("POST", CHAT, _chat([{"type": "text", "text": 5}]), 400),
    ("POST", CHAT, _chat([{"type": "audio_url", "audio_url": 123}]), 400),
    ("POST", CHAT, _chat([{"type": "audio_url", "audio_url": {}}]), 400),
    # audio sources
    ("POST", CHAT, _url("data:audio/wav;base64,!!!!not-base64"), 400),
    ("POST", CHAT, _url("data:text/plain;base64,aGVsbG8="), 400),
    ("POST", CHAT, _url("data:audio/wav,plain"), 400),
    ("POST", CHAT, _url("data:audio/wav;base64," + GARBAGE), 415),
    ("POST", CHAT, _url("data:audio/wav;base64," + TONE), 415),
    ("POST", CHAT, _url("data:audio/wav;base64," + EMPTY_WAV), 400),
    ("POST", CHAT, _url("data:audio/wav;base64,"), 400),
    ("POST", CHAT, _chat([{"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]), 400),
    ("POST", CHAT, _chat([{"type": "input_audio", "input_audio": {"format": "wav"}}]), 400),
    ("POST", CHAT, _chat([{"type": "input_audio", "input_audio": {"data": ""}}]), 400),
    ("POST", CHAT, _chat([{"type": "input_audio", "input_audio": "abc"}]), 400),
    ("POST", CHAT, _url("@allowed/../../../../etc/passwd"), 403),
    ("POST", CHAT, _url("/etc/passwd"), 403),
    ("POST", CHAT, _url("file:///etc/passwd"), 403),
    ("POST", CHAT, _url("file://evil.example.com/etc/passwd"), 400),
    ("POST", CHAT, _url("http://127.0.0.1:9/audio.wav"), 403),
    ("POST", CHAT, _url("https://example.com/audio.wav"), 403),
    ("POST", CHAT, _url("ftp://example.com/audio.wav"), 400),
    ("POST", CHAT, _url("@allowed/missing.wav"), 400),
    ("POST", CHAT, _url("@allowed/notes.txt"), 415),
    ("POST", CHAT, _url("data@too_long"), 400),
    # sampling options
    ("POST", CHAT, _chat(max_tokens=10**9), 400),
    ("POST", CHAT, _chat(max_tokens=0), 400),
    ("POST", CHAT, _chat(max_tokens="10"), 400),
    ("POST", CHAT, _chat(max_tokens=2.5), 400),
    ("POST", CHAT, _chat(temperature=-0.5), 400),
    ("POST", CHAT, _chat(temperature=True), 400),
    ("POST", CHAT, _chat(temperature="hot"), 400),
    ("POST", CHAT, _chat(n=2), 400),
    ("POST", CHAT, _chat(stream="yes"), 400),
    ("POST", CHAT, _chat(stream_options=[1]), 400),
    ("POST", CHAT, _chat(model=5), 400),
    ("POST", CHAT, _chat(seed="x"), 400),
    # sizes and content types
    ("POST", CHAT, {"content": b"x" * (4 * MAX_UPLOAD), "headers": {"content-type": "application/json"}}, 413),
    ("POST", CHAT, _url("data:audio/wav;base64," + "A" * (MAX_UPLOAD * 4 // 3 + 400)), 413),
    ("POST", CHAT, {"content": b"{}", "headers": {"content-type": "text/plain"}}, 415),
    ("POST", CHAT, {"data": {"messages": "x"}}, 415),
    # transcriptions
    ("POST", TRANS, {"json": {"file": "x"}}, 415),
    ("POST", TRANS, {"content": b"file=abc"}, 415),
    ("POST", TRANS, {"files": {"model": (None, "default")}}, 400),
    ("POST", TRANS, {"files": {"model": (None, "default")}, "data": {"file": "not a file"}}, 400),
    ("POST", TRANS, _form(files={"file": ("a.wav", b"")}), 400),
    ("POST", TRANS, _form(files={"file": ("a.wav", b"garbage" * 100)}), 415),
    ("POST", TRANS, _form(files={"file": ("a.wav", "@too_long")}), 400),
    ("POST", TRANS, _form(files={"file": ("a.wav", b"\0" * (MAX_UPLOAD * 2))}), 413),
    ("POST", TRANS, _form(files=[("file", ("a.wav", "@speech")), ("file", ("b.wav", "@speech"))]), 400),
    ("POST", TRANS, _form(response_format="xml"), 400),
    ("POST", TRANS, _form(temperature="abc"), 400),
    ("POST", TRANS, _form(temperature="-1"), 400),
    ("POST", TRANS, _form(temperature="nan"), 400),
    ("POST", TRANS, _form(**{"timestamp_granularities[]": "char"}), 400),
    ("POST", TRANS, _form(stream="maybe"), 400),
    ("POST", TRANS, _form(stream="true", response_format="srt"), 400),
    ("POST", TRANS, {"content": b"--x\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400),
    # routes and methods
    ("GET", "/nope", {}, 404),
    ("POST", "/v1/nope", {"json": {}}, 404),
    ("GET", "/v1/realtime", {}, 404),
    ("GET", CHAT, {}, 405),
    ("PUT", TRANS, {}, 405),
    ("POST", "/v1/models", {}, 405),
    ("DELETE", "/health", {}, 405),
]


def _resolve(value, clips):
    """Expand placeholders: "@name/..." a path, "data@name" a data URL, ("f", "@name") bytes."""
    if isinstance(value, str) and value.startswith("data@"):
        return data_url(clips["speech_1.0s"] if value == "data@speech" else clips[value[5:]])
    if isinstance(value, str) and value.startswith("@"):
        name, _, rest = value[1:].partition("/")
        path = clips["speech_1.0s"] if name == "speech" else clips[name]
        if rest:
            return str(path) + "/" + rest
        return str(path)
    if isinstance(value, dict):
        return {k: _resolve(v, clips) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, clips) for v in value]
    if isinstance(value, tuple):
        if len(value) == 2 and isinstance(value[1], str) and value[1].startswith("@"):
            return (value[0], Path(_resolve(value[1], clips)).read_bytes())
        return tuple(_resolve(v, clips) for v in value)
    return value


@pytest.mark.parametrize("method, path, kwargs, status", HOSTILE, ids=[f"{i}-{h[1]}-{h[3]}" for i, h in enumerate(HOSTILE)])
def test_hostile_request(server, clips, method, path, kwargs, status):
    kwargs = dict(kwargs)
    if "json" in kwargs:
        kwargs["json"] = _resolve(kwargs["json"], clips)
    if "files" in kwargs:
        kwargs["files"] = _resolve(kwargs["files"], clips)
    response = server.http.request(method, path, **kwargs)
    check_error(response, status)


AUTH = [
    ("GET", "/v1/models", {}),
    ("GET", "/v1/models", {"Authorization": "Bearer wrong"}),
    ("GET", "/v1/models", {"Authorization": API_KEY}),
    ("GET", "/v1/models", {"Authorization": f"Basic {API_KEY}"}),
    ("POST", CHAT, {}),
    ("POST", TRANS, {"Authorization": f"Bearer {API_KEY}x"}),
]


@pytest.mark.parametrize("method, path, headers", AUTH)
def test_api_key_required(auth_server, method, path, headers):
    error = check_error(auth_server.http.request(method, path, headers=headers, json={}), 401)
    assert error["code"] == "invalid_api_key"


def test_api_key_accepted_and_health_open(auth_server, clips, refs):
    assert auth_server.http.get("/health").status_code == 200
    client = openai.OpenAI(api_key=API_KEY, base_url=f"{auth_server.url}/v1/")
    assert [m.id for m in client.models.list().data] == ["default"]
    completion = client.chat.completions.create(**chat_body(data_url(clips["speech_0.5s"])))
    assert completion.choices[0].message.content == refs["speech_0.5s"].text


def test_still_correct_after_hostile_requests(server, clips, refs):
    r = server.http.post("/v1/chat/completions", json=chat_body(data_url(clips["speech_1.5s"])))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == refs["speech_1.5s"].text
    assert server.http.get("/health").json()["active"] == 0


# capacity and disconnects ---------------------------------------------------------------------
def wait_idle(served, timeout: float = 10.0) -> float:
    """Seconds until the engine has no active or waiting job."""
    start = time.monotonic()
    while True:
        health = served.http.get("/health").json()
        if health["active"] == 0 and health["waiting"] == 0:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, health
        time.sleep(0.05)


def hold_slot(served, clips):
    """A streaming transcription of long audio, read up to its first delta.

    Returns the client, the response and its line iterator, all to be kept alive: a line
    iterator collected as garbage closes the connection.
    """
    client = httpx.Client(base_url=served.url, timeout=120)
    response = client.send(client.build_request(
        "POST", "/v1/audio/transcriptions",
        files={"file": clips["long"].read_bytes()}, data={"stream": "true"}), stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: "):
            assert json.loads(line[6:])["type"] == "transcript.text.delta"
            break
    return client, response, lines


def test_queue_full_gives_429(small_server, clips):
    client, held, _lines = hold_slot(small_server, clips)
    try:
        r = small_server.http.post("/v1/chat/completions", json=chat_body(data_url(clips["speech_0.5s"])))
        error = check_error(r, 429)
        assert error["code"] == "server_busy" and int(r.headers["Retry-After"]) >= 1
        r = small_server.http.post("/v1/audio/transcriptions", files={"file": clips["speech_0.5s"].read_bytes()})
        check_error(r, 429)
    finally:
        held.close()
        client.close()
    assert wait_idle(small_server) < 10


def test_disconnect_frees_the_slot(small_server, clips, refs):
    # a streaming request closed after its first chunk
    client, held, _lines = hold_slot(small_server, clips)
    held.close()
    client.close()
    start = time.monotonic()
    wait_idle(small_server)
    r = small_server.http.post("/v1/chat/completions", json=chat_body(data_url(clips["speech_0.5s"])))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == refs["speech_0.5s"].text
    # the long audio alone would take far longer than this (about 1500 decoder steps)
    assert time.monotonic() - start < 20

    # a non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{small_server.url}/v1/audio/transcriptions", files={"file": clips["long"].read_bytes()},
                   timeout=httpx.Timeout(60, read=2))
    wait_idle(small_server)


# entry point --------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["BAD", "{tmp}"])
def test_bad_model_exits_with_one_line(model, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mlx_voxtral.server", "--model", model.format(tmp=tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_smoke_on_both_backends(fp32, backend, clips):
    """The server over each backend: concurrent chat requests and a live session answer what
    offline ``transcribe`` gives on that backend."""
    names = ["speech_1.0s", "speech_2.0s", "silence_2s"]
    offline = {n: mlx_voxtral.transcribe(fp32, clips[n]) for n in names}
    pcm16 = np.round(np.clip(load_audio(clips["speech_1.5s"]), -1, 1) * 32767).astype(np.int16)
    live = mlx_voxtral.transcribe(fp32, pcm16.astype(np.float32) / 32768.0)
    served = Served(create_app(fp32, model_name=f"smoke-{backend}", max_concurrency=4))
    try:
        async def chats():
            async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
                answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=chat_body(data_url(clips[n])))
                                                 for n in names))
                return [a.json()["choices"][0]["message"]["content"] for a in answers]

        assert asyncio.run(chats()) == [offline[n].text for n in names]
        deltas, done, _ = asyncio.run(realtime(served.url.replace("http", "ws") + "/v1/realtime", pcm16))
        assert "".join(deltas) == done["text"] == live.text
        assert done["usage"]["completion_tokens"] == len(live.token_ids)
    finally:
        served.close()
