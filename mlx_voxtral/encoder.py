"""Causal Whisper-style audio encoder: conv stem, sliding-window transformer, final norm."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import ConvCache, EncoderCache, KVCache
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
        return mx.conv1d(cache.update(x), self.weight, stride=self.stride) + self.bias


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

    def __call__(self, x: mx.array, mask: mx.array, cache: KVCache) -> mx.array:
        x = x + self.attention(self.attention_norm(x), mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class AudioEncoder(nn.Module):
    """log-mel frames (100 Hz) -> encoder states (50 Hz)."""

    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.args = args
        n_mels = args.audio_encoding_args.num_mel_bins
        self.conv_layers = [
            CausalConv1d(n_mels, args.dim, kernel_size=3, stride=1),
            CausalConv1d(args.dim, args.dim, kernel_size=3, stride=2),
        ]
        self.layers = [EncoderLayer(args) for _ in range(args.n_layers)]
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def make_cache(self, max_frames: int) -> EncoderCache:
        """Caches for passes of at most ``max_frames`` mel frames per row."""
        keep = [conv.kernel_size - conv.stride for conv in self.conv_layers]
        return EncoderCache(len(self.layers), self.args.sliding_window, max_frames // 2, keep)

    def __call__(self, mel: mx.array, cache: EncoderCache) -> mx.array:
        """``mel`` ``[B, T, n_mels]`` (T even) -> ``[B, T / 2, dim]``, with ``cache`` prepared."""
        x = mel
        for conv, c in zip(self.conv_layers, cache.conv):
            x = nn.gelu(conv(x, c))
        mask = cache.mask
        for layer, c in zip(self.layers, cache):
            x = layer(x, mask, c)
        return self.norm(x)
