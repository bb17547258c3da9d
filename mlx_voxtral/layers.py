"""Building blocks shared by the audio encoder and the text decoder."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache


# mlx-lm's models.activations.swiglu, written here: importing mlx_lm imports transformers
# (3.4 s on a 2-core x86 machine), which a model file should not cost.
@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return nn.silu(gate) * x


class Attention(nn.Module):
    """Multi-head attention with interleaved RoPE over a batch of streams.

    ``x`` is ``[B, L, dim]``; ``cache`` gives each row's position offset and stores its keys
    and values; ``mask`` says which cached slots each query sees. Mistral's checkpoints store
    q/k rows in the interleaved layout, hence ``traditional=True``.
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

    def __call__(self, x: mx.array, mask: mx.array, cache: KVCache) -> mx.array:
        B, L, _ = x.shape
        q = self.wq(x).reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.wk(x).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.wv(x).reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        rope = dict(traditional=True, base=self.rope_theta, scale=1.0, offset=cache.offset)
        q = mx.fast.rope(q, self.head_dim, **rope)
        k = mx.fast.rope(k, self.head_dim, **rope)
        k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=self.scale,
                                                   mask=mask)
        return self.wo(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int, w2_bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=w2_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(swiglu(self.w1(x), self.w3(x)))
