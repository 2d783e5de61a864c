"""The training loop every ``train_*`` function runs (``train_loop``), its callback types,
progress bars and log lines, metrics as floats, checkpoint cadence and the stop request a
signal handler sets."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rftengine.methods.config_base import _is_number
from rftengine.methods.data_order import batch_indices
from rftengine.methods.metric_names import Metrics
from rftengine.methods.train_state import TrainState


Callback = Callable[[int, dict[str, float]], None]
"""``callback(step, metrics)``: called once per optimizer step with plain float metrics."""

CheckpointFn = Callable[["TrainState"], None]
"""``checkpoint_fn(state)``: called every ``config.save_every`` steps and after the last step."""


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
            metrics = Metrics(metrics)  # the earlier names of renamed metrics still read, with a warning
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
