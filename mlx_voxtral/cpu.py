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

The kernels run outside MLX's graph, on float32 numpy rows: the decoder from its input
embeddings to the LM head (residual stream, norms and RoPE in numpy, one MLX evaluation per
step), the encoder's attention and feed-forward layers from their input to their output,
with keys and values in numpy ring buffers (``HostKVCache``). ``use_cpu_kernels`` switches
a loaded model's modules to these classes (same parameters, different ``__call__``); a
layer whose weights the kernels do not take runs in MLX as before.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import native
from .cache import ConvCache, HostKVCache, KVCache
from .decoder import Decoder, DecoderLayer
from .encoder import AudioEncoder
from .layers import Attention, FeedForward


def _memo(module: nn.Module, key: str, sources: list, make: Callable):
    """``make()``, kept on ``module`` for as long as ``sources`` are the same arrays (a
    layer whose weights were replaced, by ``update`` say, makes a new one)."""
    memo = vars(module).setdefault("_cpu_memo", {})
    kept = memo.get(key)
    if kept is not None and len(kept[0]) == len(sources) and all(a is b for a, b in zip(kept[0], sources)):
        return kept[1]
    value = make()
    memo[key] = (sources, value)
    return value


def _arrays(layer) -> list:
    return [layer[name] for name in ("weight", "scales", "biases", "bias") if name in layer]


def _float_rows(x: mx.array) -> np.ndarray:
    """``x`` [..., K] as evaluated float32 numpy rows [-1, K] (no copy when it is float32)."""
    x = x.astype(mx.float32)
    mx.eval(x)
    return np.array(x, copy=False).reshape(-1, x.shape[-1])


def _native_format(layer) -> Optional[tuple]:
    """The native kernels' format of ``layer``'s weights (layers of one format multiply in
    one pass), or None where MLX multiplies them."""
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        if layer.mode == "affine" and native.quantized_supported(layer.group_size, layer.bits):
            return ("quantized", layer.bits, layer.group_size, layer.scales.dtype)
        return None
    return ("bf16",) if layer.weight.dtype == mx.bfloat16 else None


def _matmuls(layers) -> Optional[native.Matmuls]:
    """The native product with each of ``layers`` (no bias) in one pass, or None where they
    are not all of one format the kernels take."""
    formats = {_native_format(layer) for layer in layers}
    if len(formats) != 1 or None in formats:
        return None
    fmt = formats.pop()
    if fmt[0] == "bf16":
        return native.Matmuls([layer.weight for layer in layers])
    return native.Matmuls([(l.weight, l.scales, l.biases) for l in layers], fmt[2], fmt[1])


def _bias(layer) -> Optional[np.ndarray]:
    return np.array(layer.bias.astype(mx.float32)) if "bias" in layer else None


def _layer_matmuls(layer) -> Optional[native.Matmuls]:
    return _memo(layer, "matmuls", _arrays(layer), lambda: _matmuls([layer]))


def _dense(layer) -> mx.array:
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits, mode=layer.mode)
    return layer.weight


def _linear(layer, x: mx.array) -> mx.array:
    """``x @ W.T`` for a linear or embedding layer (no bias): native kernels when they take
    its weights (float32), MLX otherwise."""
    matmuls = _layer_matmuls(layer)
    if matmuls is not None:
        return mx.array(matmuls(_float_rows(x))[0]).reshape(*x.shape[:-1], -1)
    return x @ _dense(layer).astype(x.dtype).T


def _linear_rows(layer, rows: np.ndarray) -> np.ndarray:
    """``_linear`` of float32 numpy rows [M, K]."""
    matmuls = _layer_matmuls(layer)
    if matmuls is not None:
        return matmuls(rows)[0]
    return _float_rows(mx.array(rows) @ _dense(layer).astype(mx.float32).T)


def _with_bias(layer, y: mx.array) -> mx.array:
    return y + layer.bias if "bias" in layer else y


class CPULinear(nn.Linear):
    """``nn.Linear`` with half-precision weights and float32 activations."""

    def __call__(self, x: mx.array) -> mx.array:
        return _with_bias(self, _linear(self, x))


class CPUQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` with float32 activations."""

    def __call__(self, x: mx.array) -> mx.array:
        return _with_bias(self, _linear(self, x))


@functools.lru_cache(maxsize=16)
def _rope_angles(offset: int, n: int, d: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [n, 1, d / 2] of positions ``offset ..`` (float64 angles): every layer of a
    step asks for the same ones."""
    angles = np.arange(offset, offset + n, dtype=np.float64)[:, None] * theta ** (-np.arange(0, d, 2) / d)
    return tuple(f(angles).astype(np.float32)[:, None] for f in (np.cos, np.sin))


def rope(x: np.ndarray, offset: int, theta: float) -> np.ndarray:
    """RoPE on interleaved pairs (MLX's ``traditional=True``) of float32 ``x`` [n, heads, D]
    at positions ``offset .. offset + n - 1``; angles in float64. (``mx.fast.rope`` took
    200 us for one decode position on this CPU, this ~15 us.)"""
    n, _, d = x.shape
    cos, sin = _rope_angles(offset, n, d, theta)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def rms_norm(x: np.ndarray, norm: nn.RMSNorm) -> np.ndarray:
    """``norm`` (MLX's ``x * rsqrt(mean(x^2) + eps) * weight``) of float32 rows, in numpy:
    for one row ~10 us, an MLX evaluation ~100 us."""
    weight = _memo(norm, "weight", [norm.weight], lambda: np.array(norm.weight.astype(mx.float32)))
    r = 1 / np.sqrt(np.einsum("ij,ij->i", x, x)[:, None] / np.float32(x.shape[-1]) + np.float32(norm.eps))
    return x * r * weight


class CPUAttention(Attention):
    """``Attention`` outside MLX's graph: q, k and v projected in one pass, RoPE in numpy,
    keys and values in a ``HostKVCache``; many queries (the encoder's blocks, a prompt) in
    the native sliding-window kernel, about 25x faster than MLX's CPU fallback at 1500 x
    2250 and never holding the [queries, keys] score matrix; one query (a decode step) over
    the bfloat16 cache in place (5 ms against MLX's 16 ms over a float32 copy, 32 heads x
    8192 keys); the output projection straight from the result."""

    def _plan(self):
        """(q/k/v product, output product, q/k/v/o biases), or None where the native
        kernels do not take this layer (MLX runs it)."""
        layers = (self.wq, self.wk, self.wv, self.wo)

        def make():
            qkv, out = _matmuls(layers[:3]), _matmuls(layers[3:])
            if qkv is None or out is None or not native.attention_supported(self.head_dim):
                return None
            return qkv, out, [_bias(layer) for layer in layers]

        return _memo(self, "plan", [a for layer in layers for a in _arrays(layer)], make)

    def _runs(self, caches) -> bool:
        """Whether this layer runs here (else MLX): kernels for its weights, host caches."""
        return self._plan() is not None and all(isinstance(c, HostKVCache) for c in caches)

    def make_cache(self, window: int, dtype: Optional[mx.Dtype]):
        """The KV cache this layer attends with: host caches where the kernels run."""
        if self._plan() is not None and (dtype is None or dtype == mx.bfloat16):
            return HostKVCache(window, dtype)
        return KVCache(window, dtype)

    def __call__(self, x: mx.array, caches: Sequence[KVCache], lengths: Sequence[int]) -> mx.array:
        if not self._runs(caches):
            return super().__call__(x, caches, lengths)
        return mx.array(self.rows(_float_rows(x), caches, lengths))[None]

    def rows(self, x: np.ndarray, caches: Sequence[HostKVCache], lengths: Sequence[int]) -> np.ndarray:
        """The layer over float32 rows ``x`` [S, dim] (packed streams) -> [S, dim]."""
        if not self._runs(caches):
            return _float_rows(super().__call__(mx.array(x)[None], caches, lengths))
        qkv, wo, biases = self._plan()
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = (y if b is None else y + b for y, b in zip(qkv(x), biases))
        outputs, start = [], 0
        for cache, n in zip(caches, lengths):
            rows = slice(start, start + n)
            start += n
            qs = rope(q[rows].reshape(n, H, D), cache.offset, self.rope_theta)
            ks = rope(k[rows].reshape(n, Hkv, D), cache.offset, self.rope_theta)
            vs = v[rows].reshape(n, Hkv, D)
            if n == 1:  # a decode step: over the ring as it is (one query sees every key)
                cache.append(ks[0], vs[0])
                kv, m = (cache.keys, cache.values), len(cache)
                if cache.bf16:
                    out = native.attention_one(qs[0], *kv, m, self.scale)
                else:
                    out = native.attention(qs.transpose(1, 0, 2), *(t[:, :m] for t in kv), self.scale, m)
            else:
                kv = cache.extend(ks.transpose(1, 0, 2), vs.transpose(1, 0, 2))
                out = native.attention(qs.transpose(1, 0, 2), *kv, self.scale, cache.window)
            outputs.append(out.reshape(n, H * D))
        y = wo(outputs[0] if len(outputs) == 1 else np.concatenate(outputs))[0]
        return y if biases[3] is None else y + biases[3]


class CPUFeedForward(FeedForward):
    """``FeedForward`` with w1 and w3 in one pass, the SwiGLU gate on all cores (MLX's CPU
    elementwise ops use one: 106 ms against 12 ms for the encoder's 1500 x 5120 gate) and
    w2 straight from it, all outside MLX's graph."""

    def _plan(self):
        """(w1/w3 product, w2 product, w2 bias), or None where MLX multiplies."""
        layers = (self.w1, self.w3, self.w2)

        def make():
            w13, w2 = _matmuls(layers[:2]), _matmuls(layers[2:])
            return None if w13 is None or w2 is None else (w13, w2, _bias(self.w2))

        return _memo(self, "plan", [a for layer in layers for a in _arrays(layer)], make)

    def __call__(self, x: mx.array) -> mx.array:
        if self._plan() is not None:
            return mx.array(self.rows(_float_rows(x))).reshape(*x.shape[:-1], -1)
        a, b = self.w1(x), self.w3(x)
        dtype = a.dtype
        h = mx.array(native.silu_mul(_float_rows(a), _float_rows(b))).reshape(a.shape)
        return self.w2(h.astype(dtype))

    def rows(self, x: np.ndarray) -> np.ndarray:
        """The layer over float32 rows ``x`` [S, dim] -> [S, dim]."""
        plan = self._plan()
        if plan is None:
            return _float_rows(self(mx.array(x)))
        w13, w2, bias = plan
        y = w2(native.silu_mul(*w13(x)))[0]
        return y if bias is None else y + bias


class CPUDecoderLayer(DecoderLayer):
    """``DecoderLayer`` on float32 numpy rows: the residual stream and the norms stay
    outside MLX between the native kernels (a 4-bit decode step evaluated MLX graphs 3
    times per layer, ~7 ms of 60)."""

    def __call__(self, x: mx.array, scale: mx.array, caches: Sequence[KVCache], lengths: Sequence[int]) -> mx.array:
        y = self.rows(_float_rows(x), _float_rows(scale), caches, lengths)
        return mx.array(y).reshape(x.shape)

    def rows(self, x: np.ndarray, scale: np.ndarray, caches: Sequence[KVCache], lengths: Sequence[int]) -> np.ndarray:
        """``x`` [S, dim] with the ada ``scale`` ([1, dim] or [S, dim]) -> [S, dim]."""
        h = x + self.attention.rows(rms_norm(x, self.attention_norm), caches, lengths)
        return h + self.feed_forward.rows(rms_norm(h, self.ffn_norm) * scale)


class CPUDecoder(Decoder):
    """``Decoder`` whose layers run on float32 numpy rows from the input embeddings to the
    LM head."""

    def make_cache(self) -> list:
        return [layer.attention.make_cache(self.args.sliding_window, self.cache_dtype) for layer in self.layers]

    def __call__(self, x: mx.array, scales: Sequence[mx.array], caches: Sequence[Sequence[KVCache]],
                 lengths: Sequence[int], last: Optional[Sequence[int]] = None) -> mx.array:
        h = _float_rows(x)
        for i, layer in enumerate(self.layers):
            scale = _memo(layer, "scale", [scales[i]], lambda: _float_rows(scales[i]))
            h = layer.rows(h, scale, [c[i] for c in caches], lengths)
        if last is not None:
            h = h[list(last)]
        h = rms_norm(h, self.norm)
        head = self.tok_embeddings if self.args.tied_embeddings else self.output
        return mx.array(_linear_rows(head, h))[None]


class CPUAudioEncoder(AudioEncoder):
    """``AudioEncoder`` with host KV caches for the layers the kernels run."""

    def make_cache(self) -> tuple[list[ConvCache], list]:
        window = self.args.sliding_window
        return (
            [ConvCache() for _ in self.conv_layers],
            [layer.attention.make_cache(window, self.cache_dtype) for layer in self.layers],
        )


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
    DecoderLayer: CPUDecoderLayer,
    Decoder: CPUDecoder,
    AudioEncoder: CPUAudioEncoder,
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
