"""Run under torchrun (2 ranks) by test_distributed.py: the cross-rank helpers of
``rftengine.distributed`` on rank-dependent data; rank 0 writes what it computed to argv[1]."""

import json
import sys

import torch

from rftengine import distributed


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
            "mean_over_ranks": distributed.mean_over_ranks({"a": float(r), "b": 4.0, "ratio_max": 1.0 + r}),
            "max_over_ranks": distributed.max_over_ranks(15 if r == 1 else None),
            "max_none": distributed.max_over_ranks(None),
            "broadcast": distributed.broadcast_object(f"from {r}"),
        }
        try:
            distributed.shard_batch([1, 2, 3])
        except ValueError as exc:
            result["error"] = str(exc)
        shards = [None, None]
        torch.distributed.all_gather_object(shards, result["shard"])
        result["shards"] = shards
        if distributed.is_main_process():
            with open(out, "w") as f:
                json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
