"""The static KV cache: one buffer per layer, allocated once and written in place.

Layout ``[rows, length, kv_heads, head_dim]`` (the layout flash-attn's kv-cache kernels read);
attention takes ``transpose(1, 2)`` views. Each row has its own write column (a ``[rows]`` device
tensor that a CUDA graph advances), so rows at different lengths share one decode step: the
Generator stores each prompt from column 0 (right-padded), and a row's next token goes to the
column after its last one. ``valid[r, c]`` says whether column c of row r holds a real key (False
for padding and for columns not yet written); rows can be moved (`move_rows`) when finished
rows leave the batch.
"""

from __future__ import annotations

import torch


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class StaticKVCache:
    """Preallocated keys/values for ``rows`` sequences of up to ``length`` tokens.

    Attributes:
        keys, values: lists (one per layer) of ``[rows, length, kv_heads, head_dim]`` tensors.
        valid: ``[rows, length]`` bool, True where a column holds a real token's key.
        block: decode attention reads the first ``live_length(slot)`` columns only, a multiple of
            ``block`` (one CUDA graph per such length), so a step costs the live cache, not all of it.
    """

    def __init__(
        self, *, layers: int, rows: int, length: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device, block: int = 128,
    ):
        self.block = block
        self.length = round_up(length, block)
        shape = (rows, self.length, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.valid = torch.zeros(rows, self.length, dtype=torch.bool, device=device)

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def live_length(self, slot: int) -> int:
        """Columns that decode attention reads when writing column ``slot``: ``slot + 1`` rounded up."""
        return min(round_up(slot + 1, self.block), self.length)

    def write_prompts(
        self, layer: int, row0: int, k: torch.Tensor, v: torch.Tensor, copies: int | torch.Tensor
    ) -> None:
        """Store prefill keys/values ``[b, P, kv_heads, head_dim]`` in columns ``[0, P)`` of the
        rows from ``row0`` on: prompt i fills ``copies`` rows (an int), one prompt after the other;
        or ``copies`` is a ``[m]`` int64 tensor, the prompt of each of the m rows."""
        b, plen = k.shape[:2]
        if isinstance(copies, torch.Tensor):
            rows = slice(row0, row0 + copies.shape[0])
            for cache, new in ((self.keys[layer], k), (self.values[layer], v)):
                cache[rows, :plen].copy_(new[copies])
            return
        rows = slice(row0, row0 + b * copies)
        for cache, new in ((self.keys[layer], k), (self.values[layer], v)):
            cache[rows].view(b, copies, *cache.shape[1:])[:, :, :plen].copy_(new[:, None])

    def write_token(self, layer: int, n: int, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one step's ``[n, kv_heads, head_dim]`` keys/values of rows ``0 .. n-1`` at column
        ``slot[r]`` of row r (``slot``: ``[n]`` int64, or ``[1]`` for one column shared by all rows)."""
        index = slot.view(-1, 1, 1, 1).expand(n, 1, *k.shape[1:])
        self.keys[layer][:n].scatter_(1, index, k[:, None])
        self.values[layer][:n].scatter_(1, index, v[:, None])

    def move_rows(self, target: torch.Tensor, source: torch.Tensor, columns: int) -> None:
        """Copy rows ``source`` to rows ``target`` (``[k]`` int64 device tensors, disjoint): keys
        and values of columns ``[0, columns)`` only (the others are written before they are read
        again), and the whole ``valid`` row (attention must not see the old occupant's columns)."""
        for cache in (*self.keys, *self.values):
            cache[target, :columns] = cache[source, :columns]
        self.valid[target] = self.valid[source]

    def view(self, layer: int, n: int, live: int):
        """``(keys, values)`` of the first n rows and ``live`` columns, ``[n, kv_heads, live, head_dim]``."""
        return (
            self.keys[layer][:n, :live].transpose(1, 2),
            self.values[layer][:n, :live].transpose(1, 2),
        )
