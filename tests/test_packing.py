"""rftengine.packing and the rftengine._C extension; CPU only, torch used by one test if present."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

import rftengine
from rftengine import packing
from rftengine.packing import (
    FlatBatch,
    PackedBatch,
    first_fit_decreasing,
    pack_flat,
    pack_sequences,
)


def ffd_reference(lengths: list[int], budget: int) -> list[list[int]]:
    """Textbook O(N * bins) first-fit-decreasing: the oracle for the C++ segment-tree version."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return bins


def random_sequences(rng: np.random.Generator, n: int, max_len: int) -> list[np.ndarray]:
    lengths = rng.integers(0, max_len + 1, size=n)
    return [rng.integers(1, 50_000, size=k) for k in lengths]


def check_packed(batch: PackedBatch, sequences: list, budget: int, pad_id: int) -> None:
    """Every invariant a consumer of a PackedBatch relies on."""
    n = len(sequences)
    num_bins = len(batch.bins)
    assert batch.input_ids.shape == batch.position_ids.shape == (num_bins, budget)
    assert batch.input_ids.dtype == batch.position_ids.dtype == np.int64
    assert len(batch.cu_seqlens) == num_bins
    assert batch.seq_row.shape == batch.seq_start.shape == batch.seq_len.shape == (n,)

    # Every sequence sits in exactly one bin, and the bins are FFD's.
    members = np.concatenate(batch.bins) if num_bins else np.empty(0, np.int64)
    assert sorted(members.tolist()) == list(range(n))
    assert [b.tolist() for b in batch.bins] == ffd_reference([len(s) for s in sequences], budget)

    # Every token placed exactly once: each sequence reads back from where seq_row/seq_start say.
    ids, pos = batch.unpack(batch.input_ids), batch.unpack(batch.position_ids)
    for i, seq in enumerate(sequences):
        seq = np.asarray(seq, dtype=np.int64)
        np.testing.assert_array_equal(ids[i], seq, err_msg=f"sequence {i}")
        np.testing.assert_array_equal(pos[i], np.arange(len(seq)), err_msg=f"sequence {i}")

    for b, (members_b, cu) in enumerate(zip(batch.bins, batch.cu_seqlens)):
        lens = np.array([len(sequences[i]) for i in members_b], dtype=np.int64)
        assert cu.dtype == np.int32 and cu.shape == (len(members_b) + 1,)
        np.testing.assert_array_equal(cu, np.concatenate([[0], np.cumsum(lens)]))
        used = int(cu[-1])
        assert used <= budget
        # Sequences in row order; position_ids restart at 0 at each cu_seqlens start.
        np.testing.assert_array_equal(batch.seq_row[members_b], b)
        np.testing.assert_array_equal(batch.seq_start[members_b], cu[:-1])
        expected_pos = np.arange(used) - np.repeat(cu[:-1].astype(np.int64), lens)
        np.testing.assert_array_equal(batch.position_ids[b, :used], expected_pos)
        # Padding: pad_id, position 0.
        assert (batch.input_ids[b, used:] == pad_id).all()
        assert (batch.position_ids[b, used:] == 0).all()


# --- the extension ---------------------------------------------------------------------------


def test_extension_imports():
    import rftengine._C as C

    for name in ("first_fit_decreasing", "pack_rows", "flat_layout"):
        assert callable(getattr(C, name))


def test_missing_extension_says_how_to_fix(monkeypatch):
    monkeypatch.delattr(rftengine, "_C")
    monkeypatch.setitem(sys.modules, "rftengine._C", None)
    spec = importlib.util.spec_from_file_location("_packing_without_C", packing.__file__)
    fix = r"rftengine\._C is not built: reinstall with `pip install -e \.`"
    with pytest.raises(ImportError, match=fix):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


# --- first_fit_decreasing --------------------------------------------------------------------


def test_ffd_hand_checked():
    # Longest first: 7 -> bin0 (room 3), 5 -> bin1 (5), 4 -> bin1 (1), 3 -> bin0 (0),
    # 2 -> bin2 (8), 1 -> bin1 (0).
    bins = first_fit_decreasing([5, 3, 7, 2, 4, 1], 10)
    assert [b.tolist() for b in bins] == [[2, 1], [0, 4, 5], [3]]
    assert all(b.dtype == np.int64 for b in bins)


def test_ffd_finds_perfect_packing():
    # 7+3, 6+4, 5+5: three full bins, the optimum.
    bins = first_fit_decreasing([6, 4, 5, 5, 7, 3], 10)
    assert [b.tolist() for b in bins] == [[4, 5], [0, 1], [2, 3]]


def test_ffd_ties_by_index_and_zero_lengths():
    assert [b.tolist() for b in first_fit_decreasing([3, 3, 3, 3], 6)] == [[0, 1], [2, 3]]
    assert [b.tolist() for b in first_fit_decreasing([0, 5, 0], 5)] == [[1, 0, 2]]
    assert [b.tolist() for b in first_fit_decreasing([0, 0], 1)] == [[0, 1]]


