"""Causal Whisper-style audio encoder: conv stem, sliding-window transformer, final norm."""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .cache import ConvCache, KVCache
from .config import EncoderArgs
from .layers import Attention, FeedForward


class CausalConv1d(nn.Module):
    """Conv1d with ``kernel_size - stride`` zeros (or the stream's previous inputs) on the left."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.weight = mx.zeros((out_channels, kernel_size, in_channels))
        self.bias = mx.zeros((out_channels,))

    def __call__(self, x: mx.array, cache: ConvCache) -> mx.array:
        x = cache.update(x, self.kernel_size - self.stride, self.kernel_size, self.stride)
        return mx.conv1d(x, self.weight, stride=self.stride) + self.bias


class EncoderLayer(nn.Module):
    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(
            args.dim,
            args.n_heads,
            args.n_kv_heads,
            args.head_dim,
            args.rope_theta,
            qv_bias=args.use_biases,
            o_bias=args.use_biases,
        )
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, w2_bias=args.use_biases)

    def __call__(self, x: mx.array, caches: Sequence[KVCache], lengths: Sequence[int]):
        x = x + self.attention(self.attention_norm(x), caches, lengths)
        return x + self.feed_forward(self.ffn_norm(x))


class AudioEncoder(nn.Module):
    """log-mel frames (100 Hz) -> encoder states (50 Hz)."""

    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.args = args
        # dtype the KV caches store (None: the activations'); see ``Decoder.cache_dtype``
        self.cache_dtype: Optional[mx.Dtype] = None
        n_mels = args.audio_encoding_args.num_mel_bins
        self.conv_layers = [
            CausalConv1d(n_mels, args.dim, kernel_size=3, stride=1),
            CausalConv1d(args.dim, args.dim, kernel_size=3, stride=2),
        ]
        self.layers = [EncoderLayer(args) for _ in range(args.n_layers)]
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def make_cache(self) -> tuple[list[ConvCache], list[KVCache]]:
        return (
            [ConvCache() for _ in self.conv_layers],
            [KVCache(self.args.sliding_window, self.cache_dtype) for _ in self.layers],
        )

    def conv_stem(self, mel: mx.array, conv_caches: Sequence[ConvCache]) -> mx.array:
        """``mel`` [1, T, n_mels] (T even) -> [1, T / 2, dim]."""
        x = mel
        for conv, cache in zip(self.conv_layers, conv_caches):
            x = nn.gelu(conv(x, cache))
        return x

    def __call__(
        self, x: mx.array, caches: Sequence[Sequence[KVCache]], lengths: Sequence[int]
    ) -> mx.array:
        """Run the transformer on packed conv-stem outputs ``x`` [1, S, dim].

        ``caches[i]`` are stream i's per-layer KV caches, ``lengths[i]`` its rows in ``x``.
        """
        for i, layer in enumerate(self.layers):
            x = layer(x, [c[i] for c in caches], lengths)
        return self.norm(x)
