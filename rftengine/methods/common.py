"""Pieces every method shares: config parsing/validation, the resumable TrainState (and its
stage view for multi-stage methods), the deterministic data order, optimizer/scheduler
construction, the optimizer step, the training loop, progress bars and the callback types.

Resumability contract (used by the CLI's checkpoints): a train_* function derives every random
choice from ``config.seed`` and the step or epoch number (data order, rollout seeds, minibatch
shuffles), and keeps everything else that changes during training in a ``TrainState``. Saving
the policy with ``save_pretrained`` plus ``TrainState.state_dict()`` and passing that dict back
as ``state=`` continues the run exactly: the same next batch and the same loss.

Models fixed before the run starts are the caller's to pass again: the reference of PPO, RLAIF
and on-the-fly DPO is the policy at the start of training, so a resumed run needs ``ref_model``
(``Reference(..., resumed=True)`` raises rather than copy the resumed policy; PEFT policies are
exempt, their reference is the base with adapters off). Models made during the run are kept in
the state: DPO's precomputed reference log-probs, and the stage-start reference weights of
Constitutional AI's DPO/RL stage (taken after its SFT stage; ``FixedTensors``, which a
checkpoint writes to disk once per stage).
"""

from __future__ import annotations

import math
import random
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

# One declarative base (config_base): the field groups, check_fields, from_dict and the stage
# merger; re-exported here, where the methods have always imported them from.
from rftengine.methods.config_base import (  # noqa: F401
    LR_SCHEDULERS,
    PRECISIONS,
    ConfigBase,
    LengthFields,
    LogprobFields,
    LoopFields,
    OptimFields,
    SamplingFields,
    check_fields,
    check_value,
    config_from_dict,
    config_to_dict,
    describe_config,
    option,
    redefault,
    stage,
    stage_config,
)

Callback = Callable[[int, dict[str, float]], None]
"""``callback(step, metrics)``: called once per optimizer step with plain float metrics."""

CheckpointFn = Callable[["TrainState"], None]
"""``checkpoint_fn(state)``: called every ``config.save_every`` steps and after the last step."""

# ----------------------------------------------------------------------------- configs


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_micro_batches(config, step_rows: int, what: str = "batch_size") -> None:
    """The accumulation convention: one optimizer step consumes ``step_rows`` examples (the
    field ``what``: ``batch_size``, or PPO's ``minibatch_size``), split into
    ``gradient_accumulation_steps`` micro-batches of ``micro_batch_size`` each. Give either
    one (the other follows), or both with ``micro_batch_size * gradient_accumulation_steps ==
    step_rows``; ValueError naming the fields otherwise."""
    owner = type(config).__name__
    micro, steps = config.micro_batch_size, config.gradient_accumulation_steps
    if micro is None:
        if step_rows % steps:
            raise ValueError(
                f"{owner}.{what} ({step_rows}) must be divisible by {owner}.gradient_accumulation_steps "
                f"({steps}): the step is split into that many equal micro-batches"
            )
        return
    if step_rows % micro or micro > step_rows:
        raise ValueError(
            f"{owner}.{what} ({step_rows}) must be a multiple of {owner}.micro_batch_size, got {micro}"
        )
    if steps != 1 and micro * steps != step_rows:
        raise ValueError(
            f"{owner}.micro_batch_size * gradient_accumulation_steps must equal {what} ({step_rows}), got "
            f"{micro} * {steps}; set one of the two (the other follows)"
        )


