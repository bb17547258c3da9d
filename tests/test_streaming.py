"""Live streaming on both backends: equal to offline, events, restarts (EOS, position limit),
batching, flat memory; the caches under it."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import numpy as np
import pytest

import mlx_voxtral
from mlx_voxtral.audio import load_audio
from mlx_voxtral.generate import Batch, async_stream_transcribe, stream_transcribe
from mlx_voxtral.results import Done, StreamReset, TextDelta, Word
from mlx_voxtral.session import Session

from conftest import make_checkpoint


def _chunks(audio: np.ndarray, sizes) -> list[np.ndarray]:
    out, i = [], 0
    for n in sizes:
        if i >= len(audio):
            break
        out.append(audio[i : i + n])
        i += n
    assert i >= len(audio)
    return out


def _random_sizes(seed: int):
    rng = np.random.default_rng(seed)
    while True:
        yield int(rng.integers(160, 48000))  # 10 ms to 3 s


def _collect(events):
    events = list(events)
    assert isinstance(events[-1], Done)
    assert not any(isinstance(e, Done) for e in events[:-1])
    return events, events[-1].result


@pytest.fixture(scope="module")
def offline_40s(fp32, speech_40s):
    return mlx_voxtral.transcribe(fp32, speech_40s)


@pytest.mark.parametrize("chunking", ["80ms", "1s", "random"])
def test_streamed_ids_equal_offline(chunking, fp32, speech_40s, offline_40s):
    audio = load_audio(speech_40s)
    sizes = {"80ms": iter(lambda: 1280, None), "1s": iter(lambda: 16000, None), "random": _random_sizes(0)}
    events, result = _collect(stream_transcribe(fp32, _chunks(audio, sizes[chunking])))
    assert result.token_ids == offline_40s.token_ids
    assert result.text == offline_40s.text
    assert result.words == offline_40s.words
    # the deltas spell out the text; word events are the result's words
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).strip() == result.text
    assert [e for e in events if isinstance(e, Word)] == result.words


def test_async_stream_equals_offline(model_fp32, speech_5s):
    audio = load_audio(speech_5s)
    offline = mlx_voxtral.transcribe(model_fp32, audio)

    async def chunks():
        for c in _chunks(audio, _random_sizes(1)):
            await asyncio.sleep(0)
            yield c

    async def run():
        return [e async for e in async_stream_transcribe(model_fp32, chunks())]

    events = asyncio.run(run())
    assert isinstance(events[-1], Done)
    assert events[-1].result.token_ids == offline.token_ids


def test_streamed_non_default_delay_equals_offline(fp32, speech_5s):
    audio = load_audio(speech_5s)
    offline = mlx_voxtral.transcribe(fp32, audio, delay_ms=960)
    _, result = _collect(stream_transcribe(fp32, _chunks(audio, iter(lambda: 4000, None)), delay_ms=960))
    assert result.token_ids == offline.token_ids and result.delay_ms == 960


def test_text_arrives_while_audio_streams(model_fp32, speech_40s):
    """Text is emitted long before the stream ends (not batched at the end)."""
    audio = load_audio(speech_40s)
    fed = 0
    first_text_at = None

    def chunks():
        nonlocal fed
        for c in _chunks(audio, iter(lambda: 1280, None)):
            fed += len(c)
            yield c

    for event in stream_transcribe(model_fp32, chunks()):
        if isinstance(event, TextDelta) and first_text_at is None:
            first_text_at = fed
    # the delay is 480 ms and the prompt needs 560 ms of audio: text within ~1.2 s
    assert first_text_at is not None and first_text_at <= 1.2 * 16000


def test_bad_stream_input(model_fp32):
    with pytest.raises(mlx_voxtral.AudioError, match="empty"):
        list(stream_transcribe(model_fp32, []))
    bad = np.zeros(4000, np.float32)
    bad[5] = np.inf
    with pytest.raises(mlx_voxtral.AudioError, match="NaN or infinite"):
        list(stream_transcribe(model_fp32, [np.zeros(4000, np.float32), bad]))


def test_eos_mid_audio_restarts_on_the_uncovered_audio(eos_model, speech_5s):
    """After EOS with audio left, the session restarts the decoder on the audio the text
    had not covered: what follows equals a fresh transcription of that audio."""
    model = eos_model
    audio = load_audio(speech_5s)
    result = mlx_voxtral.transcribe(model, audio)
    assert result.resets >= 1
    first = result.token_ids.index(2)
    position = 39 - 1 + first  # the decoder position that produced it
    covered = (position + 1 - 6 - 32) * 1280
    assert 0 < covered < len(audio)
    rest = mlx_voxtral.transcribe(model, audio[covered:])
    assert result.token_ids[first + 1 :] == rest.token_ids
    assert result.resets == rest.resets + 1
    assert result.finish_reason == rest.finish_reason
    # the words after the restart are shifted by the covered audio
    offset = covered / 16000
    tail = [w for w in result.words if w.start >= offset]
    assert [w.text for w in tail[-len(rest.words):]] == [w.text for w in rest.words]
    assert tail[-1].start == pytest.approx(rest.words[-1].start + offset, abs=1e-3)
    # streaming goes through the same restart
    events, streamed = _collect(stream_transcribe(model, _chunks(audio, _random_sizes(2))))
    assert streamed.token_ids == result.token_ids
    assert sum(isinstance(e, StreamReset) and e.reason == "eos" for e in events) == result.resets


def test_eos_rule(model_fp32):
    """EOS ends the session only once the audio has ended and the decoder was fed its last
    real audio position; otherwise the decoder restarts on the audio the text had not
    covered (its position minus the delay and the left pad)."""
    audio = np.random.default_rng(0).uniform(-0.1, 0.1, 3 * 16000).astype(np.float32)
    last = 32 + -(-len(audio) // 1280) - 1  # decoder position of the last real audio

    live = Session(model_fp32)
    live.push(audio)
    events = live.on_token(2, 60)  # still streaming: restart
    assert isinstance(events[-1], StreamReset) and events[-1].reason == "eos"
    covered = (60 + 1 - 6 - 32) * 1280
    assert live.origin == covered and live.stream.samples == len(audio) - covered
    assert events[-1].time == covered / 16000 and not live.done

    early = Session(model_fp32)
    early.push(audio)
    early.finish()
    early.on_token(2, last - 1)  # audio ended, but not all of it was heard yet
    assert not early.done and early.resets == 1 and early.stream.finished

    ended = Session(model_fp32)
    ended.push(audio)
    ended.finish()
    assert ended.on_token(2, last) == [] and ended.finish_reason == "stop" and ended.resets == 0


@pytest.fixture(scope="module")
def limit_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("limit") / "ckpt", "--max-length", "200")


def test_position_limit_rolls_over(limit_checkpoint, backend, speech_40s):
    """A stream never passes model_max_length: the session restarts on the uncovered
    audio and goes on to the end."""
    model = mlx_voxtral.load(limit_checkpoint, dtype=mx.float32, backend=backend)
    audio = load_audio(speech_40s)
    result = mlx_voxtral.transcribe(model, audio)
    assert result.resets >= 2 and result.finish_reason == "end_of_audio"
    # every stream stays within the limit: at most 200 - 39 + 1 tokens between restarts
    assert len(result.token_ids) > 200
    assert result.words[-1].end > 30.0
    events, streamed = _collect(stream_transcribe(model, _chunks(audio, _random_sizes(3))))
    assert streamed.token_ids == result.token_ids
    resets = [e for e in events if isinstance(e, StreamReset)]
    assert len(resets) == result.resets and all(r.reason == "position_limit" for r in resets)
    assert all(b.time > a.time for a, b in zip(resets, resets[1:]))


LONG_SESSION = r"""
import os, sys
import numpy as np
import mlx.core as mx
import mlx_voxtral
from mlx_voxtral.audio import load_audio
from mlx_voxtral.generate import stream_transcribe
from mlx_voxtral.results import Done

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

