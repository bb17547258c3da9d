"""Building blocks shared by the audio encoder and the text decoder."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache


class Attention(nn.Module):
    """Multi-head attention with interleaved RoPE over packed streams.

    ``x`` is ``[1, S, dim]`` holding several streams' positions back to back; ``lengths``
    says how many rows belong to each stream and ``caches`` holds each stream's KV cache.
    Projections run once over all rows (the weight-bound part); RoPE offsets, caches and
    masks are per stream. Mistral's checkpoints store q/k rows in the interleaved layout,
    hence ``traditional=True``.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        rope_theta: float,
        qv_bias: bool = False,
        o_bias: bool = False,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.scale = head_dim**-0.5
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=qv_bias)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=qv_bias)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=o_bias)

    def __call__(
        self, x: mx.array, caches: Sequence[KVCache], lengths: Sequence[int]
    ) -> mx.array:
        _, S, _ = x.shape
        q = self.wq(x).reshape(1, S, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.wk(x).reshape(1, S, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.wv(x).reshape(1, S, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        outputs = []
        start = 0
        for cache, n in zip(caches, lengths):
            qs, ks, vs = (t[:, :, start : start + n] for t in (q, k, v))
            start += n
            rope = dict(traditional=True, base=self.rope_theta, scale=1.0, offset=cache.offset)
            qs = mx.fast.rope(qs, self.head_dim, **rope)
            ks = mx.fast.rope(ks, self.head_dim, **rope)
            ks, vs, mask = cache.update_and_fetch(ks, vs)
            outputs.append(self.attend(qs, ks, vs, mask, cache))
        out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=1)
        return self.wo(out)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask, cache: KVCache) -> mx.array:
        """``q`` [1, H, n, D] (the last n of the keys' positions) over ``k``/``v``
        [1, H_kv, m, D] (what ``cache`` returned, with ``mask``) -> ``[1, n, H * D]``."""
        k, v = k.astype(q.dtype), v.astype(q.dtype)  # a cache may store another dtype
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(1, q.shape[2], -1)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int, w2_bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=w2_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))
