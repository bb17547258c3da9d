"""Choosing a backend: what runs on each, what an import does, how users name dtypes."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import pytest

import mlx_voxtral
from mlx_voxtral import InvalidRequestError, cpu
from mlx_voxtral.cache import Cache
from mlx_voxtral.decoder import Decoder
from mlx_voxtral.encoder import AudioEncoder

needs_cpu = pytest.mark.skipif(not cpu.available(), reason="no CPU backend here")


def _python(code: str, *args: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "MLX_VOXTRAL_BACKEND"}
    return subprocess.run([sys.executable, "-c", code, *args], env={**environment, **env},
                          capture_output=True, text=True, timeout=300)


def test_mlx_backend_runs_the_plain_modules_and_no_native_code(tiny_checkpoint, speech_5s):
    """The Mac configuration on this machine: the model's own MLX modules and caches, and
    nothing of the CPU backend built, loaded or mapped into the process."""
    code = r"""
import sys
import mlx_voxtral
m = mlx_voxtral.load(sys.argv[1], backend="mlx")
r = mlx_voxtral.transcribe(m, sys.argv[2])
maps = open("/proc/self/maps").read()
print(m.backend, type(m.encoder).__name__, type(m.decoder).__name__, type(m.adapter).__name__,
      "mlx_voxtral.cpu.native" in sys.modules, "native-" in maps, "libopenblas.so" in maps,
      len(r.token_ids) > 0)
"""
    out = _python(code, str(tiny_checkpoint), str(speech_5s))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["mlx", "AudioEncoder", "Decoder", "AudioAdapter", "False", "False", "False", "True"]


def test_model_and_cache_types_per_backend(tiny_checkpoint):
    plain = mlx_voxtral.load(tiny_checkpoint, backend="mlx")
    assert type(plain.encoder) is AudioEncoder and type(plain.decoder) is Decoder
    cache = plain.make_cache(plain.tokenizer.max_prompt_length)
    assert isinstance(cache, Cache) and type(cache.encoder).__module__ == "mlx_voxtral.cache"
    if cpu.available():
        fast = mlx_voxtral.load(tiny_checkpoint, backend="cpu")
        assert type(fast.decoder).__module__ == "mlx_voxtral.cpu.layers"
        assert type(fast.make_cache(63).decoder).__module__ == "mlx_voxtral.cpu.cache"


@needs_cpu
def test_auto_and_the_environment_variable(tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("MLX_VOXTRAL_BACKEND", raising=False)
    assert mlx_voxtral.load(tiny_checkpoint).backend == "cpu"  # Linux, kernels built
    assert mlx_voxtral.load(tiny_checkpoint, backend="auto").backend == "cpu"
    monkeypatch.setenv("MLX_VOXTRAL_BACKEND", "mlx")
    assert mlx_voxtral.load(tiny_checkpoint).backend == "mlx"
    assert mlx_voxtral.load(tiny_checkpoint, backend="cpu").backend == "cpu"  # the argument wins
    monkeypatch.setenv("MLX_VOXTRAL_BACKEND", "gpu")
    with pytest.raises(InvalidRequestError, match="backend must be one of auto, mlx, cpu, got 'gpu'"):
        mlx_voxtral.load(tiny_checkpoint)


def test_unavailable_cpu_backend_is_explained(tiny_checkpoint, tmp_path):
    """Without a C compiler the CPU backend cannot be built: asked for, it says why; "auto"
    runs the MLX modules."""
    code = r"""
import sys, mlx_voxtral
print(mlx_voxtral.load(sys.argv[1]).backend)
try:
    mlx_voxtral.load(sys.argv[1], backend="cpu")
except mlx_voxtral.InvalidRequestError as e:
    print(e)
"""
    out = _python(code, str(tiny_checkpoint), CC=str(tmp_path / "no-such-compiler"), PATH="/nonexistent",
                  XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "mlx"
    assert lines[1].startswith("backend 'cpu' cannot run here: ")


def test_import_does_nothing_and_its_order_does_not_matter(tiny_checkpoint, speech_5s):
    """``import mlx_voxtral`` builds, loads and sets nothing; ``import mlx.core`` first or
    last makes no difference to what the CPU backend then calls, or to the tokens."""
    code = r"""
import os, sys
first = sys.argv[3]
names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_CORETYPE")
before = {k: os.environ.get(k) for k in names}
if first == "mlx":
    import mlx.core
import mlx_voxtral
if first != "mlx":
    import mlx.core
from mlx_voxtral.cpu import native
after = {k: os.environ.get(k) for k in names}
print(native.library is None, native.blas is None, after == before)
m = mlx_voxtral.load(sys.argv[1])
print(m.backend, native.blas, mlx_voxtral.transcribe(m, sys.argv[2]).token_ids)
"""
    runs = [_python(code, str(tiny_checkpoint), str(speech_5s), first) for first in ("mlx", "mlx_voxtral")]
    for out in runs:
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0] == "True True True"
    assert runs[0].stdout.splitlines()[1] == runs[1].stdout.splitlines()[1]


@pytest.mark.parametrize("name, dtype", [("float32", mx.float32), ("bfloat16", mx.bfloat16), ("float16", mx.float16)])
def test_dtypes_by_name(tiny_checkpoint, name, dtype):
    model = mlx_voxtral.load(tiny_checkpoint, dtype=name, backend="mlx")
    assert model.decoder.layers[0].attention.wq.weight.dtype == dtype
    assert model.dtype == dtype


@pytest.mark.parametrize("bad", ["int8", "fp32", 32, mx.int8])
def test_bad_dtype_is_a_typed_error(tiny_checkpoint, bad):
    with pytest.raises(InvalidRequestError, match="dtype must be one of float32, float16, bfloat16"):
        mlx_voxtral.load(tiny_checkpoint, dtype=bad)
