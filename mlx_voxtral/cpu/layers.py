"""The CPU backend's encoder, adapter and decoder: the model's own modules, run on numpy rows.

On CPU the model keeps its matmul weights in their storage precision (float32, bfloat16, or
4/8-bit quantized: that is what bounds memory traffic) and computes in float32 (activations
of quantized layers rounded to 8 bits per group), through ``mlx_voxtral.cpu.native``:

* a few rows (decoding: one per stream, up to ``native.FEW_ROWS``) stream the weights once,
  a layer's q, k and v (and w1, w3) in one pass;
* quantized weights times more rows (and the encoder's and adapter's at any number of rows,
  so that streamed audio gives the bits of one offline block) multiply in integers, 8-bit
  activations against tiles of the weights transposed in cache (AVX-512 VNNI or AVX2), where
  the CPU has them;
  once a call brings a few rows (a live chunk), the tiles are laid out once and kept;
* other many-row products (float weights; quantized ones without AVX2) convert the weights
  to float32 a cache-sized tile at a time and multiply each tile with the BLAS;
* attention over more than one query runs in a native sliding-window kernel, one query in
  another, both over the cache's buffers in place and in their storage precision; the SwiGLU
  gate and the GELU on all cores.

``CPUEncoder``, ``CPUAdapter`` and ``CPUDecoder`` hold the loaded model's submodules (the same
parameter tree, so weights load, save and replace as usual) and compute from their input to
their output outside MLX's graph; ``mlx_voxtral.cpu.install`` puts them in the model's place.
A weight the kernels do not take (a quantization width other than 4/8-bit affine, another
mode, float16) is multiplied by MLX; ``mlx_voxtral.cpu.install`` warns once which.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import native
from ..adapter import AudioAdapter
from ..decoder import Decoder
from ..encoder import AudioEncoder
from ..layers import Attention, FeedForward
from .cache import HostEncoderCache, HostKVCache, HostLayerCaches, from_bf16


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


def float_rows(x: mx.array) -> np.ndarray:
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
    return (str(layer.weight.dtype),) if layer.weight.dtype in (mx.bfloat16, mx.float32) else None


def _matmuls(layers, many: bool = False) -> Optional[native.Matmuls]:
    """The native product with each of ``layers`` (no bias) in one pass, or None where they
    are not all of one format the kernels take; ``many``: ``native.Matmuls``'s (a row's
    result the same whatever the number of rows)."""
    formats = {_native_format(layer) for layer in layers}
    if len(formats) != 1 or None in formats:
        return None
    fmt = formats.pop()
    if fmt[0] != "quantized":
        weights = [layer.weight for layer in layers]
        mx.eval(weights)
        return native.Matmuls(weights)
    return native.Matmuls([(l.weight, l.scales, l.biases) for l in layers], fmt[2], fmt[1], many)


def _bias(layer) -> Optional[np.ndarray]:
    return np.array(layer.bias.astype(mx.float32)) if "bias" in layer else None


def _dense(layer) -> mx.array:
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits,
                             mode=layer.mode)
    return layer.weight


def linear_rows(layer, rows: np.ndarray, many: bool = False) -> np.ndarray:
    """``rows @ W.T`` (no bias) for a linear or embedding layer and float32 rows [M, K]: the
    native kernels where they take its weights, MLX otherwise; ``many`` as in ``_matmuls``."""
    matmuls = _memo(layer, ("matmuls", many), _arrays(layer), lambda: _matmuls([layer], many))
    if matmuls is not None:
        return matmuls(rows)[0]
    return float_rows(mx.array(rows) @ _dense(layer).astype(mx.float32).T)


def _projections(layers, many: bool = False) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``x -> [x @ W.T + b for each layer]``: one native pass where the layers share a format
    (``many`` as in ``_matmuls``)."""

    def make():
        fused = _matmuls(layers, many)
        biases = [_bias(layer) for layer in layers]

        def run(x: np.ndarray) -> list[np.ndarray]:
            ys = fused(x) if fused is not None else [linear_rows(layer, x, many) for layer in layers]
            return [y if b is None else y + b for y, b in zip(ys, biases)]

        return run

    return make


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU of float32 rows, as ``nn.gelu`` computes it (to float32 rounding),
    natively on all cores."""
    return native.gelu(x)


@functools.lru_cache(maxsize=16)
def _rope_angles(offset: int, n: int, d: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [n, d / 2] of positions ``offset ..`` (float64 angles): every layer of a
    step asks for the same ones."""
    angles = np.arange(offset, offset + n, dtype=np.float64)[:, None] * theta ** (-np.arange(0, d, 2) / d)
    return tuple(f(angles).astype(np.float32) for f in (np.cos, np.sin))