def micro_batch_rows(config, step_rows: int) -> int:
    """Examples per micro-batch for a step of ``step_rows`` examples (see
    ``validate_micro_batches``): ``micro_batch_size``, else ``step_rows /
    gradient_accumulation_steps`` (rounded up, for PPO's last, shorter minibatch)."""
    if config.micro_batch_size is not None:
        return min(config.micro_batch_size, max(step_rows, 1))
    return max(1, -(-step_rows // config.gradient_accumulation_steps))


# ----------------------------------------------------------------------------- state


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG a training step can draw from, as plain data that
    ``torch.load(weights_only=True)`` reads (no pickled numpy arrays or python objects).

    Returns ``{"python": [version, [625 ints], gauss_next], "numpy": {"key": int64 Tensor[624],
    "pos", "has_gauss", "gauss"}, "torch": uint8 Tensor, "cuda": [uint8 Tensor per device]}``
    (``"cuda"`` only where CUDA is available).
    """
    version, internal, gauss_next = random.getstate()
    _, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the RNGs to a ``capture_rng_state()`` snapshot (``"numpy"`` and ``"cuda"`` when present)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "numpy" in state:
        np_state = state["numpy"]
        key = np.asarray(np_state["key"], dtype=np.int64).astype(np.uint32)
        np.random.set_state(("MT19937", key, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class FixedTensors:
    """Tensors fixed for a whole stretch of a run (the weights of Constitutional AI's stage
    reference), kept in ``TrainState.extra``: a checkpoint writes them to disk once, as
    safetensors, and later checkpoints with the same ``key`` link that file instead of writing
    them again.

    Fields:
        key: names the content; tensors taken anew get a new key (``new_key()``), a resumed run
            keeps the key of the tensors it restored.
        tensors: name -> Tensor (any shapes, dtypes, devices), e.g. a module's ``state_dict()``.
    """

    key: str
    tensors: Mapping[str, torch.Tensor]

    @staticmethod
    def new_key() -> str:
        return uuid.uuid4().hex


@dataclass
class TrainState:
    """Everything a run changes besides the policy weights, for exact checkpoint/resume.

    Fields:
        method: which train_* function owns the state ("reward", "ppo", "grpo", "rloo", "dpo", ...);
            ``load_state_dict`` refuses a state from another method.
        step: optimizer steps done so far (the next step to run has this index).
        data_position: examples (prompts or pairs) consumed so far, across epochs.
        model: the trained model (policy or reward model). Not part of ``state_dict()``: save it
            with ``save_pretrained`` (the CLI writes a Hugging Face directory).
        optimizer, scheduler: built by the train_* function.
        modules: extra trainable modules that are not inside ``model`` (e.g. the PPO value head
            or a separate critic), saved in ``state_dict()``.
        extra: method scalars/tensors that evolve (adaptive KL coefficient, cached reference
            log-probs for DPO, ...), saved in ``state_dict()``.
        scaler: the ``torch.amp.GradScaler`` of "fp16-mixed" runs (None otherwise); its loss
            scale is saved in ``state_dict()`` so a resumed run scales as the original did.
    """

    method: str
    step: int = 0
    data_position: int = 0
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    scaler: Any = None

    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors, numbers, strings, lists, dicts), which ``torch.load(weights_only=True)``
        reads back, except the ``FixedTensors`` a method keeps in ``extra`` (the checkpoint stores
        those as safetensors); RNG states (``capture_rng_state``) are captured at call time."""
        return {
            "method": self.method,
            "step": self.step,
            "data_position": self.data_position,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "modules": {name: m.state_dict() for name, m in self.modules.items()},
            "extra": dict(self.extra),
            "rng": capture_rng_state(),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()`` output; the optimizer/modules must already be built."""
        method = state.get("method")
        if method != self.method:
            raise ValueError(
                f"checkpoint state is from method {method!r}, but this run is {self.method!r}"
            )
        self.step = int(state["step"])
        self.data_position = int(state["data_position"])
        if state.get("optimizer") is not None:
            if self.optimizer is None:
                raise ValueError("checkpoint state has optimizer state but this run has no optimizer")
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        missing = set(state.get("modules", {})) ^ set(self.modules)
        if missing:
            raise ValueError(
                f"checkpoint state modules {sorted(state.get('modules', {}))} do not match this "
                f"run's modules {sorted(self.modules)}"
            )
        for name, sd in state.get("modules", {}).items():
            self.modules[name].load_state_dict(sd)
        self.extra = dict(state.get("extra", {}))
        if state.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            restore_rng_state(state["rng"])


def resume_state(state: TrainState, resume: TrainState | Mapping[str, Any] | None) -> TrainState:
    """The state a train_* function runs with: ``state`` freshly built, updated from ``resume``.

    ``resume`` may be a previous TrainState (continue in-process) or its ``state_dict()``.
    """
    if resume is None:
        return state
    state.load_state_dict(resume.state_dict() if isinstance(resume, TrainState) else resume)
    return state


def stage_state(method: str, sub: TrainState, *, offset: int = 0, **extra: Any) -> TrainState:
    """A view of a sub-trainer's ``TrainState`` under the outer method's name (RLAIF, CAI), for
    ``checkpoint_fn``: same optimizer, scheduler and modules; ``extra["stage"]`` records which
    sub-trainer (and ``extra["stage_offset"]`` the steps of earlier stages)."""
    return TrainState(
        method, step=offset + sub.step, data_position=sub.data_position, model=sub.model,
        optimizer=sub.optimizer, scheduler=sub.scheduler, modules=sub.modules,
        extra={**sub.extra, **extra, "stage": sub.method, "stage_offset": offset}, scaler=sub.scaler,
    )


def unwrap_stage_state(
    method: str, state: TrainState | Mapping[str, Any] | None
) -> tuple[dict[str, Any] | None, int]:
    """``(sub-trainer state_dict, stage offset)`` from a ``stage_state`` checkpoint of
    ``method``; ``(None, 0)`` for no state. The outer method's own ``extra`` entries stay in
    the returned ``["extra"]`` for the caller to pop."""
    if state is None:
        return None, 0
    sd = state.state_dict() if isinstance(state, TrainState) else dict(state)
    if sd.get("method") != method:
        raise ValueError(f"checkpoint state is from method {sd.get('method')!r}, but this run is {method!r}")
    extra = dict(sd.get("extra") or {})
    stage = extra.pop("stage", None)
    offset = int(extra.pop("stage_offset", 0))
    if stage is None:
        raise ValueError(f"checkpoint state of method {method!r} does not record its stage")
    return {**sd, "method": stage, "step": int(sd["step"]) - offset, "extra": extra}, offset


# ----------------------------------------------------------------------------- data order


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of ``n`` examples in ``epoch``: a pure function of (seed, epoch)."""
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def batch_indices(n: int, batch_size: int, position: int, seed: int, shuffle: bool = True) -> list[int]:
    """Indices of the batch that starts at global ``position`` (examples consumed so far).

    Epoch ``e`` covers positions ``[e*n, (e+1)*n)``; a batch that crosses the boundary takes the
    rest from the next epoch's order, so every batch is full and resuming at any position gives
    the same batches as an uninterrupted run.
    """
    if n <= 0:
        raise ValueError("data must hold at least one example, got 0")
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(position, n)
        order = epoch_permutation(n, seed, epoch, shuffle)
        take = min(batch_size - len(out), n - offset)
        out.extend(order[offset:offset + take])
        position += take
    return out


def total_steps(config, n_examples: int, per_step: int) -> int:
    """``config.max_steps`` if set, else enough steps for ``config.num_epochs`` passes."""
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.num_epochs * n_examples / per_step))


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A per-step seed (rollout sampling, minibatch shuffles) independent of global RNG."""
    return (seed * 1_000_003 + step * 7_919 + salt) % (2**31 - 1)


# ----------------------------------------------------------------------------- optimisation


def make_optimizer(params, config) -> torch.optim.AdamW:
    """AdamW over trainable ``params`` with the config's learning rate, betas and weight decay."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters (every parameter has requires_grad=False)")
    require_trainable_dtype(params)
    return torch.optim.AdamW(
        params, lr=config.learning_rate, betas=tuple(config.adam_betas),
        weight_decay=config.weight_decay,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config, num_steps: int):
    """transformers' ``get_scheduler``: linear warmup over ``config.warmup_steps`` (factor
    ``step / warmup_steps``), then ``config.lr_scheduler`` ("constant", "linear" or "cosine"
    decay to 0 at ``num_steps``). A ``LambdaLR`` whose factors are module-level functions, so
    its state_dict is plain data (``torch.load(weights_only=True)``)."""
    from transformers.optimization import get_scheduler

    name = config.lr_scheduler
    if name == "constant" and config.warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=num_steps)