def test_ffd_exact_fit_and_one_per_bin():
    assert [b.tolist() for b in first_fit_decreasing([4, 4, 4], 4)] == [[0], [1], [2]]
    bins = first_fit_decreasing(np.array([1, 1, 1], np.int32), 3)
    assert [b.tolist() for b in bins] == [[0, 1, 2]]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("n", [1, 41, 401, 1271])
def test_ffd_matches_reference(seed, n):
    rng = np.random.default_rng(seed)
    budget = int(rng.integers(1, 300))
    lengths = rng.integers(0, budget + 1, size=n)
    bins = first_fit_decreasing(lengths, budget)
    assert [b.tolist() for b in bins] == ffd_reference(lengths.tolist(), budget)
    loads = np.array([lengths[b].sum() for b in bins])
    assert (loads <= budget).all()
    # First-fit property: no two bins could be merged, i.e. loads[i] + loads[j] > budget.
    # (Holds when lengths are positive; zero-length sequences never open a bin.)
    if len(loads) > 1:
        pair = loads[:, None] + loads[None, :]
        assert (pair[~np.eye(len(loads), dtype=bool)] > budget).all()


def test_ffd_empty():
    assert first_fit_decreasing([], 8) == []
    assert first_fit_decreasing(np.empty(0, np.int64), 8) == []


def test_ffd_errors():
    with pytest.raises(ValueError, match=r"sequence 2 has length 9 > budget 8"):
        first_fit_decreasing([1, 2, 9], 8)
    with pytest.raises(ValueError, match=r"lengths\[1\] must be >= 0, got -2"):
        first_fit_decreasing([1, -2], 8)
    with pytest.raises(ValueError, match=r"budget must be an int in \[1, .*got 0"):
        first_fit_decreasing([1], 0)
    with pytest.raises(ValueError, match=r"budget must be an int, got float 2\.5"):
        first_fit_decreasing([1], 2.5)
    with pytest.raises(ValueError, match=r"budget must be an int, got bool"):
        first_fit_decreasing([1], True)
    with pytest.raises(ValueError, match=r"lengths must hold ints, got dtype float64"):
        first_fit_decreasing([1.0, 2.0], 8)
    with pytest.raises(ValueError, match=r"lengths must be 1-D, got shape \(2, 2\)"):
        first_fit_decreasing([[1, 2], [3, 4]], 8)
    with pytest.raises(ValueError, match=r"lengths must be a 1-D sequence of ints, got str"):
        first_fit_decreasing("12", 8)


# --- pack_sequences --------------------------------------------------------------------------


def test_pack_hand_checked():
    batch = pack_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 6, pad_id=-1)
    np.testing.assert_array_equal(batch.input_ids, [[6, 7, 8, 9, 4, 5], [1, 2, 3, -1, -1, -1]])
    np.testing.assert_array_equal(batch.position_ids, [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]])
    assert [cu.tolist() for cu in batch.cu_seqlens] == [[0, 4, 6], [0, 3]]
    assert [b.tolist() for b in batch.bins] == [[2, 1], [0]]
    assert batch.seq_row.tolist() == [1, 0, 0]
    assert batch.seq_start.tolist() == [0, 4, 0]
    assert batch.seq_len.tolist() == [3, 2, 4]


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize(
    "n, max_len, budget", [(1, 7, 7), (41, 33, 64), (401, 200, 257), (1271, 97, 128)]
)
def test_pack_random(seed, n, max_len, budget):
    rng = np.random.default_rng(seed)
    sequences = random_sequences(rng, n, max_len)
    pad_id = int(rng.integers(0, 10))
    check_packed(pack_sequences(sequences, budget, pad_id=pad_id), sequences, budget, pad_id)


def test_pack_accepts_lists_tuples_and_other_int_dtypes():
    sequences = [(5, 6), np.array([7, 8, 9], np.int32), np.array([1], np.uint16), []]
    batch = pack_sequences(sequences, 4)
    check_packed(batch, sequences, 4, 0)
    # A 2-D array is a list of equal-length rows.
    rows = np.arange(12).reshape(4, 3)
    check_packed(pack_sequences(rows, 6), list(rows), 6, 0)


def test_pack_accepts_torch_tensors_and_unpacks_them():
    torch = pytest.importorskip("torch")
    sequences = [torch.tensor([3, 1, 4]), torch.tensor([1, 5]), torch.tensor([9, 2, 6, 5])]
    batch = pack_sequences(sequences, 5)
    check_packed(batch, [s.numpy() for s in sequences], 5, 0)
    # unpack works on per-token outputs with trailing dims, e.g. [B, T, vocab] logits.
    logits = torch.from_numpy(batch.input_ids)[..., None].expand(-1, -1, 2)
    for seq, got in zip(sequences, batch.unpack(logits)):
        assert torch.equal(got[:, 1], seq)


def test_unpack_rejects_wrong_shape():
    batch = pack_sequences([[1, 2], [3]], 4)
    with pytest.raises(ValueError, match=r"packed must have leading shape \(1, 4\).*got \(1, 5\)"):
        batch.unpack(np.zeros((1, 5)))


