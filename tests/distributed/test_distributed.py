"""``rftengine.distributed``: the identity in one process, the global values under torchrun."""

import json
from pathlib import Path

import pytest
import torch

from rftengine import distributed

from .launch import run_torchrun


def test_one_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched_by_torchrun()
    with distributed.process_group("auto") as device:
        assert device is None and not distributed.is_distributed()
    assert distributed.shard_batch([3, 1, 2]) == [3, 1, 2]
    x = torch.tensor([1.0, 2.0, 6.0])
    assert distributed.global_mean(x) == x.mean()
    assert distributed.global_std(x) == x.std(unbiased=False)
    assert distributed.mean_over_ranks({"loss": 1.5}) == {"loss": 1.5}
    assert distributed.max_over_ranks(None) is None and distributed.max_over_ranks(2) == 2
    distributed.require_divisible(7)  # any batch divides over one rank
    assert distributed.even_share(5) == (0, 5, 5)
    assert distributed.all_gather_cat(x) is x and distributed.all_gather_objects("a") == ["a"]


@pytest.mark.parametrize("n, world, shares", [
    (5, 2, [(0, 3, 3), (3, 5, 3)]),          # the last rank's share is short: it pads to 3
    (1, 3, [(0, 1, 1), (1, 1, 1), (1, 1, 1)]),  # ranks with nothing still run one padded item
    (6, 3, [(0, 2, 2), (2, 4, 2), (4, 6, 2)]),
    (0, 2, [(0, 0, 0), (0, 0, 0)]),
])
def test_even_share_covers_every_item_once_in_order(monkeypatch, n, world, shares):
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    got = []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        got.append(distributed.even_share(n))
    assert got == shares
    assert [i for start, stop, _ in got for i in range(start, stop)] == list(range(n))


def test_torchrun_device_setting_is_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"device must be auto, cpu or cuda under torchrun .*got 'cuda:1'"):
        with distributed.process_group("cuda:1"):
            pass


@pytest.mark.slow
def test_two_ranks_give_the_global_values(tmp_path):
    out = tmp_path / "result.json"
    proc = run_torchrun([str(Path(__file__).with_name("collectives_worker.py")), str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    everything = torch.tensor([0.0, 1.0, 2.0, 5.0, -1.0])  # rank 0's three values, rank 1's two
    assert got["device"] == "cpu" and got["world_size"] == 2
    assert got["shards"] == [[7, 3], [9, 1]]  # contiguous halves of the global batch
    assert got["global_mean"] == pytest.approx(float(everything.mean()))
    assert got["global_std"] == pytest.approx(float(everything.std(unbiased=False)))
    # "*max": the largest rank's value, "*min": the smallest rank's (rank 1's here), not the mean
    assert got["mean_over_ranks"] == {"a": 0.5, "b": 4.0, "ratio_max": 2.0, "clip_ratio/low_min": 0.25}
    # rank r's micro-batches give 1 + r and 2 + r ("summed": 3 + 5 on both) and 1(r+1), 2(r+1)
    assert got["accumulated"] == [{"summed": 8.0, "mine": 3.0}, {"summed": 8.0, "mine": 6.0}]
    assert got["max_over_ranks"] == 15 and got["max_none"] is None
    assert got["broadcast"] == "from 0"
    assert "batch_size must be a multiple of the world size 2" in got["error"] and "got 3" in got["error"]


@pytest.mark.slow
def test_two_ranks_whiten_as_one_process_whitens_the_concatenated_batch(tmp_path, monkeypatch):
    """``whiten(reduce=all_reduce_sum)`` on each rank's rows (4 and 2, uneven) gives the rows of
    one process's ``whiten`` of the whole batch, values and gradients, on both backends."""
    from rftengine.ops import whiten

    from .collectives_worker import whiten_batch

    out = tmp_path / "result.json"
    proc = run_torchrun([str(Path(__file__).with_name("collectives_worker.py")), str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())["whiten"]
    for backend in ("torch", "triton"):
        monkeypatch.setenv("RFTENGINE_BACKEND", backend)
        for shift_mean in (True, False):
            x, mask, g = whiten_batch(shift_mean)
            x.requires_grad_()
            y = whiten(x, mask=mask, shift_mean=shift_mean)
            (dx,) = torch.autograd.grad((y * g).sum(), x)
            y2, dx2 = (torch.tensor(v) for v in got[f"{backend}/{shift_mean}"])
            torch.testing.assert_close(y2, y.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(dx2, dx, rtol=1e-5, atol=1e-6)