class NonFiniteStepError(ValueError):
    """``max_skipped_steps`` optimizer steps in a row had a non-finite loss or gradient norm.

    Raised before the step's checkpoint, so the last checkpoint written stays the last good one
    (a skipped step leaves the weights as they were)."""


# ----------------------------------------------------------------------------- precision

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


def clip_and_step(
    params, optimizer, scheduler, max_grad_norm: float | None, *, loss: torch.Tensor | None = None,
    state: TrainState | None = None, max_skipped_steps: int = 3, scaler=None,
) -> torch.Tensor:
    """Measure (and, when ``max_grad_norm`` is set, clip) the gradient norm, step the optimizer
    when the step is finite, step the scheduler, zero the gradients. Returns the pre-clip norm.

    A non-finite ``loss`` or gradient norm skips the optimizer step (AdamW's moments and step
    count are untouched) and counts it in ``state.extra["skipped_steps"]`` (cumulative) and
    ``state.extra["consecutive_skipped_steps"]``; the ``max_skipped_steps``-th skip in a row
    raises ``NonFiniteStepError``. Without a ``state`` the counts live for this call only. The
    scheduler steps even on a skipped step: the learning rate stays a function of the loop's
    step count (the skipped batch is consumed, like any other), so the schedule ends where it
    was planned and a resumed run sees the same rates. One host sync per call.

    With a ``scaler`` (fp16-mixed; the gradients hold ``scale * grad``) the gradients are
    unscaled before the norm and the scale is updated after. An overflow step is skipped and
    counted in ``skipped_steps`` like any other, but it counts toward ``max_skipped_steps``
    only when the loss scale was already <= 1 (or the loss itself is non-finite): halving a
    large scale after an overflow is how dynamic loss scaling finds its scale, and early
    overflows are expected.
    """
    params = list(params)
    scale = None
    if scaler is not None:
        scaler.unscale_(optimizer)
        scale = float(scaler.get_scale())
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    finite = torch.isfinite(grad_norm)
    finite_loss = None
    if loss is not None:
        finite_loss = torch.isfinite(loss.detach()).all().to(finite.device)
        finite = finite & finite_loss
    extra = state.extra if state is not None else {}
    if bool(finite):
        optimizer.step()
        if extra.get("consecutive_skipped_steps"):
            extra["consecutive_skipped_steps"] = 0
    else:
        extra["skipped_steps"] = int(extra.get("skipped_steps", 0)) + 1
        if scale is None or scale <= 1.0 or (finite_loss is not None and not bool(finite_loss)):
            extra["consecutive_skipped_steps"] = int(extra.get("consecutive_skipped_steps", 0)) + 1
    if scaler is not None:
        scaler.update()
    step_scheduler(scheduler)
    optimizer.zero_grad(set_to_none=True)
    if extra.get("consecutive_skipped_steps", 0) >= max_skipped_steps:
        where = f" at step {state.step + 1}" if state is not None else ""
        raise NonFiniteStepError(
            f"training stopped{where}: the loss or gradient norm was non-finite (NaN or inf) in "
            f"{extra['consecutive_skipped_steps']} optimizer steps in a row (max_skipped_steps="
            f"{max_skipped_steps}); those steps were skipped and nothing was saved after them. "
            "Lower learning_rate, set max_grad_norm, check the data, or load the model in float32"
        )
    return grad_norm


