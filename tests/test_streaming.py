"""Live streaming: exact to offline, events, restarts (EOS, position limit), timestamps."""

from __future__ import annotations

import asyncio
import shutil

import mlx.core as mx
import numpy as np
import pytest

import mlx_voxtral
from mlx_voxtral.audio import load_audio
from mlx_voxtral.generate import Done, StreamReset, TextDelta, async_stream_transcribe, stream_transcribe
from mlx_voxtral.timestamps import Word

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
def offline_40s(model_fp32, speech_40s):
    return mlx_voxtral.transcribe(model_fp32, speech_40s)


@pytest.mark.parametrize("chunking", ["80ms", "1s", "random"])
def test_streamed_ids_equal_offline(chunking, model_fp32, speech_40s, offline_40s):
    audio = load_audio(speech_40s)
    sizes = {"80ms": iter(lambda: 1280, None), "1s": iter(lambda: 16000, None), "random": _random_sizes(0)}
    events, result = _collect(stream_transcribe(model_fp32, _chunks(audio, sizes[chunking])))
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


def test_streamed_non_default_delay_equals_offline(model_fp32, speech_5s):
    audio = load_audio(speech_5s)
    offline = mlx_voxtral.transcribe(model_fp32, audio, delay_ms=960)
    _, result = _collect(stream_transcribe(model_fp32, _chunks(audio, iter(lambda: 4000, None)), delay_ms=960))
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


