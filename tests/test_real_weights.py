"""Opt-in quality checks with the real weights.

    MLX_VOXTRAL_MODEL=mistralai/Voxtral-Mini-4B-Realtime-2602 pytest -m real_weights

``MLX_VOXTRAL_MODEL`` names a checkpoint folder or Hugging Face repo id; without it these
tests are skipped.
"""

from __future__ import annotations

import os
import re

import pytest

import mlx_voxtral

from conftest import SENTENCES, espeak

MODEL = os.environ.get("MLX_VOXTRAL_MODEL")

pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(not MODEL, reason="set MLX_VOXTRAL_MODEL to a real checkpoint to run"),
]


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


@pytest.fixture(scope="module")
def real_model():
    return mlx_voxtral.load(MODEL)


@pytest.mark.parametrize("index", range(len(SENTENCES)))
def test_word_error_rate(real_model, tmp_path, index):
    jiwer = pytest.importorskip("jiwer")
    text = SENTENCES[index]
    path = espeak(text, tmp_path / "sentence.wav")
    result = mlx_voxtral.transcribe(real_model, path)
    wer = jiwer.wer(_normalize(text), _normalize(result.text))
    print(f"\nWER {wer:.1%}: {result.text!r}")
    assert wer < 0.15
