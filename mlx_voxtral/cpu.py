"""Linear, embedding and attention layers that run fast on MLX's CPU backend (Linux).

On CPU the model keeps its matmul weights in their storage precision (bfloat16, or 4/8-bit
quantized: that is what bounds memory traffic) and computes in float32, through the native
code of ``mlx_voxtral.native``:

* a few rows (decoding: one per stream, up to ``native.FEW_ROWS``) stream the weights once;
* many rows (the encoder over a block of audio, a prompt) convert the weights to float32
  a cache-sized tile at a time and multiply each tile with the BLAS (measured 5-30x faster
  than MLX's quantized CPU matmul for 50-1500 rows);
* attention over more than one query runs in a native sliding-window kernel, and the
  SwiGLU gate on all cores.

The kernels run outside MLX's graph: the input is evaluated, multiplied through a
zero-copy view, and the result wrapped as a new array. ``use_cpu_kernels`` switches a
loaded model's layers to these classes (same parameters, different ``__call__``).
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import native
from .cache import KVCache
from .layers import Attention, FeedForward


def _outside_graph(fn: Callable[[np.ndarray], np.ndarray], x: mx.array) -> mx.array:
    """Apply a numpy function to ``x`` as float32 rows and wrap the result."""
    x = x.astype(mx.float32)
    mx.eval(x)
    y = fn(np.array(x, copy=False).reshape(-1, x.shape[-1]))
    return mx.array(y).reshape(*x.shape[:-1], y.shape[-1])


def _half_matmul(x: mx.array, weight: mx.array) -> mx.array:
    if weight.dtype == mx.bfloat16:
        return _outside_graph(lambda rows: native.bf16_matmul(rows, weight), x)
    return x @ weight.astype(x.dtype).T


def _quantized_matmul(layer, x: mx.array) -> mx.array:
    if layer.mode == "affine" and native.quantized_supported(layer.group_size, layer.bits):
        return _outside_graph(
            lambda rows: native.quantized_matmul(
                rows, layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits
            ),
            x,
        )
    w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits, mode=layer.mode)
    return x @ w.astype(x.dtype).T


class CPULinear(nn.Linear):
    """``nn.Linear`` with half-precision weights and float32 activations."""

    def __call__(self, x: mx.array) -> mx.array:
        y = _half_matmul(x, self.weight)
        return y + self.bias if "bias" in self else y


class CPUQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` with float32 activations."""

    def __call__(self, x: mx.array) -> mx.array:
        y = _quantized_matmul(self, x)
        return y + self.bias if "bias" in self else y


class CPUAttention(Attention):
    """``Attention`` in native kernels: many queries (the encoder's blocks, a prompt) in the
    sliding-window kernel, about 25x faster than MLX's CPU fallback at 1500 x 2250 and
    never holding the [queries, keys] score matrix; one query (a decode step) over a
    bfloat16 cache straight from it (5 ms against MLX's 16 ms over a float32 copy, 32
    heads x 8192 keys)."""

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache: KVCache) -> mx.array:
        if q.shape[2] == 1:
            if cache.keys.dtype != mx.bfloat16 or not native.attention_supported(self.head_dim):
                return super().attend(q, k, v, mask, cache)
            # the cache's whole buffers (k and v are views of their first len(cache) keys)
            q = q.astype(mx.float32)
            mx.eval(q, cache.keys, cache.values)
            out = native.attention_one(
                np.array(q, copy=False)[0, :, 0], cache.keys[0], cache.values[0], len(cache), self.scale
            )
            return mx.array(out)[None, None]
        if not native.attention_supported(self.head_dim):
            return super().attend(q, k, v, mask, cache)
        dtype = q.dtype
        q, k, v = (t.astype(mx.float32) for t in (q, k, v))
        mx.eval(q, k, v)
        out = native.attention(*(np.array(t, copy=False)[0] for t in (q, k, v)), self.scale, cache.window)
        return mx.array(out)[None].astype(dtype)


class CPUFeedForward(FeedForward):
    """``FeedForward`` with the SwiGLU gate on all cores (MLX's CPU elementwise ops use one:
    106 ms against 12 ms for the encoder's 1500 x 5120 gate)."""

    def __call__(self, x: mx.array) -> mx.array:
        a, b = self.w1(x), self.w3(x)
        dtype = a.dtype
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        mx.eval(a, b)
        h = mx.array(native.silu_mul(np.array(a, copy=False), np.array(b, copy=False)))
        return self.w2(h.astype(dtype))


class CPUEmbedding(nn.Embedding):
    """``nn.Embedding`` whose tied LM head (``as_linear``) uses the fast paths."""

    def as_linear(self, x: mx.array) -> mx.array:
        return _half_matmul(x, self.weight)


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return _quantized_matmul(self, x)


_CPU_CLASSES = {
    nn.Linear: CPULinear,
    nn.QuantizedLinear: CPUQuantizedLinear,
    nn.Embedding: CPUEmbedding,
    nn.QuantizedEmbedding: CPUQuantizedEmbedding,
    Attention: CPUAttention,
    FeedForward: CPUFeedForward,
}


def cpu_kernels_wanted() -> bool:
    """Linux, computing on the CPU, native kernels built, not switched off."""
    return (
        sys.platform.startswith("linux")
        and mx.default_device().type == mx.DeviceType.cpu
        and os.environ.get("MLX_VOXTRAL_CPU_KERNELS", "1").lower() not in ("0", "false", "off", "no")
        and native.kernels_available()
    )


def use_cpu_kernels(model: nn.Module) -> int:
    """Switch the model's attention and its half-precision and quantized matmul layers to
    the CPU classes.

    Float32 linear layers are left alone (MLX already multiplies them with the BLAS).
    Returns the number of modules switched.
    """
    switched = 0
    for _, module in model.named_modules():
        cls = _CPU_CLASSES.get(type(module))
        if cls is None:
            continue
        if cls in (CPULinear, CPUEmbedding) and module.weight.dtype == mx.float32:
            continue
        module.__class__ = cls
        switched += 1
    return switched