@pytest.fixture(scope="module")
def eos_model(tiny_checkpoint, tmp_path_factory, model_fp32, speech_5s):
    """A checkpoint whose EOS embedding points where a token emitted mid-speech points,
    so the model emits EOS in the middle of the audio."""
    baseline = mlx_voxtral.transcribe(model_fp32, speech_5s).token_ids
    path = tmp_path_factory.mktemp("eos") / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    weights = dict(mx.load(str(path / "consolidated.safetensors")))
    name = "mm_streams_embeddings.embedding_module.tok_embeddings.weight"
    emb = weights[name]
    emb[2] = emb[baseline[len(baseline) // 3]] * 1.05
    weights[name] = emb
    mx.save_safetensors(str(path / "consolidated.safetensors"), weights)
    return mlx_voxtral.load(path, dtype=mx.float32)


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
    from mlx_voxtral.session import Session

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


def test_position_limit_rolls_over(tmp_path_factory, speech_40s):
    """A stream never passes model_max_length: the session restarts on the uncovered
    audio and goes on to the end."""
    path = make_checkpoint(tmp_path_factory.mktemp("limit") / "ckpt", "--max-length", "200")
    model = mlx_voxtral.load(path, dtype=mx.float32)
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
from mlx_voxtral.generate import Done, stream_transcribe

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

model = mlx_voxtral.load(sys.argv[1], dtype=mx.float32)
speech = load_audio(sys.argv[2])
seconds = int(sys.argv[3])
marks = {}

def chunks():
    rng = np.random.default_rng(0)
    for s in range(seconds):
        if s in (600, seconds - 1):
            marks[s] = rss()
        start = (s * 16000) % (len(speech) - 16000)
        yield speech[start : start + 16000] + 0.01 * rng.standard_normal(16000).astype(np.float32)

for event in stream_transcribe(model, chunks()):
    pass
assert isinstance(event, Done)
print(marks[600], marks[seconds - 1], len(event.result.token_ids), event.result.resets)
"""


def test_one_hour_stream_has_flat_memory(tmp_path_factory, speech_40s):
    """An hour of audio streamed in 1 s chunks: resident memory at 10 and 60 minutes
    differs by less than 5 %. (A small-vocabulary tiny checkpoint keeps this fast.)"""
    import subprocess
    import sys

    path = make_checkpoint(tmp_path_factory.mktemp("micro") / "ckpt", "--vocab-size", "2048")
    out = subprocess.run(
        [sys.executable, "-c", LONG_SESSION, str(path), str(speech_40s), "3600"],
        capture_output=True, text=True, check=True,
    )
    at_10, at_60, n_tokens, _ = map(int, out.stdout.split())
    assert n_tokens > 3600 * 12  # 12.5 tokens per second of audio
    assert abs(at_60 - at_10) / at_10 < 0.05, (at_10, at_60)


def test_batched_sessions_equal_single_runs(model_fp32, speech_5s, speech_40s):
    """Sessions decoded together (one forward pass per step, different delays, lengths and
    arrival times) give exactly their single-run tokens."""
    from mlx_voxtral.generate import batch_step
    from mlx_voxtral.session import Session

    audios = [load_audio(speech_5s), load_audio(speech_40s)[: 16000 * 12], load_audio(speech_5s)[:30000]]
    delays = [480, 480, 960]
    singles = [mlx_voxtral.transcribe(model_fp32, a, delay_ms=d) for a, d in zip(audios, delays)]
    sessions = [Session(model_fp32, delay_ms=d) for d in delays]
    chunks = [_chunks(a, iter(lambda: 8000, None)) for a in audios]
    steps = 0
    while not all(s.done for s in sessions):
        for s, c in zip(sessions, chunks):
            if steps % 3 == 0 and not s.finished:  # audio keeps arriving while decoding
                s.push(c.pop(0)) if c else s.finish()
        batch_step(model_fp32, sessions)
        steps += 1
    for s, r in zip(sessions, singles):
        assert s.token_ids == r.token_ids and s.finish_reason == r.finish_reason


def test_bf16_model_streams_exactly_over_its_bf16_cache(tiny_checkpoint, speech_40s, monkeypatch):
    """The default CPU model (bf16 weights, float32 activations) keeps the encoder's and
    the decoder's keys and values in bfloat16; a decode step reads them in place (native
    kernel on Linux), and streaming still gives offline's tokens exactly."""
    from mlx_voxtral import cpu, native

    model = mlx_voxtral.load(tiny_checkpoint)
    assert model.decoder.cache_dtype == model.encoder.cache_dtype == mx.bfloat16
    caches = model.decoder.make_cache() + model.encoder.make_cache()[1]
    assert all(c.dtype == mx.bfloat16 for c in caches)
    calls = []
    if cpu.cpu_kernels_wanted():
        real = native.attention_one
        monkeypatch.setattr(native, "attention_one", lambda *a: calls.append(1) or real(*a))
    offline = mlx_voxtral.transcribe(model, speech_40s)
    assert len(offline.token_ids) > 100
    assert not cpu.cpu_kernels_wanted() or len(calls) >= len(offline.token_ids)
    audio = load_audio(speech_40s)
    events, result = _collect(stream_transcribe(model, _chunks(audio, _random_sizes(7))))
    assert result.token_ids == offline.token_ids
    fp32 = mlx_voxtral.load(tiny_checkpoint, dtype=mx.float32)
    assert fp32.decoder.cache_dtype is None and fp32.encoder.cache_dtype is None


def test_kv_cache_keeps_only_its_window():
    """A block longer than the window leaves the cache holding a copy of the window, not a
    view that keeps the whole block's keys alive (the encoder's 30 s blocks are 1500 keys
    for a 750-key window)."""
    from mlx_voxtral.cache import KVCache

    cache = KVCache(window=100)
    keys = mx.random.normal((1, 8, 1000, 64))
    values = mx.random.normal((1, 8, 1000, 64))
    all_k, all_v, mask = cache.update_and_fetch(keys, values)
    mx.eval(all_k, all_v)
    assert mask.shape == (1000, 1000) and all_k.shape[2] == 1000
    assert np.array_equal(np.array(cache.keys), np.array(keys[:, :, -100:]))
    block = keys.nbytes + values.nbytes + all_k.nbytes + all_v.nbytes
    before = mx.get_active_memory()
    del keys, values, all_k, all_v
    assert before - mx.get_active_memory() >= 0.9 * block  # the block is freed, the window stays
    assert cache.nbytes == 2 * 8 * 100 * 64 * 4
    k, _, mask = cache.update_and_fetch(mx.zeros((1, 8, 3, 64)), mx.zeros((1, 8, 3, 64)))
    assert k.shape[2] == 102 and mask.shape == (3, 102)  # 99 kept keys + 3 new, banded


@pytest.mark.parametrize("dtype", [mx.bfloat16, None])
def test_host_kv_cache_matches_kv_cache(dtype):
    """The CPU layers' numpy cache against the MLX one over prompts, decode steps past the
    ring's wrap and a block longer than the window: the same keys in the same slots,
    rounded alike, and the same keys for many queries to attend to."""
    from mlx_voxtral.cache import HostKVCache, KVCache

    rng = np.random.default_rng(5)
    host, ref = HostKVCache(window=300, dtype=dtype), KVCache(window=300, dtype=dtype)
    as_f32 = lambda t: np.array(t.astype(mx.float32))[0]  # noqa: E731
    for n in [7, 1, 1, 40, *[1] * 290, 5, *[1] * 20, 400, 1, 2]:
        k, v = (rng.standard_normal((4, n, 16)).astype(np.float32) for _ in range(2))
        if n == 1:
            host.append(k[:, 0], v[:, 0])
            ref.update_and_fetch(mx.array(k)[None], mx.array(v)[None])
            m = len(ref)
            got = [host._load(t[:, :m]) for t in (host.keys, host.values)]
            want = [as_f32(t[:, :, :m]) for t in (ref.keys, ref.values)]
        else:
            got = list(host.extend(k, v))
            want = [as_f32(t) for t in ref.update_and_fetch(mx.array(k)[None], mx.array(v)[None])[:2]]
        assert host.offset == ref.offset and len(host) == len(ref)
        for g, w in zip(got, want):
            assert np.array_equal(g, w)
    assert host.nbytes == 2 * host.keys.nbytes and host.keys.shape[1] == 300  # window of a copy


def test_bf16_rounding_matches_mlx():
    """float32 -> bfloat16 in numpy (the host caches) rounds as MLX does, ties to even."""
    from mlx_voxtral.cache import _from_bf16, _to_bf16

    x = np.random.default_rng(6).standard_normal(100000).astype(np.float32) * 10
    ties = (np.arange(1, 2000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # halfway cases
    x = np.concatenate([x, ties, -ties, np.float32([0, -0.0, 1e-40, 3e38, np.inf, -np.inf])])
    ref = np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32))
    assert np.array_equal(_from_bf16(_to_bf16(x)), ref)
