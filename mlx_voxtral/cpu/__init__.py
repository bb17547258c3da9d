"""The Linux CPU backend: mlx_voxtral's C kernels over the system BLAS, on numpy rows.

MLX on Apple Silicon runs the model's plain MLX modules (Metal, bfloat16 or
``mx.quantized_matmul``) and needs none of this. MLX's Linux CPU wheel, though, links a
reference BLAS and multiplies half-precision and quantized weights in scalar loops, so on Linux
``load`` can put this backend's encoder, adapter and decoder in place of the MLX modules
(``install``): same parameters, computed by ``mlx_voxtral.cpu.layers``.

Its dtype policy: matmul weights keep their storage precision (bfloat16, or quantized: that is
what bounds memory traffic), every other parameter is float32, so activations are float32; keys
and values are stored in bfloat16 when the weights are half precision or quantized (half the
memory and reads of float32), rounded before use.

Nothing happens at import: ``available()`` builds and loads the kernels the first time a model
asks for this backend.
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import native

# every parameter but the matmul weights (and quantization scales/biases)
FLOAT_DTYPE = mx.float32


def available() -> bool:
    """Whether the backend can run here (Linux, a C compiler, OpenMP and a BLAS): builds and
    loads the kernels on first call."""
    return native.load()


def unavailable_reason() -> str:
    return native.error() or "the CPU backend's kernels are not loaded"


def _half_or_quantized(model: nn.Module) -> bool:
    wk = model.decoder.layers[0].attention.wk
    return isinstance(wk, nn.QuantizedLinear) or wk.weight.dtype != mx.float32


def mlx_fallback_layers(model: nn.Module) -> dict[str, str]:
    """The quantized layers the native kernels do not take (they run 4- and 8-bit affine
    weights in groups of whole blocks), by path, with their format: ``"3-bit affine, group
    64"``. The CPU backend multiplies these with MLX (dequantized per call: correct, slower)."""
    from .layers import _native_format

    return {
        path: f"{m.bits}-bit {m.mode}, group {m.group_size}"
        for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and _native_format(m) is None
    }


def _warn_mlx_fallback(model: nn.Module) -> None:
    """One ``RuntimeWarning`` at load naming the formats (and how many layers) that fall back
    to MLX's matmul; nothing when the native kernels take every quantized layer."""
    formats: dict[str, int] = {}
    for fmt in mlx_fallback_layers(model).values():
        formats[fmt] = formats.get(fmt, 0) + 1
    if formats:
        which = ", ".join(f"{n} layers at {fmt}" for fmt, n in formats.items())
        warnings.warn(
            f"the CPU backend's native kernels run 4- and 8-bit affine weights only: {which} are "
            "multiplied by MLX instead (dequantized on each call: correct, but slower)",
            RuntimeWarning, stacklevel=3,
        )


def install(model: nn.Module) -> None:
    """Put the CPU backend's encoder, adapter and decoder in the model's place (the same
    parameters; nothing is copied)."""
    from .layers import CPUAdapter, CPUDecoder, CPUEncoder

    if not native.kernels_available():
        raise RuntimeError("the CPU backend's kernels are not loaded (call available() first)")
    _warn_mlx_fallback(model)
    bf16 = _half_or_quantized(model)
    model.encoder = CPUEncoder(model.encoder, bf16)
    model.adapter = CPUAdapter(model.adapter)
    model.decoder = CPUDecoder(model.decoder, bf16)
    model.encode_tokens = 375  # 30 s per encoder pass: the BLAS wants many rows; the host caches take any