model = mlx_voxtral.load(sys.argv[1], dtype=mx.float32, backend=sys.argv[4])
speech = load_audio(sys.argv[2])
seconds, marks, mark = int(sys.argv[3]), {}, int(sys.argv[5])

def chunks():
    rng = np.random.default_rng(0)
    for s in range(seconds):
        if s in (mark, seconds - 1):
            marks[s] = rss()
        start = (s * 16000) % (len(speech) - 16000)
        yield speech[start : start + 16000] + 0.01 * rng.standard_normal(16000).astype(np.float32)

for event in stream_transcribe(model, chunks()):
    pass
assert isinstance(event, Done)
print(marks[mark], marks[seconds - 1], len(event.result.token_ids), event.result.resets)
"""


@pytest.mark.parametrize("backend_name, seconds, window, mark", [("cpu", 1800, None, 720), ("mlx", 420, 512, 120)])
def test_long_stream_has_flat_memory(tmp_path_factory, speech_40s, backend_name, seconds, window, mark):
    """Streamed in 1 s chunks, resident memory stops growing once the caches hold their
    windows: on the CPU backend half an hour through the full 8192-position decoder window
    (12 and 30 minutes differ by < 5 %), on the MLX backend 7 minutes through a 512-position
    window (2 and 7 minutes). A small-vocabulary tiny checkpoint keeps this fast."""
    import subprocess
    import sys

    from mlx_voxtral import cpu

    if backend_name == "cpu" and not cpu.available():
        pytest.skip("no CPU backend here")
    extra = ["--decoder-window", str(window)] if window else []
    path = make_checkpoint(tmp_path_factory.mktemp("micro") / "ckpt", "--vocab-size", "2048", *extra)
    out = subprocess.run(
        [sys.executable, "-c", LONG_SESSION, str(path), str(speech_40s), str(seconds), backend_name, str(mark)],
        capture_output=True, text=True, check=True,
    )
    at_mark, at_end, n_tokens, _ = map(int, out.stdout.split())
    assert n_tokens > seconds * 12  # 12.5 tokens per second of audio
    assert abs(at_end - at_mark) / at_mark < 0.05, (at_mark, at_end)


def _run_batched(model, audios, delays, push_every=3):
    """Sessions decoded together in one ``Batch``, audio arriving in 0.5 s chunks while they
    decode; returns the sessions once all are done."""
    sessions = [Session(model, delay_ms=d) for d in delays]
    batch = Batch(model)
    for s in sessions:
        batch.add(s)
    chunks = [_chunks(a, iter(lambda: 8000, None)) for a in audios]
    steps = 0
    while not all(s.done for s in sessions):
        for s, c in zip(sessions, chunks):
            if steps % push_every == 0 and not s.finished:  # audio keeps arriving while decoding
                s.push(c.pop(0)) if c else s.finish()
        batch.step()
        steps += 1
    return sessions


def test_a_stream_does_not_depend_on_its_batch(fp32, speech_5s, speech_40s):
    """Eight sessions with mixed delays, lengths and arrival times, decoded together (one
    encoder pass and one decoder pass per step), give exactly the tokens each gives alone."""
    five, forty = load_audio(speech_5s), load_audio(speech_40s)
    audios = [five, forty[: 16000 * 12], five[:30000], forty[16000 * 3 : 16000 * 10], five[8000:],
              forty[-16000 * 6 :], five[:20000], forty[16000 * 20 : 16000 * 24]]
    delays = [480, 480, 960, 80, 2400, 480, 160, 960]
    singles = [mlx_voxtral.transcribe(fp32, a, delay_ms=d) for a, d in zip(audios, delays)]
    for s, r in zip(_run_batched(fp32, audios, delays), singles):
        assert s.token_ids == r.token_ids and s.finish_reason == r.finish_reason


def test_sessions_join_and_leave_a_running_batch(fp32, speech_5s, speech_40s):
    """Rows come and go (the last row moves into a freed one): the others are unaffected."""
    five, forty = load_audio(speech_5s), load_audio(speech_40s)[: 16000 * 15]
    alone = {n: mlx_voxtral.transcribe(fp32, a).token_ids for n, a in [("five", five), ("forty", forty)]}
    batch = Batch(fp32)
    long = Session(fp32)
    long.push(forty)
    long.finish()
    batch.add(long)
    shorts = []
    while not long.done:
        batch.step()
        if batch.steps % 40 == 1 and len(shorts) < 4:  # a new short request every 40 steps
            s = Session(fp32)
            s.push(five)
            s.finish()
            batch.add(s)
            shorts.append(s)
        for s in [s for s in shorts if s.done and s in batch.sessions]:
            batch.remove(s)
    assert long.token_ids == alone["forty"]
    assert len(shorts) == 4 and all(s.token_ids == alone["five"] for s in shorts if s.done)


def test_mlx_caches_never_evaluate(tiny_checkpoint, speech_5s, monkeypatch):
    """The MLX backend's streaming path makes one host read per step (the token read): no
    ``mx.eval`` anywhere in the caches, masks or model, whatever the chunk."""
    model = mlx_voxtral.load(tiny_checkpoint, backend="mlx")
    audio = load_audio(speech_5s)
    session = Session(model)
    batch = Batch(model)
    batch.add(session)
    evals = []
    real = mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a: evals.append(1) or real(*a))
    chunks = 0
    for chunk in _chunks(audio, iter(lambda: 1280, None)):
        session.push(chunk)
        batch.drain()
        chunks += 1
    session.finish()
    batch.drain()
    assert session.done and len(session.token_ids) > 50
    assert evals == []
    assert batch.host_reads <= chunks + 30  # one read per chunk, the tail after the audio


def test_ring_cache_masks_and_slots():
    """The MLX ring cache: position p of a row lives in slot p % capacity; a query sees the
    window's positions and nothing else (padding and stale slots masked); growing the ring
    keeps every slot; rows at different positions share one pass."""
    from mlx_voxtral.cache import LayerCaches

    window, chunk = 10, 4
    cache = LayerCaches(1, window, chunk)
    for _ in range(3):
        cache.add_row()
    layer = cache[0]
    rng = np.random.default_rng(0)
    for step in range(40):
        lengths = [int(n) for n in rng.integers(0, chunk + 1, 3)]
        L = max(max(lengths), 1)
        offsets = list(cache.rows.offsets)
        cache.prepare(slice(0, 3), lengths, L)
        k = mx.broadcast_to((mx.array(offsets)[:, None] + mx.arange(L)[None]).astype(mx.float32)[:, None, :, None],
                            (3, 1, L, 2))
        keys, _ = layer.update_and_fetch(k, k)
        mask = np.array(cache.mask)[:, 0]  # [rows, L, capacity]
        keys = np.array(keys)[:, 0, :, 0]  # the position each slot holds
        cap = cache.rows.capacity
        assert cap <= window + chunk - 1
        for r in range(3):
            for i in range(lengths[r]):
                q = offsets[r] + i
                seen = set(keys[r][mask[r, i]].astype(int))
                assert seen == set(range(max(0, q - window + 1), q + 1)), (step, r, q)
                assert keys[r][q % cap] == q
        cache.finalize()
        assert cache.rows.offsets == [o + n for o, n in zip(offsets, lengths)]
    cache.remove_row(0)  # row 2 moves to 0
    assert cache.n_rows == 2 and layer.keys.shape[0] >= 2


def test_host_kv_cache_keeps_its_window():
    """The CPU backend's numpy cache: a decode step writes in place into a ring, a chunk
    attends to the last window - 1 cached positions and itself, read in place from the
    cache's buffer (compacted or reallocated as chunks fill it); keys round to bf16; the
    buffer stays within the window and a bounded slack."""
    from mlx_voxtral.cpu.cache import HostKVCache, from_bf16, to_bf16

    rng = np.random.default_rng(5)
    chunks = [7, 1, 1, 40, *[1] * 290, 5, *[1] * 20, 400, 1, 2, *[4] * 150, 3, 1, 600, *[2] * 150, 299, 300, 301]
    for bf16 in (True, False):
        cache = HostKVCache(window=300, bf16=bf16)
        history = np.zeros((4, 0, 16), np.float32)
        for n in chunks:
            k = rng.standard_normal((4, n, 16)).astype(np.float32)
            stored = from_bf16(to_bf16(k)) if bf16 else k
            if n == 1:
                cache.append(k[:, 0], k[:, 0])
                history = np.concatenate([history, stored], axis=1)[:, -300:]
                m = len(cache)
                ring = cache.load(cache.keys[:, :m])
                assert sorted(map(tuple, ring[0])) == sorted(map(tuple, history[0]))
            else:
                got, _ = cache.extend(k, k)
                assert got.dtype == cache.keys.dtype and (n > 4 or np.shares_memory(got, cache.keys))
                want = np.concatenate([history[:, -299:], stored], axis=1)
                assert np.array_equal(cache.load(got), want)
                history = want[:, -300:]
            assert len(cache) == history.shape[1] and cache.keys.shape[1] <= 300 + 2 * cache.slack


def test_bf16_rounding_matches_mlx():
    """float32 -> bfloat16 in numpy (the host caches) rounds as MLX does, ties to even."""
    from mlx_voxtral.cpu.cache import from_bf16, to_bf16

    x = np.random.default_rng(6).standard_normal(100000).astype(np.float32) * 10
    ties = (np.arange(1, 2000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # halfway cases
    x = np.concatenate([x, ties, -ties, np.float32([0, -0.0, 1e-40, 3e38, np.inf, -np.inf])])
    ref = np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32))
    assert np.array_equal(from_bf16(to_bf16(x)), ref)
