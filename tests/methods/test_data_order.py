"""The deterministic data order: every epoch covered, the same batches from any resume position."""

from rftengine.methods.data_order import batch_indices


def test_batch_indices_cover_each_epoch_and_resume_anywhere():
    n, bs, seed = 7, 3, 5
    position, seen = 0, []
    for _ in range(7):  # 21 examples = exactly 3 epochs
        seen.extend(batch_indices(n, bs, position, seed))
        position += bs
    for epoch in range(3):
        assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert seen[:n] != seen[n:2 * n]  # a new order each epoch
    assert batch_indices(n, bs, 9, seed) == seen[9:12]  # pure function of the position
    assert batch_indices(n, bs, 0, seed, shuffle=False) == [0, 1, 2]
