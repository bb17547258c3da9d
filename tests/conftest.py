"""Shared fixtures: random checkpoints in the native layout, synthesized speech, references."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx  # before mlx_voxtral, as most MLX users write it
import numpy as np
import pytest

import mlx_voxtral

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


def rewrite_tensors(file: Path, edit, out: Optional[Path] = None) -> None:
    """Write the tensors of the safetensors ``file``, changed by ``edit(weights)``, to ``out``
    (default: ``file`` itself)."""
    weights = dict(mx.load(str(file)))
    edit(weights)
    mx.save_safetensors(str(out or file), weights)


def require_cpu_backend() -> None:
    """Skip the test where the CPU backend cannot run."""
    from mlx_voxtral import cpu

    if not cpu.available():
        pytest.skip(f"no CPU backend here: {cpu.unavailable_reason()}")


# The model-level suites run on both backends: "cpu" (the Linux CPU backend) and "mlx" (the
# plain MLX modules, what a Mac runs; here on MLX's CPU device, in the Mac's configuration).
@pytest.fixture(scope="session", params=["cpu", "mlx"])
def backend(request) -> str:
    if request.param == "cpu":
        require_cpu_backend()
    return request.param


@pytest.fixture(scope="session")
def model_fp32(tiny_checkpoint):
    """The default backend's model in float32 (for the suites that do not test backends)."""
    return mlx_voxtral.load(tiny_checkpoint, dtype=mx.float32)


@pytest.fixture(scope="session")
def fp32(tiny_checkpoint, backend):
    """The backend's model in float32: token-exact with the reference."""
    return mlx_voxtral.load(tiny_checkpoint, dtype=mx.float32, backend=backend)


@pytest.fixture(scope="session")
def eos_checkpoint(tiny_checkpoint, tmp_path_factory, model_fp32, speech_5s):
    """A checkpoint whose EOS embedding points where a token emitted mid-speech points,
    so the model emits EOS in the middle of the audio (its decoder restarts)."""
    baseline = mlx_voxtral.transcribe(model_fp32, speech_5s).token_ids
    path = tmp_path_factory.mktemp("eos") / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    name = "mm_streams_embeddings.embedding_module.tok_embeddings.weight"

    def point_eos(weights):
        emb = weights[name]
        emb[2] = emb[baseline[len(baseline) // 3]] * 1.05
        weights[name] = emb

    rewrite_tensors(path / "consolidated.safetensors", point_eos)
    return path


@pytest.fixture(scope="session")
def eos_model(eos_checkpoint, backend):
    return mlx_voxtral.load(eos_checkpoint, dtype=mx.float32, backend=backend)


@pytest.fixture(scope="session")
def half(tiny_checkpoint, backend):
    """The backend's model as people run it unquantized: the checkpoint's bf16 weights; on the
    MLX backend with bf16 activations (a Mac), on the CPU backend with float32 activations."""
    return mlx_voxtral.load(tiny_checkpoint, backend=backend)


@pytest.fixture(scope="session")
def quantized(tiny_checkpoint, backend):
    """The backend's 8- and 4-bit models (quantized while loading)."""
    return {bits: mlx_voxtral.load(tiny_checkpoint, quantize=bits, backend=backend) for bits in (8, 4)}


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from reference import Reference

    return Reference(tiny_checkpoint)


# A step whose reference top-2 logit margin is below this is a near-tie: beyond it, any
# precision but float32 may take the other token and legitimately diverge.
TIE_MARGIN = {"bf16": 0.5, "8": 1.0, "4": 4.0}


def tie_aware(ids: list[int], ref_ids: list[int], margins: list[float], threshold: float) -> tuple[int, int]:
    """``(n, horizon)``: ``ids`` agree with the float32 reference ``ref_ids`` on their first
    ``n`` tokens; ``horizon`` is the first step whose reference margin is below
    ``threshold`` (or the reference's length). Agreement is expected up to the horizon."""
    horizon = next((i for i, m in enumerate(margins) if m < threshold), len(margins))
    n = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
    return n, horizon


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the error relative to the reference's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
