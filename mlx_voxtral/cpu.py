"""Linear, embedding and attention layers that run fast on MLX's CPU backend (Linux).

On CPU the model keeps its matmul weights in their storage precision (bfloat16, or 4/8-bit
quantized: that is what bounds memory traffic) and computes in float32 (activations of
quantized layers rounded to 8 bits per group), through the native code of
``mlx_voxtral.native``:

* a few rows (decoding: one per stream, up to ``native.FEW_ROWS``) stream the weights once,
  a layer's q, k and v (and w1, w3) in one pass;
* many rows (the encoder over a block of audio, a prompt) convert the weights to float32
  a cache-sized tile at a time and multiply each tile with the BLAS (measured 5-30x faster
  than MLX's quantized CPU matmul for 50-1500 rows);
* attention over more than one query runs in a native sliding-window kernel, and the
  SwiGLU gate on all cores.

The kernels run outside MLX's graph: the input is evaluated, multiplied through a
zero-copy view, and the result wrapped as a new array; attention and feed-forward layers
stay in numpy from their input to their output (only the KV caches are MLX arrays).
``use_cpu_kernels`` switches a loaded model's layers to these classes (same parameters,
different ``__call__``).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import native
from .cache import KVCache
from .layers import Attention, FeedForward


def _outside_graph(fn: Callable[[np.ndarray], Union[np.ndarray, list]], x: mx.array):
    """Apply a numpy function to ``x`` as float32 rows and wrap its result (or results)."""
    x = x.astype(mx.float32)
    mx.eval(x)
    ys = fn(np.array(x, copy=False).reshape(-1, x.shape[-1]))
    wrap = lambda y: mx.array(y).reshape(*x.shape[:-1], y.shape[-1])  # noqa: E731
    return [wrap(y) for y in ys] if isinstance(ys, list) else wrap(ys)


def _native_format(layer) -> Optional[tuple]:
    """The native kernels' format of ``layer``'s weights (layers of one format multiply in
    one pass), or None where MLX multiplies them."""
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        if layer.mode == "affine" and native.quantized_supported(layer.group_size, layer.bits):
            return ("quantized", layer.bits, layer.group_size, layer.scales.dtype)
        return None
    return ("bf16",) if layer.weight.dtype == mx.bfloat16 else None


def _native_products(layers, rows: np.ndarray) -> list[np.ndarray]:
    """float32 ``rows`` [M, K] times each layer's weights (all of one native format)."""
    fmt = _native_format(layers[0])
    if fmt[0] == "bf16":
        return native.bf16_matmuls(rows, [layer.weight for layer in layers])
    return native.quantized_matmuls(rows, [(l.weight, l.scales, l.biases) for l in layers], fmt[2], fmt[1])


def _linear(layer, x: mx.array) -> mx.array:
    """``x @ W.T`` for a linear or embedding layer (no bias): native kernels when they take
    its weights, MLX otherwise."""
    if _native_format(layer) is not None:
        return _outside_graph(lambda rows: _native_products([layer], rows)[0], x)
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits, mode=layer.mode)
    else:
        w = layer.weight
    return x @ w.astype(x.dtype).T


def _with_bias(layer, y: mx.array) -> mx.array:
    return y + layer.bias if "bias" in layer else y


def _one_format(*layers) -> bool:
    formats = {_native_format(layer) for layer in layers}
    return len(formats) == 1 and None not in formats


class CPULinear(nn.Linear):
    """``nn.Linear`` with half-precision weights and float32 activations."""

    def __call__(self, x: mx.array) -> mx.array:
        return _with_bias(self, _linear(self, x))


class CPUQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` with float32 activations."""

    def __call__(self, x: mx.array) -> mx.array:
        return _with_bias(self, _linear(self, x))


def rope(x: np.ndarray, offset: int, theta: float) -> np.ndarray:
    """RoPE on interleaved pairs (MLX's ``traditional=True``) of float32 ``x`` [n, heads, D]
    at positions ``offset .. offset + n - 1``; angles in float64. (``mx.fast.rope`` took
    200 us for one decode position on this CPU, this ~30 us.)"""
    n, _, d = x.shape
    angles = np.arange(offset, offset + n, dtype=np.float64)[:, None] * theta ** (-np.arange(0, d, 2) / d)
    cos, sin = (f(angles).astype(np.float32)[:, None] for f in (np.cos, np.sin))
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


class CPUAttention(Attention):
    """``Attention`` outside MLX's graph but for the caches: q, k and v projected in one
    pass, RoPE in numpy; many queries (the encoder's blocks, a prompt) in the native
    sliding-window kernel, about 25x faster than MLX's CPU fallback at 1500 x 2250 and
    never holding the [queries, keys] score matrix; one query (a decode step) over a
    bfloat16 cache straight from it (5 ms against MLX's 16 ms over a float32 copy, 32
    heads x 8192 keys); the output projection straight from the result."""

    def _native(self) -> bool:
        layers = (self.wq, self.wk, self.wv, self.wo)
        return (
            _one_format(*layers[:3]) and _one_format(self.wo) and native.attention_supported(self.head_dim)
            and all(layer.bias.dtype == mx.float32 for layer in layers if "bias" in layer)
        )

    def __call__(self, x: mx.array, caches: Sequence[KVCache], lengths: Sequence[int]) -> mx.array:
        if not self._native():
            return super().__call__(x, caches, lengths)
        _, S, dim = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        x = x.astype(mx.float32)
        mx.eval(x)
        layers = (self.wq, self.wk, self.wv)
        q, k, v = (
            y + np.array(layer.bias, copy=False) if "bias" in layer else y
            for layer, y in zip(layers, _native_products(layers, np.array(x, copy=False).reshape(S, dim)))
        )
        outputs, start = [], 0
        for cache, n in zip(caches, lengths):
            rows = slice(start, start + n)
            start += n
            qs = rope(q[rows].reshape(n, H, D), cache.offset, self.rope_theta)
            ks = rope(k[rows].reshape(n, Hkv, D), cache.offset, self.rope_theta)
            vs = v[rows].reshape(n, Hkv, D)
            ks, vs, _ = cache.update_and_fetch(*(mx.array(t.transpose(1, 0, 2))[None] for t in (ks, vs)))
            if n == 1 and cache.keys.dtype == mx.bfloat16:
                # the cache's whole buffers (ks and vs are views of their first len(cache) keys)
                mx.eval(cache.keys, cache.values)
                out = native.attention_one(qs[0], cache.keys, cache.values, len(cache), self.scale)
            else:
                ks, vs = ks.astype(mx.float32), vs.astype(mx.float32)
                mx.eval(ks, vs)
                kv = (np.array(t, copy=False)[0] for t in (ks, vs))
                out = native.attention(qs.transpose(1, 0, 2), *kv, self.scale, cache.window)
            outputs.append(out.reshape(n, H * D))
        out = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        return _with_bias(self.wo, mx.array(_native_products([self.wo], out)[0])[None])


class CPUFeedForward(FeedForward):
    """``FeedForward`` with w1 and w3 in one pass, the SwiGLU gate on all cores (MLX's CPU
    elementwise ops use one: 106 ms against 12 ms for the encoder's 1500 x 5120 gate) and
    w2 straight from it, all outside MLX's graph."""

    def __call__(self, x: mx.array) -> mx.array:
        if not (_one_format(self.w1, self.w3) and _one_format(self.w2)):
            a, b = self.w1(x), self.w3(x)
            dtype = a.dtype
            a, b = a.astype(mx.float32), b.astype(mx.float32)
            mx.eval(a, b)
            h = mx.array(native.silu_mul(np.array(a, copy=False), np.array(b, copy=False)))
            return self.w2(h.astype(dtype))

        def ffn(rows: np.ndarray) -> np.ndarray:
            a, b = _native_products((self.w1, self.w3), rows)
            return _native_products([self.w2], native.silu_mul(a, b))[0]

        return _with_bias(self.w2, _outside_graph(ffn, x))


class CPUEmbedding(nn.Embedding):
    """``nn.Embedding`` whose tied LM head (``as_linear``) uses the fast paths."""

    def as_linear(self, x: mx.array) -> mx.array:
        return _linear(self, x)


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return _linear(self, x)


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