def test_pack_empty_inputs():
    batch = pack_sequences([], 8)
    assert batch.input_ids.shape == batch.position_ids.shape == (0, 8)
    assert batch.cu_seqlens == [] and batch.bins == []
    assert batch.seq_row.shape == batch.seq_start.shape == batch.seq_len.shape == (0,)
    # Only empty sequences: one all-padding row holding all of them.
    batch = pack_sequences([[], []], 3, pad_id=7)
    np.testing.assert_array_equal(batch.input_ids, [[7, 7, 7]])
    assert [cu.tolist() for cu in batch.cu_seqlens] == [[0, 0, 0]]
    assert [u.tolist() for u in batch.unpack(batch.input_ids)] == [[], []]


def test_pack_errors():
    with pytest.raises(ValueError, match=r"sequence 1 has length 5 > budget 4"):
        pack_sequences([[1], [1, 2, 3, 4, 5]], 4)
    with pytest.raises(ValueError, match=r"budget must be <= 2147483647 \(cu_seqlens are int32\)"):
        pack_sequences([[1]], 2**31)
    with pytest.raises(ValueError, match=r"pad_id must be an int, got NoneType"):
        pack_sequences([[1]], 4, pad_id=None)
    with pytest.raises(ValueError, match=r"sequences must be a list of 1-D integer .*got int"):
        pack_sequences(3, 4)
    with pytest.raises(ValueError, match=r"sequences must be a list .*got str"):
        pack_sequences("abc", 4)
    with pytest.raises(ValueError, match=r"sequences\[0\] must be 1-D, got shape \(\)"):
        pack_sequences([1, 2, 3], 4)
    with pytest.raises(ValueError, match=r"sequences\[1\] must hold ints, got dtype float64"):
        pack_sequences([[1], [0.5]], 4)
    with pytest.raises(ValueError, match=r"sequences\[0\] must fit in int64"):
        pack_sequences([np.array([2**63], np.uint64)], 4)


# --- pack_flat -------------------------------------------------------------------------------


def test_flat_hand_checked():
    flat = pack_flat([[1, 2, 3], [], [4, 5]])
    assert isinstance(flat, FlatBatch)
    assert flat.input_ids.tolist() == [1, 2, 3, 4, 5]
    assert flat.position_ids.tolist() == [0, 1, 2, 0, 1]
    assert flat.cu_seqlens.tolist() == [0, 3, 3, 5] and flat.cu_seqlens.dtype == np.int32
    assert flat.max_seqlen == 3


@pytest.mark.parametrize("seed", range(5))
def test_flat_random(seed):
    rng = np.random.default_rng(seed)
    sequences = random_sequences(rng, 401, 77)
    flat = pack_flat(sequences)
    lens = np.array([len(s) for s in sequences])
    np.testing.assert_array_equal(flat.cu_seqlens, np.concatenate([[0], np.cumsum(lens)]))
    for i, seq in enumerate(sequences):
        a, b = flat.cu_seqlens[i], flat.cu_seqlens[i + 1]
        np.testing.assert_array_equal(flat.input_ids[a:b], seq)
        np.testing.assert_array_equal(flat.position_ids[a:b], np.arange(len(seq)))
    assert flat.max_seqlen == lens.max()


def test_flat_empty():
    flat = pack_flat([])
    assert flat.input_ids.shape == flat.position_ids.shape == (0,)
    assert flat.cu_seqlens.tolist() == [0] and flat.max_seqlen == 0


# --- rftengine._C validates its own inputs (it is importable directly) --------------------------


def test_C_pack_rows_rejects_inconsistent_bins():
    from rftengine import _C

    tokens = np.arange(5, dtype=np.int64)
    offsets = np.array([0, 2, 5], np.int64)
    with pytest.raises(ValueError, match=r"sequence 0 appears in more than one place"):
        _C.pack_rows(tokens, offsets, np.array([0, 0]), np.array([0, 2]), 8, 0)
    with pytest.raises(ValueError, match=r"bin_items\[1\] must be a sequence index in \[0, 2\)"):
        _C.pack_rows(tokens, offsets, np.array([0, 7]), np.array([0, 2]), 8, 0)
    with pytest.raises(ValueError, match=r"bin 0 holds more than budget 4 tokens"):
        _C.pack_rows(tokens, offsets, np.array([0, 1]), np.array([0, 2]), 4, 0)
    with pytest.raises(ValueError, match=r"bin_items must list each of the 2 sequences once"):
        _C.pack_rows(tokens, offsets, np.array([0]), np.array([0, 1]), 8, 0)
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing"):
        _C.pack_rows(tokens, np.array([0, 3, 2, 5]), np.arange(3), np.array([0, 3]), 8, 0)
    with pytest.raises(ValueError, match=r"offsets must end at 5"):
        _C.pack_rows(tokens, np.array([0, 2, 4]), np.array([0, 1]), np.array([0, 2]), 8, 0)
    with pytest.raises(ValueError, match=r"tokens must be 1-D, got 2 dimensions"):
        _C.pack_rows(tokens.reshape(1, 5), offsets, np.array([0, 1]), np.array([0, 2]), 8, 0)
