"""Caches that carry state across chunks of a stream: sliding-window KV caches and conv tails."""

from __future__ import annotations

from typing import Optional, Union

import mlx.core as mx

Mask = Optional[Union[str, mx.array]]


class KVCache:
    """Keys and values of one attention layer for one stream, bounded by a sliding window.

    Positions are absolute (``offset`` counts every position ever written), so RoPE keeps
    growing while memory stays bounded: at most ``window`` keys are kept. Single-token
    updates write in place into a ring buffer that grows in steps of ``step`` up to the
    window; multi-token updates concatenate the last ``window - 1`` keys with the new ones
    and return the banded causal mask the chunk needs.
    """

    step = 256

    def __init__(self, window: int, dtype: Optional[mx.Dtype] = None):
        self.window = window
        self.dtype = dtype  # storage dtype (None: the keys' own)
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0
        self._idx = 0  # next ring slot; equals the filled length until the ring wraps

    def __len__(self) -> int:
        return min(self.offset, self.window)

    def _ordered(self, x: mx.array) -> mx.array:
        """The cached entries in temporal order."""
        n = len(self)
        if n < self.window or self._idx in (0, self.window):
            return x[:, :, :n]
        return mx.concatenate([x[:, :, self._idx :], x[:, :, : self._idx]], axis=2)

    def _update_in_place(self, keys: mx.array, values: mx.array):
        B, H, _, D = keys.shape
        if self.keys is None or (
            self._idx >= self.keys.shape[2] and self.keys.shape[2] < self.window
        ):
            size = min(self.step, self.window - (0 if self.keys is None else self.keys.shape[2]))
            new_k = mx.zeros((B, H, size, D), keys.dtype)
            new_v = mx.zeros((B, H, size, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys, new_k], axis=2)
                self.values = mx.concatenate([self.values, new_v], axis=2)
        if self._idx == self.window:
            self._idx = 0
        self.keys[:, :, self._idx : self._idx + 1] = keys
        self.values[:, :, self._idx : self._idx + 1] = values
        self.offset += 1
        self._idx += 1
        n = len(self)
        return self.keys[:, :, :n], self.values[:, :, :n], None

    def _update_concat(self, keys: mx.array, values: mx.array):
        n = keys.shape[2]
        if self.keys is None:
            past_k, past_v = keys[:, :, :0], values[:, :, :0]
        else:
            keep = self.window - 1
            past_k = self._ordered(self.keys)[:, :, -keep:] if keep > 0 else self.keys[:, :, :0]
            past_v = self._ordered(self.values)[:, :, -keep:] if keep > 0 else self.values[:, :, :0]
        c = past_k.shape[2]
        all_k = mx.concatenate([past_k, keys], axis=2)
        all_v = mx.concatenate([past_v, values], axis=2)
        if c + n <= self.window:
            mask: Mask = "causal"
        else:
            q_pos = mx.arange(self.offset, self.offset + n)[:, None]
            k_pos = mx.arange(self.offset - c, self.offset + n)[None]
            mask = (k_pos <= q_pos) & (k_pos > q_pos - self.window)
        if all_k.shape[2] > self.window:
            # a copy: a slice would keep the whole block's keys alive (the encoder's 30 s
            # blocks held 1500 keys per layer instead of 750, 0.4 GB more)
            self.keys = mx.contiguous(all_k[:, :, -self.window :])
            self.values = mx.contiguous(all_v[:, :, -self.window :])
            mx.eval(self.keys, self.values)  # until evaluated, the graph holds the block
        else:
            self.keys, self.values = all_k, all_v
        self.offset += n
        self._idx = self.keys.shape[2]
        return all_k, all_v, mask

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Store ``keys``/``values`` ([B, H, n, D]); return what the new queries attend to.

        Returns ``(keys, values, mask)`` where mask is ``None``, ``"causal"`` or a boolean
        array of shape ``[n, n_keys]``. With a storage ``dtype`` the new keys are rounded to
        it before they are used, so a position sees the same keys whether they are new or
        cached.
        """
        if self.dtype is not None:
            keys, values = keys.astype(self.dtype), values.astype(self.dtype)
        if keys.shape[2] == 1:
            return self._update_in_place(keys, values)
        return self._update_concat(keys, values)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class ConvCache:
    """The trailing inputs a causal strided convolution needs to continue a stream exactly."""

    def __init__(self):
        self.tail: Optional[mx.array] = None

    def update(self, x: mx.array, left_pad: int, kernel_size: int, stride: int) -> mx.array:
        """Prepend the stored tail (zeros at stream start) to ``x`` ([B, T, C]).

        Returns the input window to convolve; keeps whatever the next call still needs.
        """
        if self.tail is None:
            self.tail = mx.zeros((x.shape[0], left_pad, x.shape[2]), x.dtype)
        x = mx.concatenate([self.tail, x], axis=1)
        n_out = max(0, (x.shape[1] - kernel_size) // stride + 1)
        self.tail = x[:, n_out * stride :]
        return x[:, : (n_out - 1) * stride + kernel_size] if n_out else x[:, :0]
