"""Numerical parity with Hugging Face transformers' voxtral_realtime (float32, same weights)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import mlx_voxtral
from mlx_voxtral.audio import load_audio, log_mel_spectrogram
from mlx_voxtral.stream import Stream

from conftest import rel_err


def _our_mel(model, audio, delay_ms=None):
    return log_mel_spectrogram(model.tokenizer.pad_audio(audio, delay_ms))


def test_log_mel_matches_transformers(reference, speech_5s, model_fp32):
    """Same padded samples into both front ends. (transformers' processor itself first
    round-trips the audio through a 16-bit WAV for mistral-common, so it is bypassed.)"""
    padded = model_fp32.tokenizer.pad_audio(load_audio(speech_5s))
    ref = reference.feature_extractor(padded, sampling_rate=16000, return_tensors="np")
    ref = ref["input_features"][0]  # [128, frames]
    ours = np.array(log_mel_spectrogram(padded)).T
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4


def test_log_mel_of_digital_silence_is_constant():
    mel = np.array(log_mel_spectrogram(np.zeros(16000, np.float32)))
    assert mel.shape == (100, 128)
    assert np.all(mel == np.float32(-0.625))


def test_streaming_mel_matches_offline(model_fp32, speech_5s):
    audio = load_audio(speech_5s)
    offline = np.array(_our_mel(model_fp32, audio))
    stream = Stream(model_fp32)
    rng = np.random.default_rng(0)
    i = 0
    while i < len(audio):
        n = int(rng.integers(1, 5000))
        stream.push(audio[i : i + n])
        i += n
    stream.finish()
    frames = []
    while (mel := stream.take_mel(7)) is not None:
        frames.append(np.array(mel))
    np.testing.assert_allclose(np.concatenate(frames), offline, atol=1e-5, rtol=0)


@torch.no_grad()
def test_encoder_adapter_and_logits_match_transformers(reference, model_fp32, speech_40s):
    """Encoder and adapter outputs on 40 s (beyond the 750-frame window) and the logits of
    the prompt plus 60 teacher-forced steps, each within 1e-3 relative error."""
    model = model_fp32
    audio = load_audio(speech_40s)
    inputs = reference.inputs(audio)
    hf = reference.model.model
    ref_enc = hf.audio_tower(inputs["input_features"]).last_hidden_state[0].numpy()
    ref_adapter = hf.get_audio_features(inputs["input_features"]).pooler_output[0].numpy()
    assert ref_enc.shape[0] > 2 * model.args.encoder.sliding_window

    mel = _our_mel(model, audio)
    conv_caches, enc_caches = model.encoder.make_cache()
    frames = model.encoder.conv_stem(mel[None], conv_caches)
    enc = model.encoder(frames, [enc_caches], [frames.shape[1]])
    adapter = model.adapter(enc)
    assert rel_err(enc[0], ref_enc) <= 1e-3
    assert rel_err(adapter[0], ref_adapter) <= 1e-3

    # The same through the streaming machinery, in 1 s blocks of whole tokens.
    stream = Stream(model)
    stream.push(audio)
    stream.finish()
    blocks = []
    while (m := stream.take_mel(12)) is not None:
        blocks += model.embed_audio([m], [stream.conv_caches], [stream.encoder_caches])
    assert rel_err(mx.concatenate(blocks), ref_adapter) <= 1e-3

    # Teacher-forced logits: the prompt, then 60 steps fed with the reference's tokens.
    forced = reference.generate(audio)[:60]
    prompt = inputs["input_ids"][0].tolist()
    ids = torch.tensor([prompt + forced])
    n = ids.shape[1]
    conv = hf.audio_tower.embedder(inputs["input_features"])
    ref_logits = reference.model(
        input_ids=ids,
        encoder_inputs_embeds=conv[:, : 4 * n],
        num_delay_tokens=inputs["num_delay_tokens"],
    ).logits[0, len(prompt) - 1 :].numpy()

    embeds = mx.concatenate(blocks)
    caches = model.decoder.make_cache()
    d = model.tokenizer.num_delay_tokens()
    ours = [model([embeds[: len(prompt)]], [mx.array(prompt)], [caches], [d])[0]]
    for p, token in enumerate(forced, start=len(prompt)):
        ours.append(model([embeds[p : p + 1]], [mx.array([token])], [caches], [d])[0])
    ours = np.stack([np.array(o) for o in ours])
    assert ours.shape == ref_logits.shape == (61, model.args.vocab_size)
    assert rel_err(ours, ref_logits) <= 1e-3
    assert (ours.argmax(-1) == ref_logits.argmax(-1)).all()


def _check_greedy_ids(model, reference, path, delay_ms=None):
    """Greedy ids from the file, ours vs the reference (which never feeds the last audio
    position: it produces one token fewer; see README "Decoding")."""
    ours = mlx_voxtral.transcribe(model, path, delay_ms=delay_ms)
    ref = reference.generate(load_audio(path), delay_ms)
    eos = model.tokenizer.eos_id
    if ref and ref[-1] == eos:
        assert ours.token_ids == ref
    else:
        assert ours.token_ids[:-1] == ref
        assert len(ours.token_ids) == len(ref) + 1
    return ours


@pytest.mark.parametrize("name", ["speech_5s", "speech_40s", "silence_2s", "speech_stereo_44k"])
def test_greedy_ids_match_transformers(name, request, model_fp32, reference):
    path = request.getfixturevalue(name)
    result = _check_greedy_ids(model_fp32, reference, path)
    assert result.finish_reason == "end_of_audio"
    assert result.text == model_fp32.tokenizer.decode(result.token_ids).strip()


def test_non_default_delay_matches_transformers(model_fp32, reference, speech_5s):
    result = _check_greedy_ids(model_fp32, reference, speech_5s, delay_ms=960)
    assert result.prompt_tokens == 1 + 32 + 12
    default = mlx_voxtral.transcribe(model_fp32, speech_5s)
    assert result.token_ids != default.token_ids


def test_bfloat16_agreement(tiny_checkpoint, model_fp32, speech_40s, capsys):
    """bf16 cannot be token-exact with fp32; report how often it agrees."""
    model = mlx_voxtral.load(tiny_checkpoint, dtype=mx.bfloat16)
    fp32 = mlx_voxtral.transcribe(model_fp32, speech_40s).token_ids
    bf16 = mlx_voxtral.transcribe(model, speech_40s).token_ids
    n = min(len(fp32), len(bf16))
    agree = sum(a == b for a, b in zip(fp32[:n], bf16[:n])) / max(len(fp32), 1)
    with capsys.disabled():
        print(f"\nbf16 vs fp32 greedy-token agreement on 40 s of speech: {agree:.1%} ({n} tokens)")
    assert agree > 0.5
