"""Run under torchrun (2 ranks) by test_distributed.py: the cross-rank helpers of
``rftengine.distributed`` on rank-dependent data; rank 0 writes what it computed to argv[1]."""

import json
import sys

import torch

from rftengine import distributed


def whiten_batch(shift_mean: bool):
    """The global batch of the whitening check: (x [6, 9], mask [6, 9], upstream grad g [6, 9]);
    rank 0 holds rows 0-3, rank 1 rows 4-5 (uneven shares, and rank 1's last row all padding)."""
    gen = torch.Generator().manual_seed(3 + int(shift_mean))
    x = 3 * torch.randn(6, 9, generator=gen) + 1
    mask = torch.rand(6, 9, generator=gen) > 0.3
    mask[5] = False
    return x, mask, torch.randn(6, 9, generator=gen)


def _whiten_rows(r: int) -> dict:
    """This rank's rows of ``whiten(..., reduce=all_reduce_sum)`` and their gradient, per backend
    and shift_mean."""
    import os

    from rftengine.ops import whiten

    rows = slice(0, 4) if r == 0 else slice(4, 6)
    out = {}
    for backend in ("torch", "triton"):
        os.environ["RFTENGINE_BACKEND"] = backend
        for shift_mean in (True, False):
            x, mask, g = whiten_batch(shift_mean)
            xs = x[rows].clone().requires_grad_()
            y = whiten(xs, mask=mask[rows], shift_mean=shift_mean, reduce=distributed.all_reduce_sum)
            (dx,) = torch.autograd.grad((y * g[rows]).sum(), xs)
            parts = [None, None]
            torch.distributed.all_gather_object(parts, (y.tolist(), dx.tolist()))
            out[f"{backend}/{shift_mean}"] = [parts[0][0] + parts[1][0], parts[0][1] + parts[1][1]]
    os.environ.pop("RFTENGINE_BACKEND")
    return out


def _accumulated(r: int) -> list:
    """Every rank's stats of ``accumulate_gradients`` over two micro-batches: "summed" over the
    micro-batches and the ranks, "mine" (a ``rank_keys`` stat) over this rank's micro-batches only."""
    from rftengine.methods.optimization import accumulate_gradients

    w = torch.zeros((), requires_grad=True)
    stats = accumulate_gradients(
        [1.0, 2.0], lambda x: (w * x, {"summed": torch.tensor(x + r), "mine": torch.tensor(x * (r + 1))}),
        precision="fp32", device=torch.device("cpu"), rank_keys=("mine",),
    )
    ranks = [None, None]
    torch.distributed.all_gather_object(ranks, {k: float(v) for k, v in stats.items()})
    return ranks


def main(out: str) -> None:
    with distributed.process_group("cpu") as device:
        r = distributed.rank()
        values = torch.arange(3.0) + 10 * r if r == 0 else torch.tensor([5.0, -1.0])  # 3 and 2 elements
        result = {
            "device": str(device),
            "world_size": distributed.world_size(),
            "shard": distributed.shard_batch([7, 3, 9, 1]),
            "global_mean": float(distributed.global_mean(values)),
            "global_std": float(distributed.global_std(values)),
            "mean_over_ranks": distributed.mean_over_ranks({"a": float(r), "b": 4.0, "ratio_max": 1.0 + r,
                                                            "clip_ratio/low_min": 0.75 - 0.5 * r}),
            "max_over_ranks": distributed.max_over_ranks(15 if r == 1 else None),
            "max_none": distributed.max_over_ranks(None),
            "broadcast": distributed.broadcast_object(f"from {r}"),
        }
        try:
            distributed.shard_batch([1, 2, 3])
        except ValueError as exc:
            result["error"] = str(exc)
        result["whiten"] = _whiten_rows(r)
        result["accumulated"] = _accumulated(r)
        shards = [None, None]
        torch.distributed.all_gather_object(shards, result["shard"])
        result["shards"] = shards
        if distributed.is_main_process():
            with open(out, "w") as f:
                json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
