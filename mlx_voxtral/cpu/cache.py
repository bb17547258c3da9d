"""The CPU backend's caches: numpy rings per stream, behind the batch interface of
``mlx_voxtral.cache`` (rows, ``prepare``/``finalize``, ``add_row``/``reset_row``/``remove_row``).

The CPU layers compute outside MLX, on float32 numpy rows, so their keys and values live in
numpy too: a decode step writes each layer's key and value in place (through MLX it would be a
graph and an evaluation per layer).
"""

from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import numpy as np


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even as MLX's ``astype`` does."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def _move_to_front(x: np.ndarray, start: int, n: int) -> None:
    """``x[:, :n] = x[:, start : start + n]`` in place, one ``memmove`` per head (numpy copies
    overlapping ranges through a temporary: twice the memory traffic of a live chunk's
    compactions)."""
    row = x.strides[1]
    for h in range(x.shape[0]):
        base = x.ctypes.data + h * x.strides[0]
        ctypes.memmove(base, base + start * row, n * row)


class HostKVCache:
    """Keys and values of one attention layer for one stream, bounded by a sliding window.

    Keys and values ``[H_kv, capacity, D]`` are stored as bfloat16 bits (uint16) or float32.
    Positions are absolute (``offset`` counts every position written; RoPE keeps growing while
    at most ``window`` keys are kept). New keys are rounded to the storage dtype before they
    are used, so a position sees the same keys whether they are new or cached.

    The buffers take one of two layouts, the one the last write needed:

    * a ring for single positions (``append``, a decode step): the first ``len(self)`` slots,
      in any order, growing in steps of ``step`` up to the window;
    * a linear buffer for chunks (``extend``): the kept positions in temporal order, then
      room for new ones. When a chunk does not fit, the last ``window - 1`` positions move to
      the front (or to a new buffer, ``slack`` positions larger than needed), so a position
      is copied about ``window / slack`` times while it is kept, whatever the chunk size. A
      chunk larger than ``slack`` leaves a buffer of at most ``window + slack`` positions.
    """

    step = 256
    slack = 128  # positions of room: 17 % more than the window of 750, a compaction every 32 chunks of 80 ms

    def __init__(self, window: int, bf16: bool):
        self.window = window
        self.bf16 = bf16
        self.offset = 0
        self._idx = 0  # ring: next slot; equals the filled length until the ring wraps
        self._start: Optional[int] = None  # linear: slot of the oldest kept position
        self.keys: Optional[np.ndarray] = None
        self.values: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return min(self.offset, self.window)

    def _store(self, x: np.ndarray) -> np.ndarray:
        return to_bf16(x) if self.bf16 else np.array(x, np.float32)

    def load(self, x: np.ndarray) -> np.ndarray:
        """Stored keys or values as float32."""
        return from_bf16(x) if self.bf16 else x

    def _ordered(self, x: np.ndarray) -> np.ndarray:
        """The cached entries in temporal order (a view unless the ring has wrapped)."""
        n = len(self)
        if self._start is not None:
            return x[:, self._start : self._start + n]
        if n < self.window or self._idx in (0, self.window):
            return x[:, :n]
        return np.concatenate([x[:, self._idx : self.window], x[:, : self._idx]], axis=1)

    def append(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Store one position's float32 ``keys``/``values`` [H_kv, D]; attend to the first
        ``len(self)`` entries of ``self.keys``/``self.values`` (the ring, in any order)."""
        keys, values = self._store(keys), self._store(values)
        if self._start is not None:  # linear -> ring: the kept positions to the front
            n = len(self)
            for t in (self.keys, self.values):
                t[:, :n] = t[:, self._start : self._start + n]
            self._start, self._idx = None, n
        capacity = 0 if self.keys is None else self.keys.shape[1]
        if self._idx >= capacity and capacity < self.window:
            grow = min(self.step, self.window - capacity)
            new = [np.zeros((t.shape[0], grow, t.shape[1]), t.dtype) for t in (keys, values)]
            old = [self.keys, self.values]
            self.keys, self.values = (n if o is None else np.concatenate([o, n], axis=1) for o, n in zip(old, new))
        if self._idx == self.window:
            self._idx = 0
        self.keys[:, self._idx] = keys
        self.values[:, self._idx] = values
        self.offset += 1
        self._idx += 1

    def extend(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store n positions' float32 ``keys``/``values`` [H_kv, n, D]; return the keys and
        values they attend to, in the storage dtype (``load`` widens them): the last
        ``window - 1`` cached ones, in order, then the new ones. They are views of the
        buffers [H_kv, <= window - 1 + n, D] (positions contiguous, heads a capacity apart),
        to be read before the next write."""
        new_k, new_v = self._store(keys), self._store(values)
        hkv, n, d = new_k.shape
        kept = len(self)
        past = min(kept, self.window - 1)
        capacity = 0 if self.keys is None else self.keys.shape[1]
        if self._start is not None and self._start + kept + n <= capacity:
            begin = self._start + kept - past  # room left after the kept positions
        elif self._start is not None and past + n <= capacity:
            begin = 0  # compact: the last window - 1 positions to the front
            for t in (self.keys, self.values):
                _move_to_front(t, self._start + kept - past, past)
        else:
            begin = 0  # a new buffer (the first chunk, one larger than the room, or the ring's)
            fresh = [np.empty((hkv, past + n + self.slack, d), new_k.dtype) for _ in "kv"]
            if past:
                for f, t in zip(fresh, (self.keys, self.values)):
                    f[:, :past] = self._ordered(t)[:, kept - past :]
            self.keys, self.values = fresh
        end = begin + past + n
        self.keys[:, begin + past : end] = new_k
        self.values[:, begin + past : end] = new_v
        out = self.keys[:, begin:end], self.values[:, begin:end]
        self.offset += n
        self._start = end - len(self)
        if self.keys.shape[1] > self.window + 2 * self.slack:  # after a large chunk: shrink
            self.keys, self.values = (self._smaller(t) for t in (self.keys, self.values))
            self._start = 0
        return out

    def _smaller(self, x: np.ndarray) -> np.ndarray:
        n = len(self)
        y = np.empty((x.shape[0], n + self.slack, x.shape[2]), x.dtype)
        y[:, :n] = x[:, self._start : self._start + n]
        return y

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class HostLayerCaches:
    """Every layer's ``HostKVCache`` for every row of a batch (``rows[r][layer]``)."""

    def __init__(self, n_layers: int, window: int, bf16: bool):
        self.n_layers, self.window, self.bf16 = n_layers, window, bf16
        self.rows: list[list[HostKVCache]] = []
        self.pass_rows = slice(0, 0)
        self.lengths: list[int] = []

    def _fresh(self) -> list[HostKVCache]:
        return [HostKVCache(self.window, self.bf16) for _ in range(self.n_layers)]

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def add_row(self) -> int:
        self.rows.append(self._fresh())
        return len(self.rows) - 1

    def reset_row(self, row: int) -> None:
        self.rows[row] = self._fresh()

    def remove_row(self, row: int) -> None:
        self.rows[row] = self.rows[-1]
        self.rows.pop()

    def prepare(self, rows: slice, lengths: Sequence[int], length: int) -> None:
        self.pass_rows, self.lengths = rows, list(lengths)

    def finalize(self) -> None:
        pass  # host caches advance as they are written

    def active(self) -> list[tuple[int, int]]:
        """``(index in the pass, real length)`` of the pass's rows that bring positions."""
        return [(i, n) for i, n in enumerate(self.lengths) if n]

    def layer(self, index: int) -> list[HostKVCache]:
        """Layer ``index``'s caches of the pass's active rows, in ``active()`` order."""
        start = self.pass_rows.start
        return [self.rows[start + i][index] for i, _ in self.active()]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for row in self.rows for c in row)


