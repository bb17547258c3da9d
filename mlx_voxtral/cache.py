"""State a batch of streams carries across forward passes: sliding-window KV caches and conv tails.

Every cache here is batched: row ``r`` is one stream, and a forward pass runs over a contiguous
range of rows (``rows``), each row with its own number of new positions (``lengths``, the rest of
the pass's ``L`` positions being padding). The caches follow mlx-lm's contract
(``update_and_fetch(keys, values) -> (keys, values)``, ``offset``, ``prepare``/``finalize``
around a padded pass, ``nbytes``) but store differently, for three reasons mlx-lm's
``BatchRotatingKVCache`` does not meet: a chunk of several positions is written in place into
the ring (mlx-lm concatenates and trims the whole window for every multi-position update), rows
sit at different positions (streams join at any time), and a row's keys occupy the same slots
whatever its batch.

Position ``p`` of a row is kept in slot ``p % capacity`` of that row's ring. For a query the
valid keys are always the same slots, holding the same values, whatever the chunking of the
audio or the other rows of the batch; the other slots are masked. So a stream's attention does
not depend on how its audio arrived or with whom it was decoded. The mask is built once per
pass (``prepare``) from the rows' host-side offsets; nothing here evaluates an array.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import numpy as np


class Rows:
    """Host-side bookkeeping of a batch's rows through one stack of attention layers.

    ``offsets[r]`` counts the positions written for row ``r``. A pass is set up with
    ``prepare(rows, lengths, length)``: row ``rows.start + i`` brings ``lengths[i]`` real
    positions (``length`` with padding). Padding positions are written into slots the row does
    not use (they hold positions outside every future query's window) and are never attended
    by a real query; ``finalize`` advances each row by its real length only.

    The ring holds ``window + max_chunk - 1`` slots at most, so a pass of up to ``max_chunk``
    positions never overwrites a key that one of its queries still needs. It grows by ``step``
    slots as positions arrive, and only before any row wraps, so ``p % capacity`` is the slot
    of ``p`` for the whole life of a row.
    """

    step = 256

    def __init__(self, window: int, max_chunk: int):
        self.window = window
        self.max_chunk = max_chunk
        self.max_capacity = window + max_chunk - 1
        self.capacity = 0
        self.offsets: list[int] = []
        # the pass being built
        self.rows = slice(0, 0)
        self.length = 0
        self.lengths: list[int] = []
        self.offset: Optional[mx.array] = None  # [n] first position of each row in this pass
        self.slots: Optional[mx.array] = None  # [n, L] slot of each position
        self.row_index: Optional[mx.array] = None  # [n, 1]
        self.start_slot: Optional[int] = None  # set when every row writes the same slots
        self.mask: Optional[mx.array] = None  # [n, 1, L, capacity]

    def __len__(self) -> int:
        return len(self.offsets)

    def prepare(self, rows: slice, lengths: Sequence[int], length: int) -> None:
        if length > self.max_chunk:
            raise ValueError(f"{length} positions in one pass; this cache takes at most {self.max_chunk}")
        self.rows, self.length, self.lengths = rows, length, list(lengths)
        offsets = np.asarray(self.offsets[rows], np.int64)
        end = int(offsets.max()) + length
        if end > self.capacity and self.capacity < self.max_capacity:
            self.capacity = min(self.max_capacity, -(-end // self.step) * self.step)
        cap = self.capacity
        starts = offsets % cap
        wraps = bool((starts + length > cap).any())
        self.start_slot = int(starts[0]) if (starts == starts[0]).all() and not wraps else None
        self.offset = mx.array(offsets.astype(np.int32))
        q = self.offset[:, None] + mx.arange(length, dtype=mx.int32)[None]  # [n, L] query positions
        self.slots = q % cap
        self.row_index = mx.arange(rows.start, rows.stop, dtype=mx.int32)[:, None]
        # the position each slot holds once this pass is written (negative: never written)
        last = (self.offset + (length - 1))[:, None]
        held = last - (last - mx.arange(cap, dtype=mx.int32)[None]) % cap  # [n, cap]
        held, q = held[:, None, :], q[:, :, None]
        self.mask = ((held <= q) & (held > q - self.window) & (held >= 0))[:, None]

    def finalize(self) -> None:
        for i, n in enumerate(self.lengths):
            self.offsets[self.rows.start + i] += n
        self.mask = self.slots = self.offset = self.row_index = None


class KVCache:
    """Keys and values of one attention layer for a batch of streams (see ``Rows``).

    ``keys``/``values`` are ``[rows allocated, heads, capacity, head_dim]`` buffers;
    ``update_and_fetch`` writes the pass's positions into them in place and returns the
    pass's rows, to be attended with ``rows.mask``.
    """

    def __init__(self, rows: Rows):
        self.ring = rows
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None

    @property
    def offset(self) -> mx.array:
        """The pass's first position per row (RoPE offsets)."""
        return self.ring.offset

    def _fit(self, keys: mx.array, values: mx.array) -> None:
        """Allocate, or grow to the rows and capacity the batch needs now."""
        need_rows, cap = len(self.ring), self.ring.capacity
        if self.keys is None:
            rows = max(need_rows, 1)
            self.keys = mx.zeros((rows, keys.shape[1], cap, keys.shape[3]), keys.dtype)
            self.values = mx.zeros((rows, values.shape[1], cap, values.shape[3]), values.dtype)
            return
        if self.keys.shape[2] < cap:
            grow = cap - self.keys.shape[2]
            self.keys, self.values = (
                mx.concatenate([t, mx.zeros((*t.shape[:2], grow, t.shape[3]), t.dtype)], axis=2)
                for t in (self.keys, self.values)
            )
        if self.keys.shape[0] < need_rows:
            grow = max(need_rows, 2 * self.keys.shape[0]) - self.keys.shape[0]
            self.keys, self.values = (
                mx.concatenate([t, mx.zeros((grow, *t.shape[1:]), t.dtype)]) for t in (self.keys, self.values)
            )

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store the pass's ``keys``/``values`` ``[n, heads, L, head_dim]``; return the rows'
        whole rings ``[n, heads, capacity, head_dim]`` (in the stored dtype)."""
        ring = self.ring
        self._fit(keys, values)
        keys, values = keys.astype(self.keys.dtype), values.astype(self.values.dtype)
        rows = ring.rows
        if ring.start_slot is not None:  # one slot range for all rows: a plain slice update
            s = slice(ring.start_slot, ring.start_slot + ring.length)
            self.keys[rows, :, s] = keys
            self.values[rows, :, s] = values
        else:
            self.keys[ring.row_index, :, ring.slots] = keys.transpose(0, 2, 1, 3)
            self.values[ring.row_index, :, ring.slots] = values.transpose(0, 2, 1, 3)
        return self.keys[rows], self.values[rows]

    def move_row(self, src: int, dst: int) -> None:
        if self.keys is not None and src != dst:
            self.keys[dst] = self.keys[src]
            self.values[dst] = self.values[src]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class ConvCache:
    """The last ``keep`` inputs of each row's causal convolution (zeros at a stream's start),
    which its next pass continues from."""

    def __init__(self, keep: int):
        self.keep = keep
        self.tail: Optional[mx.array] = None  # [rows allocated, keep, channels]
        self._rows = slice(0, 0)
        self._lengths: list[int] = []
        self._n_rows = 0

    def prepare(self, rows: slice, lengths: Sequence[int], n_rows: int) -> None:
        self._rows, self._lengths, self._n_rows = rows, list(lengths), n_rows

    def update(self, x: mx.array) -> mx.array:
        """``x`` ``[n, T, C]`` (row i's first ``lengths[i]`` frames real) -> the input to
        convolve, ``[n, keep + T, C]``; each row keeps the tail of its real frames."""
        if self.tail is None or self.tail.shape[0] < self._n_rows:
            rows = max(self._n_rows, 1 if self.tail is None else 2 * self.tail.shape[0])
            grown = mx.zeros((rows, self.keep, x.shape[2]), x.dtype)
            if self.tail is not None:
                grown[: self.tail.shape[0]] = self.tail
            self.tail = grown
        joined = mx.concatenate([self.tail[self._rows].astype(x.dtype), x], axis=1)
        index = mx.array(self._lengths, dtype=mx.int32)[:, None] + mx.arange(self.keep, dtype=mx.int32)[None]
        self.tail[self._rows] = mx.take_along_axis(joined, index[..., None], axis=1)
        return joined

    def reset_row(self, row: int) -> None:
        if self.tail is not None and row < self.tail.shape[0]:
            self.tail[row] = mx.zeros(self.tail.shape[1:], self.tail.dtype)

    def move_row(self, src: int, dst: int) -> None:
        if self.tail is not None and src != dst and src < self.tail.shape[0]:
            self.tail[dst] = self.tail[src]

    @property
    def nbytes(self) -> int:
        return 0 if self.tail is None else self.tail.nbytes


class LayerCaches:
    """The KV caches of one stack of attention layers (``Rows`` shared by all of them):
    iterate it like mlx-lm's list of per-layer caches; ``mask`` is the pass's mask."""

    def __init__(self, n_layers: int, window: int, max_chunk: int):
        self.rows = Rows(window, max_chunk)
        self.layers = [KVCache(self.rows) for _ in range(n_layers)]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> KVCache:
        return self.layers[i]

    @property
    def mask(self) -> mx.array:
        return self.rows.mask

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def add_row(self) -> int:
        self.rows.offsets.append(0)
        return len(self.rows) - 1

    def reset_row(self, row: int) -> None:
        self.rows.offsets[row] = 0  # its slots now hold no valid position

    def remove_row(self, row: int) -> None:
        """Drop ``row``; the last row moves into its place."""
        last = len(self.rows) - 1
        for layer in self.layers:
            layer.move_row(last, row)
        self.rows.offsets[row] = self.rows.offsets[last]
        self.rows.offsets.pop()

    def prepare(self, rows: slice, lengths: Sequence[int], length: int) -> None:
        self.rows.prepare(rows, lengths, length)

    def finalize(self) -> None:
        self.rows.finalize()

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


class EncoderCache(LayerCaches):
    """The encoder's state per row: the conv stem's tails and the layers' KV caches.

    ``prepare`` takes lengths in mel frames (the conv stem's input); the layers see half as
    many (the stem's stride 2).
    """

    def __init__(self, n_layers: int, window: int, max_chunk: int, conv_keep: Sequence[int]):
        super().__init__(n_layers, window, max_chunk)
        self.conv = [ConvCache(k) for k in conv_keep]

    def add_row(self) -> int:
        row = super().add_row()
        for c in self.conv:
            c.reset_row(row)  # a row that held another stream before
        return row

    def reset_row(self, row: int) -> None:
        super().reset_row(row)
        for c in self.conv:
            c.reset_row(row)

    def remove_row(self, row: int) -> None:
        last = len(self.rows) - 1
        for c in self.conv:
            c.move_row(last, row)
        super().remove_row(row)

    def prepare(self, rows: slice, lengths: Sequence[int], length: int) -> None:
        for c in self.conv:
            c.prepare(rows, lengths, len(self.rows))
        super().prepare(rows, [n // 2 for n in lengths], length // 2)

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(c.nbytes for c in self.conv)


class Cache:
    """The whole model's state for a batch of streams: row ``r`` of the encoder's and of the
    decoder's caches is the same stream."""

    def __init__(self, encoder, decoder):
        self.encoder = encoder
        self.decoder = decoder

    def add_row(self) -> int:
        row = self.encoder.add_row()
        if self.decoder.add_row() != row:
            raise RuntimeError("encoder and decoder caches disagree on their rows")
        return row

    def reset_row(self, row: int) -> None:
        """Start the row's stream afresh (nothing it held is seen again)."""
        self.encoder.reset_row(row)
        self.decoder.reset_row(row)

    def remove_row(self, row: int) -> None:
        """Drop ``row``; the last row takes its place (its stream keeps its state)."""
        self.encoder.remove_row(row)
        self.decoder.remove_row(row)

    @property
    def n_rows(self) -> int:
        return self.decoder.n_rows

    @property
    def nbytes(self) -> int:
        return self.encoder.nbytes + self.decoder.nbytes
