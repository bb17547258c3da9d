"""Prompt, padding and detokenisation agree with mistral-common's transcription encoding."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import soundfile as sf
from mistral_common.protocol.transcription.request import StreamingMode, TranscriptionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mlx_voxtral import InvalidRequestError
from mlx_voxtral.tokenizer import StreamingDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint) -> Tokenizer:
    return Tokenizer(tiny_checkpoint / "tekken.json")


@pytest.fixture(scope="module")
def mistral(tiny_checkpoint) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(tiny_checkpoint / "tekken.json"))


def _encode(mistral, audio, delay_ms=None):
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="FLOAT")
    request = TranscriptionRequest(
        audio=base64.b64encode(buf.getvalue()).decode(),
        streaming=StreamingMode.OFFLINE,
        target_streaming_delay_ms=delay_ms,
    )
    return mistral.encode_transcription(request)


@pytest.mark.parametrize("delay_ms", [None, 80, 480, 960, 2400])
@pytest.mark.parametrize("n_samples", [1, 1280, 16000, 16001])
def test_prompt_and_padding_match_encode_transcription(tokenizer, mistral, delay_ms, n_samples):
    audio = np.random.default_rng(n_samples).uniform(-0.5, 0.5, n_samples).astype(np.float32)
    ref = _encode(mistral, audio, delay_ms)
    assert tokenizer.prompt(delay_ms) == ref.tokens
    padded = tokenizer.pad_audio(audio, delay_ms)
    np.testing.assert_array_equal(padded, ref.audios[0].audio_array)
    d = (delay_ms or 480) // 80
    assert len(ref.tokens) == 1 + 32 + d
    # N = 32 + ceil(n / 1280) + d + 11 positions, 8 mel frames each
    assert len(padded) == 1280 * (32 + -(-n_samples // 1280) + d + 11)


def test_special_ids(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenizer.streaming_pad_id == 32 and tokenizer.streaming_word_id == 33
    assert tokenizer.samples_per_token == 1280 and tokenizer.mel_frames_per_token == 8
    assert tokenizer.default_delay_ms == 480 and tokenizer.num_delay_tokens() == 6


@pytest.mark.parametrize("bad", [0, 40, 81, 2480, -80, 100.5, float("nan"), "480", True])
def test_bad_delays(tokenizer, bad):
    with pytest.raises(InvalidRequestError, match="multiple of 80"):
        tokenizer.prompt(bad)


def test_decode_drops_every_special_token(tokenizer):
    hello = tokenizer.tekken.encode("Hello world", bos=False, eos=False)
    ids = [1, 32, 33] + hello[:1] + [33, 32] + hello[1:] + [2]
    assert tokenizer.decode(ids) == "Hello world"


def test_streaming_detokenizer_keeps_multibyte_characters(tokenizer):
    text = "Grüße, 東京 🎤 done"
    ids = tokenizer.tekken.encode(text, bos=False, eos=False)
    # make sure the test is meaningful: some token is not valid UTF-8 on its own
    pieces = [tokenizer.token_bytes(i) for i in ids]
    assert any(_invalid_utf8(p) for p in pieces)
    detok = StreamingDetokenizer(tokenizer)
    out = "".join(detok.add(i) for i in [32] + ids + [33, 2]) + detok.flush()
    assert out == text
    assert "\ufffd" not in out


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True