def step_scheduler(scheduler) -> None:
    """``scheduler.step()`` (None: nothing). When the run's first optimizer steps were skipped,
    torch warns that the scheduler stepped before the optimizer: that order is intended here
    (see ``clip_and_step``), so the warning is silenced."""
    if scheduler is None:
        return
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()


def skipped_steps(state: TrainState) -> float:
    """The ``train/skipped_steps`` metric: the run's cumulative count of skipped optimizer steps."""
    return float(state.extra.get("skipped_steps", 0))


def make_train_state(
    method: str,
    model: torch.nn.Module,
    config,
    schedule_steps: int,
    resume: TrainState | Mapping[str, Any] | None = None,
    *,
    params=None,
    modules: dict[str, torch.nn.Module] | None = None,
    extra: dict[str, Any] | None = None,
) -> TrainState:
    """The TrainState a ``train_*`` function runs with: AdamW over the trainable ``params``
    (default ``model.parameters()``) and the LR schedule over ``schedule_steps`` optimizer
    steps, both from ``config``, then updated from ``resume`` (``resume_state``).

    Before the optimizer is built, the trainable parameters are put in the dtype of
    ``config.precision`` (``cast_trainable``: bf16/fp16 weights are upcast to fp32 master
    weights under the mixed precisions, in place), a GradScaler is made for "fp16-mixed", and
    ``config.gradient_checkpointing`` switches activation checkpointing on for ``model`` and
    ``modules``."""
    from rftengine.methods.modeling import enable_gradient_checkpointing

    params = list(model.parameters() if params is None else params)
    device = next(model.parameters()).device
    precision = resolve_precision(getattr(config, "precision", None), device)
    cast_trainable(params, precision)
    if getattr(config, "gradient_checkpointing", False):
        for module in (model, *(modules or {}).values()):
            enable_gradient_checkpointing(module)
    optimizer = make_optimizer(params, config)
    scheduler = make_scheduler(optimizer, config, schedule_steps)
    state = TrainState(method, model=model, optimizer=optimizer, scheduler=scheduler,
                       modules=dict(modules or {}), extra=dict(extra or {}),
                       scaler=make_grad_scaler(precision, device))
    state = resume_state(state, resume)
    if resume is not None:
        apply_optimizer_settings(optimizer, scheduler, config)
    return state


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, scheduler, config) -> None:
    """Put ``config``'s learning rate, betas and weight decay into a resumed optimizer (and the
    base rates of its LambdaLR ``scheduler``): ``load_state_dict`` restores the saved ones, which
    would silently override a learning rate changed on resume. The rate in use is set to the new
    base rate times the schedule's factor at the restored step, the value the scheduler itself
    computes, so an unchanged config leaves every value bit for bit as restored."""
    for i, group in enumerate(optimizer.param_groups):
        group["betas"] = tuple(config.adam_betas)
        group["weight_decay"] = config.weight_decay
        if scheduler is None:
            group["lr"] = config.learning_rate
            continue
        scheduler.base_lrs[i] = group["initial_lr"] = config.learning_rate
        group["lr"] = config.learning_rate * scheduler.lr_lambdas[i](scheduler.last_epoch)
    if scheduler is not None:
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def to_floats(stats: Mapping[str, Any]) -> dict[str, float]:
    """Detached tensors/numbers -> plain floats (one host sync per metric, once per step)."""
    out = {}
    for k, v in stats.items():
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                v = v.float().mean()
            out[k] = float(v.detach())
        elif _is_number(v):
            out[k] = float(v)
    return out


