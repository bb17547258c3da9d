"""Mistral text decoder with delay-conditioned (ada) RMS norm and a tied LM head."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, LayerCaches
from .config import ModelArgs
from .layers import Attention, FeedForward


def time_embedding(num_delay_tokens: int, dim: int, theta: float = 10000.0) -> mx.array:
    """Sinusoidal embedding of the delay, cosines first: ``[cos(d f), sin(d f)]``."""
    half = dim // 2
    inv_freq = mx.exp(-math.log(theta) * mx.arange(half, dtype=mx.float32) / half)
    emb = num_delay_tokens * inv_freq
    return mx.concatenate([mx.cos(emb), mx.sin(emb)])


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(
            args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.rope_theta
        )
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.ada_down = nn.Linear(args.dim, args.ada_rms_norm_t_cond_dim, bias=False)
        self.ada_up = nn.Linear(args.ada_rms_norm_t_cond_dim, args.dim, bias=False)

    def ada_scale(self, t_cond: mx.array) -> mx.array:
        """``1 + up(gelu(down(t_cond)))``: the FFN-norm scale for one delay."""
        return 1 + self.ada_up(nn.gelu(self.ada_down(t_cond)))

    def __call__(self, x: mx.array, scale: mx.array, mask: mx.array, cache: KVCache) -> mx.array:
        h = x + self.attention(self.attention_norm(x), mask, cache)
        return h + self.feed_forward(self.ffn_norm(h) * scale)


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = [DecoderLayer(args) for _ in range(args.n_layers)]
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        if not args.tied_embeddings:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def make_cache(self, max_chunk: int) -> LayerCaches:
        """Caches for passes of at most ``max_chunk`` positions per row (the prompt)."""
        return LayerCaches(len(self.layers), self.args.sliding_window, max_chunk)

    def ada_scales(self, num_delay_tokens: int) -> list[mx.array]:
        """Per-layer FFN-norm scales for a delay (constant over a stream)."""
        t_cond = time_embedding(num_delay_tokens, self.args.dim).astype(self.norm.weight.dtype)
        return [layer.ada_scale(t_cond) for layer in self.layers]

    def __call__(self, h: mx.array, scales: list[mx.array], cache: LayerCaches) -> mx.array:
        """Input embeddings ``h`` ``[B, L, dim]`` -> logits of each row's last position
        ``[B, vocab]``, with ``cache`` prepared. ``scales[l]`` is layer l's ada scale (``[dim]``,
        or ``[B, 1, dim]`` for rows of different delays)."""
        mask = cache.mask
        for layer, scale, c in zip(self.layers, scales, cache):
            h = layer(h, scale, mask, c)
        h = self.norm(h[:, -1])
        if self.args.tied_embeddings:
            return self.tok_embeddings.as_linear(h)
        return self.output(h)
