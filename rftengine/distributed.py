"""The process group a run trains in: one process, or N ranks started by `torchrun`.

Everything that crosses ranks goes through these few functions, so the methods read the same
in one process (where each is the identity) and under `torch.distributed`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0: the one that logs, shows progress bars, plots and exports."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (a new tensor; ``tensor`` itself in one process).

    Token counts and statistics that cross rows (the global token count of an optimizer step,
    whitening moments, the KL controller's mean) go through here, so N ranks compute the numbers
    one process computes on the same global batch."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