def should_checkpoint(config, step_done: int, last_step: int) -> bool:
    """After finishing step number ``step_done`` (1-based count of steps done)."""
    if step_done == last_step:
        return True
    return config.save_every > 0 and step_done % config.save_every == 0


def optimizer_step(loss: torch.Tensor, stats: Mapping[str, Any], optimizer, scheduler,
                   max_grad_norm: float | None, *, state: TrainState | None = None,
                   max_skipped_steps: int = 3) -> dict[str, float]:
    """Backpropagate ``loss``, clip, step optimizer and scheduler (``clip_and_step``: a
    non-finite step is skipped and counted in ``state``).

    Returns ``stats`` as plain floats plus ``grad_norm`` (before clipping), ``learning_rate``
    (read after the scheduler step) and ``train/skipped_steps`` (cumulative).
    """
    state = state if state is not None else TrainState("step")     # counts for this call only
    backward(loss, state.scaler)
    return finish_step(dict(stats), optimizer, scheduler, max_grad_norm, loss=loss, state=state,
                       max_skipped_steps=max_skipped_steps)


def backward(loss: torch.Tensor, scaler=None) -> None:
    """``loss.backward()``, through ``scaler.scale`` for fp16-mixed."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def finish_step(stats: dict[str, Any], optimizer, scheduler, max_grad_norm: float | None, *,
                loss: torch.Tensor, state: TrainState, max_skipped_steps: int) -> dict[str, float]:
    """``clip_and_step`` on the accumulated gradients, then ``stats`` as floats plus
    ``grad_norm``, ``learning_rate``, ``train/skipped_steps`` and, for fp16-mixed,
    ``train/loss_scale`` (the scale the next step uses)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    stats["grad_norm"] = clip_and_step(params, optimizer, scheduler, max_grad_norm, loss=loss, state=state,
                                       max_skipped_steps=max_skipped_steps, scaler=state.scaler)
    stats["learning_rate"] = optimizer.param_groups[0]["lr"]
    stats["train/skipped_steps"] = skipped_steps(state)
    if state.scaler is not None:
        stats["train/loss_scale"] = float(state.scaler.get_scale())
    return to_floats(stats)