class HostEncoderCache(HostLayerCaches):
    """The encoder's per-row state: the conv stem's tails (float32 numpy) and the layers'
    caches. ``prepare`` takes lengths in mel frames; the layers see half as many."""

    def __init__(self, n_layers: int, window: int, bf16: bool, conv_keep: Sequence[int], n_mels: int, dim: int):
        super().__init__(n_layers, window, bf16)
        self.conv_shapes = [(k, c) for k, c in zip(conv_keep, (n_mels, dim))]
        self.tails: list[list[np.ndarray]] = []

    def _fresh_tails(self) -> list[np.ndarray]:
        return [np.zeros(shape, np.float32) for shape in self.conv_shapes]

    def add_row(self) -> int:
        self.tails.append(self._fresh_tails())
        return super().add_row()

    def reset_row(self, row: int) -> None:
        self.tails[row] = self._fresh_tails()
        super().reset_row(row)

    def remove_row(self, row: int) -> None:
        self.tails[row] = self.tails[-1]
        self.tails.pop()
        super().remove_row(row)

    def prepare(self, rows: slice, lengths: Sequence[int], length: int) -> None:
        self.mel_lengths = list(lengths)
        super().prepare(rows, [n // 2 for n in lengths], length // 2)

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(t.nbytes for row in self.tails for t in row)

