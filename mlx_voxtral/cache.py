"""Caches that carry state across chunks of a stream: sliding-window KV caches and conv tails."""

from __future__ import annotations

from typing import Optional, Union

import mlx.core as mx
import numpy as np

Mask = Optional[Union[str, mx.array]]


class _SlidingWindow:
    """Position bookkeeping of a sliding-window KV cache: ``offset`` counts every position
    ever written, at most ``window`` are kept; single positions go into a ring buffer that
    grows in steps of ``step`` up to the window."""

    step = 256

    def __init__(self, window: int):
        self.window = window
        self.offset = 0
        self._idx = 0  # next ring slot; equals the filled length until the ring wraps
        self.keys = self.values = None

    def __len__(self) -> int:
        return min(self.offset, self.window)

    def _order(self) -> list[slice]:
        """The ring's slots holding the cached positions, oldest first."""
        n = len(self)
        if n < self.window or self._idx in (0, self.window):
            return [slice(0, n)]
        return [slice(self._idx, None), slice(0, self._idx)]

    def _next_slot(self, capacity: int) -> int:
        """Go to the slot of the next single position; returns how many slots the ring
        (``capacity`` now) must grow by first."""
        grow = min(self.step, self.window - capacity) if self._idx >= capacity and capacity < self.window else 0
        if self._idx == self.window:
            self._idx = 0
        return grow

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class KVCache(_SlidingWindow):
    """Keys and values of one attention layer for one stream, bounded by a sliding window.

    Positions are absolute (``offset`` counts every position ever written), so RoPE keeps
    growing while memory stays bounded: at most ``window`` keys are kept. Single-token
    updates write in place into a ring buffer that grows in steps of ``step`` up to the
    window; multi-token updates concatenate the last ``window - 1`` keys with the new ones
    and return the banded causal mask the chunk needs.
    """

    def __init__(self, window: int, dtype: Optional[mx.Dtype] = None):
        super().__init__(window)
        self.dtype = dtype  # storage dtype (None: the keys' own)

    def _ordered(self, x: mx.array) -> mx.array:
        """The cached entries in temporal order."""
        parts = [x[:, :, part] for part in self._order()]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)

    def _update_in_place(self, keys: mx.array, values: mx.array):
        B, H, _, D = keys.shape
        grow = self._next_slot(0 if self.keys is None else self.keys.shape[2])
        if grow:
            new_k = mx.zeros((B, H, grow, D), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys, new_k], axis=2)
                self.values = mx.concatenate([self.values, new_v], axis=2)
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


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even as ``astype`` does."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def _from_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


class HostKVCache(_SlidingWindow):
    """``KVCache`` in numpy for the CPU layers (``mlx_voxtral.cpu``), which compute outside
    MLX: keys and values ``[H_kv, positions, D]`` stored as bfloat16 bits (uint16) or
    float32, the same sliding window, ring buffer and rounding-before-use rule. A decode
    step writes each layer's key and value in place (through MLX it was a graph and an
    evaluation per layer, ~100 us each)."""

    def __init__(self, window: int, dtype: Optional[mx.Dtype] = None):
        if dtype is not None and dtype != mx.bfloat16:
            raise ValueError(f"host KV caches store bfloat16 or float32 keys, not {dtype}")
        super().__init__(window)
        self.dtype = dtype  # bfloat16, or None: float32
        self.bf16 = dtype is not None

    def _store(self, x: np.ndarray) -> np.ndarray:
        return _to_bf16(x) if self.bf16 else np.array(x, np.float32)

    def _load(self, x: np.ndarray) -> np.ndarray:
        return _from_bf16(x) if self.bf16 else x

    def _ordered(self, x: np.ndarray) -> np.ndarray:
        parts = [x[:, part] for part in self._order()]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def append(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Store one position's float32 ``keys``/``values`` [H_kv, D]; attend to the first
        ``len(self)`` entries of ``self.keys``/``self.values`` (the ring, in any order)."""
        keys, values = self._store(keys), self._store(values)
        grow = self._next_slot(0 if self.keys is None else self.keys.shape[1])
        if grow:
            new = [np.zeros((t.shape[0], grow, t.shape[1]), t.dtype) for t in (keys, values)]
            old = [self.keys, self.values]
            self.keys, self.values = (n if o is None else np.concatenate([o, n], axis=1) for o, n in zip(old, new))
        self.keys[:, self._idx] = keys
        self.values[:, self._idx] = values
        self.offset += 1
        self._idx += 1

    def extend(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store n positions' float32 ``keys``/``values`` [H_kv, n, D]; return the float32
        keys and values they attend to: the last ``window - 1`` cached ones, in order, then
        the new ones (rounded to the storage dtype)."""
        new_k, new_v = self._store(keys), self._store(values)
        if self.keys is None:
            all_k, all_v = new_k, new_v
        else:
            keep = self.window - 1
            past_k, past_v = (self._ordered(t)[:, max(len(self) - keep, 0) :] for t in (self.keys, self.values))
            all_k, all_v = np.concatenate([past_k, new_k], axis=1), np.concatenate([past_v, new_v], axis=1)
        self.keys = np.ascontiguousarray(all_k[:, -self.window :])
        self.values = np.ascontiguousarray(all_v[:, -self.window :])
        self.offset += keys.shape[1]
        self._idx = self.keys.shape[1]
        return self._load(all_k), self._load(all_v)


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