MicroLoss = Callable[[Any], "tuple[torch.Tensor, Mapping[str, Any]]"]
"""``micro_loss(micro_batch) -> (loss, stats)``: the micro-batch's share of the step's loss (see
``accumulate_gradients``)."""


def global_count(count: torch.Tensor | float) -> torch.Tensor:
    """A count summed over the micro-batches' ranks (``all_reduce_sum``), as fp32, >= 1: the
    normaliser of an optimizer step's token-mean, sequence-mean or pair-mean."""
    from rftengine.distributed import all_reduce_sum

    count = torch.as_tensor(count, dtype=torch.float32)
    return all_reduce_sum(count).clamp(min=1.0)


def accumulate_gradients(
    micro_batches, micro_loss: MicroLoss, *, precision: str, device: torch.device, scaler=None,
    max_keys: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Forward (under ``autocast(precision, device)``) and backward of every micro-batch of one
    optimizer step, gradients accumulating in ``.grad``; returns the step's stats.

    ``micro_loss(mb)`` returns the micro-batch's share of the step: its loss already divided by
    the step's global normaliser (``global_count`` of the tokens, sequences or pairs of every
    micro-batch on every rank: the op's own normalisation is multiplied by ``local / global``),
    and stats weighted the same way, so that the sum over micro-batches (and ranks) is exactly
    the value one batch gives. Stats named in ``max_keys`` combine by max (rank-local).
    Returns detached fp32 0-d tensors, sums all-reduced across ranks.
    """
    from rftengine.distributed import all_reduce_sum, is_distributed

    sums: dict[str, torch.Tensor] = {}
    for mb in micro_batches:
        with autocast(precision, device):
            loss, stats = micro_loss(mb)
        backward(loss, scaler)
        for key, value in stats.items():
            value = torch.as_tensor(value).detach().float().to(device)
            if key not in sums:
                sums[key] = value
            else:
                sums[key] = torch.maximum(sums[key], value) if key in max_keys else sums[key] + value
    if is_distributed():
        keys = [k for k in sums if k not in max_keys]
        if keys:
            total = all_reduce_sum(torch.stack([sums[k] for k in keys]))
            sums.update(zip(keys, total.unbind(0)))
    return sums


def accumulated_step(
    micro_batches, micro_loss: MicroLoss, optimizer, scheduler, config, *, device: torch.device,
    state: TrainState | None = None, max_keys: Sequence[str] = (),
) -> dict[str, float]:
    """One optimizer step over ``micro_batches`` (``accumulate_gradients``, then
    ``finish_step``) in ``config.precision``; ``micro_loss`` must report ``loss`` in its stats.
    A non-finite step is skipped and counted in ``state``."""
    state = state if state is not None else TrainState("step")     # counts for this call only
    precision = resolve_precision(config.precision, device)
    if state.scaler is None:
        state.scaler = make_grad_scaler(precision, device)
    stats = accumulate_gradients(micro_batches, micro_loss, precision=precision, device=device,
                                 scaler=state.scaler, max_keys=max_keys)
    return finish_step(stats, optimizer, scheduler, config.max_grad_norm, loss=stats["loss"], state=state,
                       max_skipped_steps=config.max_skipped_steps)


def split_rows(n: int, size: int) -> list[torch.Tensor]:
    """Row indices ``[0, n)`` in consecutive micro-batches of ``size`` (the last may be shorter)."""
    return [torch.arange(start, min(start + size, n)) for start in range(0, n, size)]


# ----------------------------------------------------------------------------- the loop


def interactive_terminal() -> bool:
    """True when stdout and stderr are both terminals, or in a Jupyter kernel (where
    ``tqdm.auto`` draws widgets): only then are progress bars drawn. Written to a file or a
    pipe, tqdm's redraws (carriage returns, and the cursor-up escape ``ESC[A`` of nested bars)
    would fill the log; ``train_loop`` prints plain metric lines there instead
    (``logging_steps``)."""
    if all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr)):
        return True
    return type(sys.stdout).__module__.startswith("ipykernel")


def progress_bar(enabled: bool, *, total: int, desc: str, initial: int = 0, unit: str = "step"):
    """The tqdm bar of a training loop, or None when ``enabled`` is False or the output is not
    a terminal (``interactive_terminal``; tqdm is only imported when a bar is drawn)."""
    if not (enabled and interactive_terminal()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)


def track(iterable, enabled: bool, *, desc: str, unit: str = "batch", total: int | None = None):
    """``iterable`` as is, or wrapped in a tqdm bar that is removed when done (``leave=False``):
    the bar of an inner loop (reference pass, generation stage, judging). Not drawn when the
    output is not a terminal (``interactive_terminal``)."""
    if not (enabled and interactive_terminal()):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=False, dynamic_ncols=True)


def metrics_line(desc: str, step: int, num_steps: int, metrics: Mapping[str, float],
                 keys: Mapping[str, str] | None = None) -> str:
    """The console line of a step when no bar is drawn: ``dpo step 10/100: loss 0.6931, acc 0.75,
    lr 1e-06, eval/loss 0.69``; ``keys`` maps labels to metric names (the bar's postfix);
    ``loss`` is shown when no label names it, and the held-out values of the metrics shown and
    of ``loss``, ``reward``, ``accuracy`` (``eval/<name>``) when the step has them."""
    shown = dict(keys or {})
    if "loss" not in shown.values():
        shown = {"loss": "loss", **shown}
    shown["lr"] = "learning_rate"
    main = {*shown.values(), "loss", "reward", "accuracy"}
    shown.update({k: k for k in metrics if k.startswith("eval/") and k.removeprefix("eval/") in main})
    parts = [f"{label} {metrics[key]:.4g}" for label, key in shown.items() if key in metrics]
    return f"{desc} step {step}/{num_steps}" + (": " + ", ".join(parts) if parts else "")


@dataclass
class StopRequest:
    """Set from a signal handler (the CLI's, around training) to stop every ``train_loop`` at the
    end of the step in progress; ``signum`` is the signal's number, None when no stop is asked."""

    signum: int | None = None


STOP = StopRequest()
"""The one stop request of the process: signal handlers may only set a flag, and the loops of
multi-stage methods (RLAIF, CAI) are nested in calls the CLI does not see into."""


class TrainingInterrupted(Exception):
    """Raised by ``train_loop`` when ``STOP`` is set: after the step in progress finished and,
    when there is a ``checkpoint_fn`` and steps ran since the last checkpoint, a checkpoint of
    that step was written (``checkpointed``). ``step``: steps done, ``signum``: the signal."""

    def __init__(self, step: int, signum: int, checkpointed: bool):
        super().__init__(f"training stopped by signal {signum} after step {step}")
        self.step, self.signum, self.checkpointed = step, signum, checkpointed


def train_loop(
    state: TrainState,
    config,
    num_steps: int,
    num_examples: int,
    run_step: Callable[[list[int]], dict[str, float]],
    *,
    callback: Callback | None = None,
    checkpoint_fn: CheckpointFn | None = None,
    progress: bool = False,
    desc: str = "train",
    postfix: Mapping[str, str] | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
) -> list[dict[str, float]]:
    """The loop of every ``train_*`` function; returns the metrics of the steps it ran.

    Until ``state.step == num_steps``: ``indices = batch_indices(num_examples, config.batch_size,
    state.data_position, config.seed, config.shuffle)``, ``metrics = run_step(indices)``, advance
    ``state.step`` by one (``run_step`` may already have, as ``ppo.step`` does) and
    ``state.data_position`` by the batch, then call ``callback(state.step, metrics)`` and, when
    ``should_checkpoint(config, ...)``, ``checkpoint_fn(state)``. ``postfix`` maps progress-bar
    labels to the metric names they show.

    ``evaluate`` (``rftengine.methods.evaluation``) runs after the steps that
    ``should_evaluate(config, ...)`` picks (multiples of ``config.eval_every``, and the last);
    its ``eval/*`` metrics join that step's row, before the callback and the checkpoint. It
    runs on every rank (its values are global) and restores the RNGs it used, so the training
    is the same with or without it.

    The bar is drawn on rank 0 when ``progress`` and the output is a terminal
    (``interactive_terminal``); otherwise rank 0 prints one line of the step's main metrics
    (``metrics_line``: the ``postfix`` ones, ``learning_rate``, their ``eval/*``) every ``config.logging_steps``
    steps and after the last.

    Under torchrun (``rftengine.distributed``), ``config.batch_size`` is the global batch:
    rank ``r`` of ``N`` runs ``run_step`` on its contiguous ``batch_size / N`` share of
    ``indices`` (so GRPO/RLOO groups, sampled per prompt, stay whole on one rank), and the
    metrics are averaged over the ranks; the data order stays a function of (seed, position).
    ``batch_size`` not divisible by the world size is a ValueError naming both.

    When ``STOP`` is set (checked before the first step and after each), the loop writes a
    checkpoint of the last step done unless it just did (or ran no step), and raises
    ``TrainingInterrupted``; it propagates out of every stage of a multi-stage method.
    """
    from rftengine import distributed
    from rftengine.methods.evaluation import run_evaluation, should_evaluate

    distributed.require_divisible(config.batch_size)
    history: list[dict[str, float]] = []
    bar = progress_bar(progress and distributed.is_main_process(), total=num_steps, initial=state.step, desc=desc)
    log_lines = bar is None and distributed.is_main_process()
    saved = True  # nothing new to save before the first step: it is the resumed/previous stage's checkpoint
    try:
        while True:
            # Every rank stops at the same step (a signal may reach the ranks between two steps).
            STOP.signum = distributed.max_over_ranks(STOP.signum)
            if STOP.signum is not None:
                if checkpoint_fn is not None and not saved:
                    checkpoint_fn(state)
                    saved = True
                raise TrainingInterrupted(state.step, STOP.signum, checkpointed=checkpoint_fn is not None and bool(history))
            if state.step >= num_steps:
                break
            index = state.step
            idx = batch_indices(num_examples, config.batch_size, state.data_position, config.seed, config.shuffle)
            # Under torchrun each rank runs its contiguous share of the global batch; the
            # metrics are then means over the global batch, the same on every rank.
            metrics = distributed.mean_over_ranks(run_step(distributed.shard_batch(idx)))
            state.step = index + 1
            state.data_position += len(idx)
            if evaluate is not None and should_evaluate(config, state.step, num_steps):
                metrics = {**metrics, **run_evaluation(evaluate)}
            history.append(metrics)
            if callback is not None:
                callback(state.step, metrics)
            if bar is not None:
                bar.update(1)
                if postfix:
                    bar.set_postfix({label: f"{metrics[key]:.4g}" for label, key in postfix.items() if key in metrics})
            elif log_lines and (state.step % getattr(config, "logging_steps", 10) == 0 or state.step == num_steps):
                print(metrics_line(desc, state.step, num_steps, metrics, postfix), flush=True)
            saved = False
            if checkpoint_fn is not None and should_checkpoint(config, state.step, num_steps):
                checkpoint_fn(state)
                saved = True
    finally:
        if bar is not None:
            bar.close()
    return history
