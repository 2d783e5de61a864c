"""TRL's (and transformers' ``TrainingArguments``) values, turned into rftengine's.

The config fields declare TRL's spellings as aliases (``config_base.Alias``); where the value
means something else under TRL's name, one of these functions converts it, or raises a
ValueError that says why it has no equivalent and what to write instead. Each takes the alias's
value and ``options``: the config's other options as resolved so far (given ones over the
class defaults), and returns the value of rftengine's field.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any


def per_device_batch(value, options: Mapping[str, Any]) -> int:
    """TRL's ``per_device_train_batch_size`` -> ``batch_size``. TRL counts sequences
    (completions in GRPO/RLOO, pairs in DPO) per device and micro-step, and one optimizer step
    takes ``gradient_accumulation_steps`` of them on each device; rftengine's ``batch_size``
    counts prompts (or pairs) per optimizer step over all ranks, split into the accumulation
    steps, and samples ``group_size`` completions of each prompt. So
    ``batch_size = value * accumulation * world size / group`` (the world size is torchrun's
    ``WORLD_SIZE``; 1 in one process)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"per_device_train_batch_size must be an integer >= 1, got {value!r}")
    accumulation = options.get("gradient_accumulation_steps") or 1
    group = options.get("group_size") or 1
    devices = int(os.environ.get("WORLD_SIZE", "1"))
    completions = value * accumulation * devices
    if completions % group:
        on = f" x {devices} processes" if devices > 1 else ""
        raise ValueError(
            f"per_device_train_batch_size={value} x gradient_accumulation_steps={accumulation}{on} = {completions} "
            f"completions per step is not a multiple of group_size={group}: TRL counts completions, rftengine's "
            f"batch_size counts prompts (each sampled group_size times); set batch_size (prompts per step) instead"
        )
    return completions // group


def warmup_ratio(value, options: Mapping[str, Any]) -> int:
    """``warmup_ratio`` -> ``warmup_steps = ceil(ratio * max_steps)``, as transformers counts it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"warmup_ratio must be a number in [0, 1), got {value!r}")
    max_steps = options.get("max_steps")
    if max_steps is None:
        raise ValueError(
            f"warmup_ratio={value} is a fraction of the run's steps, but max_steps is not set (the number of "
            "steps then follows the data); set max_steps too, or warmup_steps"
        )
    return math.ceil(value * max_steps)


def scheduler_type(value, options: Mapping[str, Any]) -> str:
    """transformers' ``lr_scheduler_type`` -> ``lr_scheduler`` (whose "constant" warms up over
    ``warmup_steps`` first, as transformers' "constant_with_warmup" does)."""
    if value in ("linear", "cosine", "constant_with_warmup"):
        return value.removesuffix("_with_warmup")
    if value == "constant":
        if options.get("warmup_steps"):
            raise ValueError(
                "lr_scheduler_type='constant' has no warmup in transformers, but warmup_steps="
                f"{options['warmup_steps']} is set; use 'constant_with_warmup' (rftengine's lr_scheduler: "
                "constant warms up first) or drop the warmup"
            )
        return value
    raise ValueError(
        f"lr_scheduler_type={value!r} has no rftengine equivalent; lr_scheduler is constant, linear or cosine "
        "(TRL's constant_with_warmup, linear, cosine), after warmup_steps of linear warmup"
    )


def loss_type(value, options: Mapping[str, Any]) -> str:
    """TRL GRPO's ``loss_type`` -> ``aggregation``, where the normalisation is the same:
    "grpo" (each sequence's token mean, then the mean over sequences), "dr_grpo" (token sums
    over a constant, max_completion_length = our loss_constant's default max_new_tokens), "dapo"
    (token sum over the tokens of the whole accumulated step, across processes)."""
    mapped = {"grpo": "seq_mean_token_mean", "dr_grpo": "token_sum_norm", "dapo": "token_mean"}
    if value in mapped:
        return mapped[value]
    if value == "bnpo":
        raise ValueError(
            "loss_type='bnpo' divides by the tokens of each micro-batch on each device; rftengine divides by "
            "the tokens of the whole step (TRL's 'dapo'): use loss_type: dapo (aggregation: token_mean)"
        )
    raise ValueError(
        f"loss_type={value!r} has no rftengine equivalent; TRL's grpo, dr_grpo and dapo map to aggregation "
        "seq_mean_token_mean, token_sum_norm and token_mean"
    )


def scale_rewards(value, options: Mapping[str, Any]) -> str:
    """TRL's ``scale_rewards`` (true/"group", "batch", false/"none") -> ``group_scale``."""
    mapped = {True: "group", False: "none", "group": "group", "batch": "batch", "none": "none"}
    if isinstance(value, (bool, str)) and value in mapped:
        return mapped[value]
    raise ValueError(
        f"scale_rewards={value!r} has no rftengine equivalent; true/group, batch and false/none map to "
        "group_scale group, batch and none"
    )


def refuse(reason: str):
    """A conversion for a name whose value cannot be carried over: raises ``reason``."""

    def convert(value, options: Mapping[str, Any]):
        raise ValueError(reason)

    return convert
