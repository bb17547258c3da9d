"""Shared fixtures: random checkpoints in the native layout, synthesized speech, references."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_voxtral  # noqa: F401  (first: it puts the system BLAS in front of MLX's)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Speech recognition runs locally on a laptop, without sending audio anywhere.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "Seven silver swans swam silently seaward in the early morning light.",
    "A journey of a thousand miles begins with a single step, said the old philosopher.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her Wednesday at the train station.",
]


def make_checkpoint(out: Path, *extra: str) -> Path:
    """Run the project's generator script exactly as a user would."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_random_checkpoint.py"), "--preset", "tiny",
         "--out", str(out), *extra],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def espeak(text: str, path: Path) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


def sox(*args: str) -> None:
    if shutil.which("sox") is None:
        pytest.skip("sox is not installed")
    subprocess.run(["sox", *args], check=True, capture_output=True)


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audio")


@pytest.fixture(scope="session")
def speech_5s(audio_dir) -> Path:
    """About 5 s of espeak-ng speech (22.05 kHz mono wav)."""
    return espeak(" ".join(SENTENCES[:1] + ["Speech recognition on a laptop."]), audio_dir / "speech_5s.wav")


@pytest.fixture(scope="session")
def speech_40s(audio_dir) -> Path:
    """About 40 s of speech: longer than the encoder's 15 s attention window."""
    return espeak(" ".join(SENTENCES), audio_dir / "speech_40s.wav")


@pytest.fixture(scope="session")
def silence_2s(audio_dir) -> Path:
    path = audio_dir / "silence_2s.wav"
    sox("-n", "-r", "16000", "-c", "1", "-b", "16", str(path), "trim", "0", "2")
    return path


@pytest.fixture(scope="session")
def speech_stereo_44k(audio_dir, speech_5s) -> Path:
    """The 5 s speech as a 44.1 kHz stereo file (channels differ slightly)."""
    path = audio_dir / "speech_stereo_44k.wav"
    sox(str(speech_5s), "-r", "44100", "-c", "2", str(path), "remix", "1", "1v0.8")
    return path


@pytest.fixture(scope="session")
def model_fp32(tiny_checkpoint):
    import mlx.core as mx

    import mlx_voxtral

    return mlx_voxtral.load(tiny_checkpoint, dtype=mx.float32)


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from reference import Reference

    return Reference(tiny_checkpoint)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the error relative to the reference's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