def rope(x: np.ndarray, offset: int, theta: float) -> np.ndarray:
    """RoPE on interleaved pairs (MLX's ``traditional=True``) of float32 ``x`` [n, heads, D]
    at positions ``offset .. offset + n - 1``; angles in float64, natively."""
    n, _, d = x.shape
    return native.rope(x, *_rope_angles(offset, n, d, theta))


def rms_norm(x: np.ndarray, norm: nn.RMSNorm, scale: Optional[np.ndarray] = None) -> np.ndarray:
    """``norm`` (MLX's ``x * rsqrt(mean(x^2) + eps) * weight``) of float32 rows, natively,
    then times ``scale`` where given (a decoder layer's ada scale)."""
    weight = _memo(norm, "weight", [norm.weight], lambda: np.array(norm.weight.astype(mx.float32)))
    return native.rms_norm(x, weight, norm.eps, scale)


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, window: int) -> np.ndarray:
    """Sliding-window causal attention of ``q`` [H, Sq, D] (the last Sq of the keys'
    positions) over ``k``/``v`` [Hkv, Sk, D], float32 or bfloat16 bits (a cache's buffers,
    read in place) -> [Sq, H * D]: the native kernel for head sizes it takes, numpy otherwise."""
    h, sq, d = q.shape
    if native.attention_supported(d):
        return native.attention(q, k, v, scale, window)
    k, v = (from_bf16(t) if t.dtype == np.uint16 else t for t in (k, v))
    hkv, sk, _ = k.shape
    k, v = (np.repeat(t, h // hkv, axis=0) for t in (k, v))
    scores = np.einsum("hqd,hkd->hqk", q, k) * np.float32(scale)
    qpos = np.arange(sk - sq, sk)[:, None]
    kpos = np.arange(sk)[None]
    scores = np.where((kpos <= qpos) & (kpos > qpos - window), scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    out = np.einsum("hqk,hkd->hqd", scores / scores.sum(-1, keepdims=True), v)
    return np.ascontiguousarray(out.transpose(1, 0, 2)).reshape(sq, h * d).astype(np.float32)


def attention_rows(attn: Attention, x: np.ndarray, caches: Sequence[HostKVCache], lengths: Sequence[int],
                   many: bool = False) -> np.ndarray:
    """``attn`` over float32 rows ``x`` [S, dim] of several streams packed back to back
    (``lengths[i]`` rows of stream i, whose keys and values ``caches[i]`` keeps) -> [S, dim].
    q, k and v in one native pass, RoPE natively, many queries in the native sliding-window
    kernel (which never holds the [queries, keys] score matrix), one query (a decode step)
    over the ring in place; both read the cached keys and values in their storage precision."""
    layers = (attn.wq, attn.wk, attn.wv)
    sources = [a for layer in layers for a in _arrays(layer)]
    qkv = _memo(attn, ("qkv", many), sources, _projections(layers, many))
    wo = _memo(attn, ("wo", many), _arrays(attn.wo), _projections([attn.wo], many))
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = qkv(x)
    outputs, start = [], 0
    for cache, n in zip(caches, lengths):
        rows = slice(start, start + n)
        start += n
        qs = rope(q[rows].reshape(n, H, D), cache.offset, attn.rope_theta)
        ks = rope(k[rows].reshape(n, Hkv, D), cache.offset, attn.rope_theta)
        vs = v[rows].reshape(n, Hkv, D)
        if n == 1:  # a decode step: over the ring as it is (one query sees every key)
            cache.append(ks[0], vs[0])
            kv, m = (cache.keys, cache.values), len(cache)
            if cache.bf16 and native.attention_supported(D):
                out = native.attention_one(qs[0], *kv, m, attn.scale)
            else:
                out = _attend(qs.transpose(1, 0, 2), *(t[:, :m] for t in kv), attn.scale, m)
        else:  # a chunk: over the cached window and itself, in the cache's buffers
            kv = cache.extend(ks.transpose(1, 0, 2), vs.transpose(1, 0, 2))
            out = _attend(qs.transpose(1, 0, 2), *kv, attn.scale, cache.window)
        outputs.append(out.reshape(n, H * D))
    return wo(outputs[0] if len(outputs) == 1 else np.concatenate(outputs))[0]


def feed_forward_rows(ffn: FeedForward, x: np.ndarray, many: bool = False) -> np.ndarray:
    """``ffn`` over float32 rows [S, dim]: w1 and w3 in one pass, the SwiGLU gate on all cores
    (MLX's CPU elementwise ops use one) and w2 straight from it."""
    layers = (ffn.w1, ffn.w3)
    w13 = _memo(ffn, ("w13", many), [a for layer in layers for a in _arrays(layer)], _projections(layers, many))
    w2 = _memo(ffn, ("w2", many), _arrays(ffn.w2), _projections([ffn.w2], many))
    return w2(native.silu_mul(*w13(x)))[0]


def layer_rows(layer, x: np.ndarray, caches: Sequence[HostKVCache], lengths: Sequence[int],
               scale: Optional[np.ndarray] = None, many: bool = False) -> np.ndarray:
    """An encoder or decoder layer (pre-norm attention and SwiGLU, residual adds) over packed
    float32 rows; ``scale`` is a decoder layer's ada scale of its FFN norm; ``many`` as in
    ``_matmuls`` (the encoder's)."""
    x = x + attention_rows(layer.attention, rms_norm(x, layer.attention_norm), caches, lengths, many)
    return x + feed_forward_rows(layer.feed_forward, rms_norm(x, layer.ffn_norm, scale), many)


def _conv_rows(conv, x: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One stream's causal convolution of float32 frames ``x`` [T, C_in] after ``tail`` (its
    previous inputs) -> (outputs, the new tail), as one native matmul over the unfolded
    windows."""

    def make():
        w = conv.weight.astype(mx.float32).reshape(conv.weight.shape[0], -1)  # [out, k * in]
        mx.eval(w)
        return native.Matmuls([w]), np.array(conv.bias.astype(mx.float32))

    matmul, bias = _memo(conv, "conv", [conv.weight, conv.bias], make)
    joined = np.concatenate([tail, x])
    k, s = conv.kernel_size, conv.stride
    windows = np.lib.stride_tricks.sliding_window_view(joined, (k, joined.shape[1]))[::s, 0]
    y = matmul(windows.reshape(windows.shape[0], -1))[0] + bias
    return y, joined[joined.shape[0] - tail.shape[0] :]


class CPUEncoder(nn.Module):
    """``AudioEncoder`` on numpy rows: the conv stem as native matmuls over unfolded windows,
    every layer outside MLX from its input to its output."""

    def __init__(self, encoder: AudioEncoder, bf16_cache: bool):
        super().__init__()
        self.args = encoder.args
        self.conv_layers = encoder.conv_layers
        self.layers = encoder.layers
        self.norm = encoder.norm
        self._bf16 = bf16_cache

    def make_cache(self, max_frames: int) -> HostEncoderCache:
        keep = [conv.kernel_size - conv.stride for conv in self.conv_layers]
        return HostEncoderCache(len(self.layers), self.args.sliding_window, self._bf16, keep,
                                self.args.audio_encoding_args.num_mel_bins, self.args.dim)

    def __call__(self, mel: mx.array, cache: HostEncoderCache) -> mx.array:
        n, T, _ = mel.shape
        mel = np.array(mel.astype(mx.float32))
        out = np.zeros((n, T // 2, self.args.dim), np.float32)
        active = cache.active()
        if not active:
            return mx.array(out)
        start = cache.pass_rows.start
        frames = []
        for i, length in active:
            x, tails = mel[i, : 2 * length], cache.tails[start + i]
            for j, conv in enumerate(self.conv_layers):
                x, tails[j] = _conv_rows(conv, x, tails[j])
                x = gelu(x)
            frames.append(x)
        lengths = [length for _, length in active]
        x = np.concatenate(frames) if len(frames) > 1 else frames[0]
        for index, layer in enumerate(self.layers):
            x = layer_rows(layer, x, cache.layer(index), lengths, many=True)
        x = rms_norm(x, self.norm)
        offset = 0
        for (i, length) in active:
            out[i, :length] = x[offset : offset + length]
            offset += length
        return mx.array(out)


class CPUAdapter(nn.Module):
    """``AudioAdapter`` on numpy rows."""

    def __init__(self, adapter: AudioAdapter):
        super().__init__()
        self.downsample_factor = adapter.downsample_factor
        self.w_in = adapter.w_in
        self.w_out = adapter.w_out

    def __call__(self, x: mx.array) -> mx.array:
        n = x.shape[0]
        rows = float_rows(x.reshape(n, -1, x.shape[-1] * self.downsample_factor))
        y = linear_rows(self.w_out, gelu(linear_rows(self.w_in, rows, True)), True)
        return mx.array(y).reshape(n, -1, y.shape[-1])


class CPUDecoder(nn.Module):
    """``Decoder`` on float32 numpy rows from the input embeddings to the LM head (the residual
    stream and the norms stay outside MLX between the native kernels), the LM head on the last
    rows only."""

    def __init__(self, decoder: Decoder, bf16_cache: bool):
        super().__init__()
        self.args = decoder.args
        self.tok_embeddings = decoder.tok_embeddings
        self.layers = decoder.layers
        self.norm = decoder.norm
        if "output" in decoder:
            self.output = decoder.output
        self._bf16 = bf16_cache

    ada_scales = Decoder.ada_scales

    def make_cache(self, max_chunk: int) -> HostLayerCaches:
        return HostLayerCaches(len(self.layers), self.args.sliding_window, self._bf16)

    def __call__(self, h: mx.array, scales: list[mx.array], cache: HostLayerCaches) -> mx.array:
        n, L, dim = h.shape
        head = self.tok_embeddings if self.args.tied_embeddings else self.output
        active = cache.active()
        logits = np.zeros((n, head.weight.shape[0]), np.float32)
        if not active:
            return mx.array(logits)
        picked = [i for i, _ in active]
        x = float_rows(h).reshape(n, L, dim)[picked].reshape(-1, dim)
        lengths = [length for _, length in active]
        for index, (layer, scale) in enumerate(zip(self.layers, scales)):
            s = _memo(layer, ("scale", id(scale)), [scale], lambda: float_rows(scale).reshape(*scale.shape))
            if s.ndim == 3:  # [n, 1, dim]: rows of different delays
                s = np.repeat(s[picked, 0], L, axis=0)
            x = layer_rows(layer, x, cache.layer(index), lengths, s)
        last = x.reshape(len(picked), L, dim)[:, -1]
        logits[picked] = linear_rows(head, rms_norm(last, self.norm))
        return mx.array(logits)
