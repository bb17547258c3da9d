"""The offline ``transcribe`` API on both backends: inputs, results, sampling, stopping, typed errors."""

from __future__ import annotations

import io

import numpy as np
import pytest

import mlx_voxtral
from mlx_voxtral import AudioError, InvalidRequestError, UnsupportedAudioFormatError
from mlx_voxtral.audio import load_audio


@pytest.fixture(scope="module")
def baseline(fp32, speech_5s):
    return mlx_voxtral.transcribe(fp32, speech_5s)


def test_result_fields(baseline, fp32, speech_5s):
    r = baseline
    assert r.text and r.text == fp32.tokenizer.decode(r.token_ids).strip()
    assert r.audio_duration == pytest.approx(len(load_audio(speech_5s)) / 16000)
    assert r.delay_ms == 480 and r.prompt_tokens == 39
    assert r.finish_reason == "end_of_audio"
    # one token per audio position from the end of the prompt to the end of the audio
    n_positions = 32 + -(-int(r.audio_duration * 16000) // 1280) + 17
    assert len(r.token_ids) == n_positions - 39 + 1
    t = r.timings
    assert t.encode > 0 and t.prefill > 0 and t.decode > 0 and t.total > 0
    assert r.rtfx > 0 and r.rtf == pytest.approx(1 / r.rtfx) and r.decode_tokens_per_sec > 0
    with pytest.warns(DeprecationWarning, match="rtfx"):
        assert r.real_time_factor == r.rtfx


def test_every_input_kind_gives_the_same_ids(baseline, fp32, speech_5s):
    data = speech_5s.read_bytes()
    for source in (str(speech_5s), f"file://{speech_5s}", data, io.BytesIO(data), load_audio(speech_5s)):
        assert mlx_voxtral.transcribe(fp32, source).token_ids == baseline.token_ids


def test_max_tokens_caps_text_tokens(baseline, fp32, speech_5s):
    r = mlx_voxtral.transcribe(fp32, speech_5s, max_tokens=3)
    assert r.finish_reason == "length"
    assert sum(fp32.tokenizer.is_text(i) for i in r.token_ids) == 3
    assert r.token_ids == baseline.token_ids[: len(r.token_ids)]


def test_sampling_is_seeded(fp32, speech_5s, baseline):
    a = mlx_voxtral.transcribe(fp32, speech_5s, temperature=0.8, seed=1)
    b = mlx_voxtral.transcribe(fp32, speech_5s, temperature=0.8, seed=1)
    c = mlx_voxtral.transcribe(fp32, speech_5s, temperature=0.8, seed=2)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert a.token_ids != baseline.token_ids


def test_sampling_options_filter_the_draw(fp32, speech_5s, baseline):
    """mlx-lm's sampling chain: top_k=1 (or a tiny top_p) leaves only the argmax to draw."""
    for options in ({"top_k": 1}, {"top_p": 1e-9}, {"min_p": 1.0}):
        r = mlx_voxtral.transcribe(fp32, speech_5s, temperature=1.0, seed=3, **options)
        assert r.token_ids == baseline.token_ids, options
    loose = mlx_voxtral.transcribe(fp32, speech_5s, temperature=1.0, seed=3, top_k=50, top_p=0.9, min_p=0.01)
    assert loose.token_ids != baseline.token_ids


def test_progress_callback(fp32, speech_40s):
    seen = []
    mlx_voxtral.transcribe(fp32, speech_40s, progress=lambda done, total: seen.append((done, total)))
    assert len(seen) >= 2
    assert all(b[0] >= a[0] for a, b in zip(seen, seen[1:]))
    assert seen[-1][0] == pytest.approx(seen[-1][1], rel=1e-3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"delay_ms": 100}, InvalidRequestError, "multiple of 80"),
        ({"delay_ms": 4800}, InvalidRequestError, "multiple of 80"),
        ({"temperature": -0.1}, InvalidRequestError, "temperature"),
        ({"temperature": float("nan")}, InvalidRequestError, "temperature"),
        ({"max_tokens": 0}, InvalidRequestError, "max_tokens"),
        ({"temperature": 1.0, "top_p": 1.5}, InvalidRequestError, "top_p"),
        ({"temperature": 1.0, "top_k": -1}, InvalidRequestError, "top_k"),
        ({"temperature": 1.0, "seed": 2**70}, InvalidRequestError, "64-bit"),
    ],
)
def test_bad_parameters(fp32, speech_5s, kwargs, error, match):
    with pytest.raises(error, match=match):
        mlx_voxtral.transcribe(fp32, speech_5s, **kwargs)


def test_bad_audio_leaves_no_state(fp32, speech_5s, baseline, tmp_path):
    nan = np.zeros(48000, np.float32)
    nan[40000] = np.nan
    bad_inputs = [
        (tmp_path / "missing.wav", AudioError, "not found"),
        (b"garbage" * 50, UnsupportedAudioFormatError, "could not decode"),
        (np.zeros(0, np.float32), AudioError, "empty"),
        (nan, AudioError, "NaN"),
    ]
    for source, error, match in bad_inputs:
        with pytest.raises(error, match=match):
            mlx_voxtral.transcribe(fp32, source)
        # the model is unaffected: the next request is exactly as before
    assert mlx_voxtral.transcribe(fp32, speech_5s).token_ids == baseline.token_ids
