"""Training precision: "fp32", "bf16-mixed", "bf16" or "fp16-mixed" (``config_base.PRECISIONS``):
the compute and master-weight dtypes, autocast, the fp16 guard and the loss scaler."""

from __future__ import annotations

from typing import Literal

import torch

from rftengine.methods.config_base import PRECISIONS, check_value


FP16_TRAINING_MESSAGE = (
    "fp16 weights cannot be trained directly (AdamW on fp16 weights underflows and turns the "
    "model to NaN/inf): set precision: fp16-mixed (fp32 master weights, fp16 compute, dynamic "
    "loss scaling), or load the model in float32 or bfloat16"
)


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """``precision`` as given, or the default for ``device``: "bf16-mixed" on CUDA, "fp32"
    elsewhere (CPUs gain nothing from bf16 compute)."""
    if precision is not None:
        check_value("precision", Literal[PRECISIONS], precision)
        return precision
    return "bf16-mixed" if torch.device(device).type == "cuda" else "fp32"


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the forward and backward matmuls run in (FSDP2's ``param_dtype``)."""
    return {"fp32": torch.float32, "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16,
            "fp16-mixed": torch.float16}[precision]


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of the trainable (master) weights and the optimizer states: fp32 except for
    "bf16". Gradients are reduced in this dtype (FSDP2's ``reduce_dtype``)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def is_mixed(precision: str) -> bool:
    return precision.endswith("-mixed")


def autocast(precision: str, device: torch.device | str):
    """The context a training forward runs in: ``torch.autocast`` to the compute dtype for the
    mixed precisions, a no-op otherwise. Backward runs outside it (autograd keeps the dtypes)."""
    from contextlib import nullcontext

    if not is_mixed(precision):
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=compute_dtype(precision))


def require_trainable_dtype(params, precision: str = "fp32") -> None:
    """ValueError (``FP16_TRAINING_MESSAGE``) when a trainable parameter is fp16 and
    ``precision`` would train it as fp16 ("fp32", "bf16"); the mixed precisions upcast it."""
    if is_mixed(precision):
        return
    for p in params:
        if p.requires_grad and p.dtype == torch.float16:
            raise ValueError(FP16_TRAINING_MESSAGE)


def cast_trainable(params, precision: str) -> None:
    """Put every trainable floating parameter in ``param_dtype(precision)``, in place (the
    Parameter objects stay, so tied weights stay tied): bf16/fp16 weights become fp32 master
    weights under "fp32" and the mixed precisions, fp32 weights become bf16 under "bf16".
    Frozen parameters (PEFT bases, references) keep their dtype. fp16 weights under "fp32" or
    "bf16" are refused first (``require_trainable_dtype``)."""
    params = [p for p in params if p.requires_grad]
    require_trainable_dtype(params, precision)
    dtype = param_dtype(precision)
    for p in params:
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def frozen_dtype(config, device: torch.device | str) -> torch.dtype | None:
    """The dtype of the frozen copies a run makes (the reference copy of the policy): the
    compute dtype under the mixed precisions (no fp32 master weights needed), else None (the
    policy's own dtype)."""
    precision = resolve_precision(getattr(config, "precision", None), device)
    return compute_dtype(precision) if is_mixed(precision) else None


def make_grad_scaler(precision: str, device: torch.device | str):
    """A ``torch.amp.GradScaler`` for "fp16-mixed" (dynamic loss scaling), None otherwise."""
    if precision != "fp16-mixed":
        return None
    return torch.amp.GradScaler(torch.device(device).type)
