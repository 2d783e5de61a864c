"""Padding-free sequence packing for attention that reads sequence boundaries, not a mask.

Two layouts, both giving `position_ids` that restart at 0 for each sequence and int32
`cu_seqlens` (the format of flash-attn's varlen functions and of HF's padding-free path):

- `pack_sequences`: one row of exactly `budget` tokens per bin, sequences assigned to rows by
  first-fit-decreasing (fixed shapes: a token budget per micro-batch, CUDA-graph buckets).
- `pack_flat`: every sequence end to end in input order, one stream without padding.

The algorithms are C++ (`rftengine._C`, csrc/packing.cpp, run without the GIL); this module
validates inputs and gives the results their documented shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

try:
    from rftengine import _C
except ImportError as e:
    raise ImportError(
        "rftengine._C is not built: reinstall with `pip install -e .` (needs g++ and pybind11)"
    ) from e

_INT64 = np.iinfo(np.int64)


class PackedBatch(NamedTuple):
    """Sequences packed one row per bin.

    B = bins, T = budget, N = sequences, n_b = sequences in bin b.

    input_ids:    [B, T] int64. Row b holds its sequences back to back, then pad_id.
    position_ids: [B, T] int64. 0, 1, ... within each sequence; 0 on padding.
    cu_seqlens:   B arrays, bin b's [n_b + 1] int32: where its sequences start in the row, from 0;
                  the last entry is the row's token count, so row b's padding is
                  input_ids[b, cu_seqlens[b][-1]:].
    bins:         B arrays, bin b's [n_b] int64 sequence indices in row order.
    seq_row, seq_start, seq_len: [N] int64 each. Sequence i is
                  input_ids[seq_row[i], seq_start[i] : seq_start[i] + seq_len[i]].
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: list[np.ndarray]
    bins: list[np.ndarray]
    seq_row: np.ndarray
    seq_start: np.ndarray
    seq_len: np.ndarray

    def unpack(self, packed: Any) -> list[Any]:
        """Per-sequence slices of a per-token output laid out like `input_ids`.

        packed: [B, T, ...] numpy array or torch tensor (e.g. per-token log-probs).
        Returns N views, sequence i's [seq_len[i], ...], in input order.
        """
        if tuple(packed.shape[:2]) != self.input_ids.shape:
            raise ValueError(
                f"packed must have leading shape {self.input_ids.shape} (like input_ids), "
                f"got {tuple(packed.shape)}"
            )
        return [
            packed[r, s : s + n]
            for r, s, n in zip(
                self.seq_row.tolist(), self.seq_start.tolist(), self.seq_len.tolist()
            )
        ]


class FlatBatch(NamedTuple):
    """Sequences laid end to end in input order. L = total tokens, N = sequences.

    input_ids:    [L] int64, sequence i is input_ids[cu_seqlens[i]:cu_seqlens[i + 1]].
    position_ids: [L] int64, 0, 1, ... within each sequence.
    cu_seqlens:   [N + 1] int32, from 0 to L.
    max_seqlen:   longest sequence (0 when there is none), as flash-attn's varlen calls want it.
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    max_seqlen: int


def first_fit_decreasing(lengths: Sequence[int] | np.ndarray, budget: int) -> list[np.ndarray]:
    """Bin packing of sequence lengths under a token budget, first-fit-decreasing.

    Sequences are taken longest first (ties: lower index first) and each goes into the first bin
    with room, so every bin holds at most `budget` tokens and the result is deterministic.
    FFD uses at most 11/9 OPT + 6/9 bins (Dósa, 2007). O(N log N).

    lengths: [N] non-negative ints; each must be <= budget.
    Returns a list of int64 arrays, bin b's sequence indices in placement order; [] when N = 0.
    """
    _check_int("budget", budget, minimum=1)
    lengths = _as_int64("lengths", lengths)
    items, offsets = _C.first_fit_decreasing(lengths, int(budget))
    return _split(items, offsets)


def pack_sequences(
    sequences: Sequence[Sequence[int] | np.ndarray], budget: int, *, pad_id: int = 0
) -> PackedBatch:
    """Packs token sequences into rows of `budget` tokens, assigning them by `first_fit_decreasing`.

    sequences: N 1-D integer token sequences (lists, numpy arrays, CPU tensors); each must
               hold <= budget tokens (<= 2**31 - 1, since cu_seqlens are int32).
    pad_id:    token id written after each row's last sequence.
    Returns a `PackedBatch` (shapes there); with N = 0, input_ids is [0, budget].
    """
    _check_int("budget", budget, minimum=1)
    _check_int("pad_id", pad_id)
    tokens, offsets = _as_ragged(sequences)
    lengths = np.diff(offsets)
    items, bin_offsets = _C.first_fit_decreasing(lengths, int(budget))
    input_ids, position_ids, cu_flat, seq_row, seq_start = _C.pack_rows(
        tokens, offsets, items, bin_offsets, int(budget), int(pad_id)
    )
    # Bin b's n_b + 1 cu_seqlens entries start at bin_offsets[b] + b in cu_flat.
    cu_offsets = bin_offsets + np.arange(len(bin_offsets))
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=_split(cu_flat, cu_offsets),
        bins=_split(items, bin_offsets),
        seq_row=seq_row,
        seq_start=seq_start,
        seq_len=lengths,
    )


def pack_flat(sequences: Sequence[Sequence[int] | np.ndarray]) -> FlatBatch:
    """Lays token sequences end to end in input order: one stream, no padding, no reordering.

    sequences: N 1-D integer token sequences (lists, numpy arrays, CPU tensors), 2**31 - 1
               tokens in all at most (cu_seqlens are int32).
    Returns a `FlatBatch` (shapes there).
    """
    tokens, offsets = _as_ragged(sequences)
    position_ids, cu_seqlens = _C.flat_layout(offsets)
    max_seqlen = int(np.diff(offsets).max()) if len(offsets) > 1 else 0
    return FlatBatch(tokens, position_ids, cu_seqlens, max_seqlen)


def _split(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    # np.split(flat, []) would give one empty piece where zero bins means an empty list.
    bounds = offsets.tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _check_int(name: str, value: object, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    low = _INT64.min if minimum is None else minimum
    if not low <= value <= _INT64.max:
        raise ValueError(f"{name} must be an int in [{low}, {_INT64.max}], got {value}")


def _as_int64(name: str, values: object) -> np.ndarray:
    """A 1-D integer array-like (list, numpy array, CPU tensor) as a contiguous int64 array."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a 1-D sequence of ints, got {type(values).__name__}")
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must be a 1-D sequence of ints: {e}") from e
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:  # np.asarray([]) is float64
        return np.empty(0, np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold ints, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.max() > _INT64.max:
        raise ValueError(f"{name} must fit in int64, got a value {arr.max()} > {_INT64.max}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _as_ragged(sequences: object) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences in CSR form: (tokens [L] int64, offsets [N + 1] int64)."""
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, (Sequence, np.ndarray)):
        raise ValueError(
            "sequences must be a list of 1-D integer token sequences, "
            f"got {type(sequences).__name__}"
        )
    arrays = [_as_int64(f"sequences[{i}]", s) for i, s in enumerate(sequences)]
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum(np.fromiter((a.size for a in arrays), np.int64, len(arrays)), out=offsets[1:])
    tokens = np.concatenate(arrays) if arrays else np.empty(0, np.int64)
    return tokens, offsets
