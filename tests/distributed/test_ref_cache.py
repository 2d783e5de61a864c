"""DPO's precomputed reference log-probs under torchrun: each rank computes its share only."""

from pathlib import Path

import pytest
import torch

from .launch import run_torchrun


@pytest.mark.slow
def test_each_rank_computes_its_share_of_the_reference_cache(tmp_path):
    """5 pairs in reference batches of 2 over 2 ranks: rank 0 runs the batches of pairs 0-1 and
    2-3, rank 1 the batch of pair 4 plus a padding batch (a sharded reference needs every rank
    in each forward); each pair goes through the batch it has in one process, so the gathered
    cache, the same on every rank, is the one-process cache of all 5 pairs, bit for bit."""
    out = tmp_path / "cache.pt"
    proc = run_torchrun([str(Path(__file__).with_name("ref_cache_worker.py")), str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out)
    assert got["counts"] == [[2, 2], [1, 2]]
    assert got["cache"].shape == (5, 2)
    torch.testing.assert_close(got["cache"], got["whole"], rtol=0, atol=0)
