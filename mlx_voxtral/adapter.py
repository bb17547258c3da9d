"""Temporal adapter: 4 encoder frames (50 Hz) -> one decoder embedding (12.5 Hz)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class AudioAdapter(nn.Module):
    def __init__(self, encoder_dim: int, dim: int, downsample_factor: int):
        super().__init__()
        self.downsample_factor = downsample_factor
        self.w_in = nn.Linear(encoder_dim * downsample_factor, dim, bias=False)
        self.w_out = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """``x`` ``[B, S, encoder_dim]`` (S a multiple of the factor) -> ``[B, S / factor, dim]``."""
        x = x.reshape(x.shape[0], -1, x.shape[-1] * self.downsample_factor)
        return self.w_out(nn.gelu(self.w_in(x)))
