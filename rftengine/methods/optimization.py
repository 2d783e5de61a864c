"""Optimisation: the micro-batch/accumulation convention, AdamW and the LR schedule, the
TrainState a ``train_*`` function runs with, gradient accumulation and the optimizer step
(clipping, non-finite steps skipped and counted, fp16 loss scaling)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from rftengine.methods.loop import to_floats
from rftengine.methods.precision import (
    autocast,
    cast_trainable,
    make_grad_scaler,
    require_trainable_dtype,
    resolve_precision,
)
from rftengine.methods.train_state import TrainState, resume_state


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


class NonFiniteStepError(ValueError):
    """``max_skipped_steps`` optimizer steps in a row had a non-finite loss or gradient norm.

    Raised before the step's checkpoint, so the last checkpoint written stays the last good one
    (a skipped step leaves the weights as they were)."""


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
    max_keys: Sequence[str] = (), rank_keys: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Forward (under ``autocast(precision, device)``) and backward of every micro-batch of one
    optimizer step, gradients accumulating in ``.grad``; returns the step's stats.

    ``micro_loss(mb)`` returns the micro-batch's share of the step: its loss already divided by
    the step's global normaliser (``global_count`` of the tokens, sequences or pairs of every
    micro-batch on every rank: the op's own normalisation is multiplied by ``local / global``),
    and stats weighted the same way, so that the sum over micro-batches (and ranks) is exactly
    the value one batch gives. Stats named in ``max_keys`` combine by max (rank-local); those in
    ``rank_keys`` are summed over the micro-batches only (this rank's own value).
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
        keys = [k for k in sums if k not in max_keys and k not in rank_keys]
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
