"""The start-up banner of ``rftengine train``: what trains, where, in which precision and for
how long, printed once the policy is built (rank 0 only: the CLI silences the other ranks)."""

from __future__ import annotations

from torch import nn

# Stage configs of the methods that train in stages (RLAIF, CAI), in the order they run.
_STAGES = ("sft_config", "dpo_config", "ppo_config", "rl_config")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of ``model``; tied weights count once, and FSDP2-sharded
    parameters (DTensors) count at their full size."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def training_config(method_config):
    """The config whose precision and steps the run trains with: ``method_config`` itself, or
    for a staged method without them (CAI) its first stage config in use."""
    if hasattr(method_config, "precision") and hasattr(method_config, "max_steps"):
        return method_config
    for name in _STAGES:
        try:
            stage = getattr(method_config, name, None)
        except ValueError:  # a stage this configuration does not train
            continue
        if stage is not None:
            return stage
    return method_config


def start_banner(*, method: str, device, precision: str, trainable: int, total: int,
                 max_steps: int | None, num_epochs: int | None, world_size: int) -> str:
    """The banner's lines, e.g.::

        rftengine train: grpo on cuda:0, precision bf16-mixed, world size 2
          parameters: 494,032,768 total, 494,032,768 trainable (100%)
          steps: 200 (max_steps)
    """
    share = f" ({100 * trainable / total:.3g}%)" if total else ""
    if max_steps is not None:
        steps = f"{max_steps} (max_steps)"
    elif num_epochs is not None:
        steps = f"{num_epochs} epoch{'s' if num_epochs != 1 else ''} over the data (max_steps null)"
    else:
        steps = "set per stage (train.<stage>.max_steps)"
    return (f"rftengine train: {method} on {device}, precision {precision}, world size {world_size}\n"
            f"  parameters: {total:,} total, {trainable:,} trainable{share}\n"
            f"  steps: {steps}")
