"""Pieces every method shares: config parsing/validation, the resumable TrainState, the
deterministic data order, optimizer/scheduler construction and the metrics callback type.

Resumability contract (used by the CLI's checkpoints): a train_* function derives every random
choice from ``config.seed`` and the step or epoch number (data order, rollout seeds, minibatch
shuffles), and keeps everything else that changes during training in a ``TrainState``. Saving
the policy with ``save_pretrained`` plus ``TrainState.state_dict()`` and passing that dict back
as ``state=`` continues the run exactly: the same next batch and the same loss.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Callback = Callable[[int, dict[str, float]], None]
"""``callback(step, metrics)``: called once per optimizer step with plain float metrics."""

CheckpointFn = Callable[["TrainState"], None]
"""``checkpoint_fn(state)``: called every ``config.save_every`` steps and after the last step."""

RewardFn = Callable[..., Any]
"""``reward_fn(prompts: list[str], responses: list[str], **kw) -> Tensor[B] | list[float]``."""


# ----------------------------------------------------------------------------- configs


def config_from_dict(cls: type, data: Mapping[str, Any]):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with the closest valid key.

    Values go through ``cls.__init__``, so ``__post_init__`` validation applies.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__} expects a mapping of options, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
        raise ValueError(f"unknown {cls.__name__} key {key!r}{hint}")
    return cls(**dict(data))


def config_to_dict(config) -> dict[str, Any]:
    """A plain-dict copy of a config dataclass (tuples become lists, for YAML/JSON)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_int(owner: str, name: str, value, *, minimum: int | None = None, allow_none=False):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")


def require_float(
    owner: str, name: str, value, *, minimum: float | None = None, maximum: float | None = None,
    strict_min: bool = False, allow_none: bool = False,
):
    if value is None and allow_none:
        return
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict_min else value < minimum):
        op = ">" if strict_min else ">="
        raise ValueError(f"{owner}.{name} must be {op} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{owner}.{name} must be <= {maximum}, got {value}")


def require_choice(owner: str, name: str, value, choices, *, allow_none: bool = False):
    if value is None and allow_none:
        return
    if value not in choices:
        raise ValueError(
            f"{owner}.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
        )


def validate_optim_fields(config) -> None:
    """Checks for the optimizer/schedule/loop fields every method config carries."""
    owner = type(config).__name__
    require_float(owner, "learning_rate", config.learning_rate, minimum=0.0, strict_min=True)
    require_float(owner, "weight_decay", config.weight_decay, minimum=0.0)
    if len(config.adam_betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in config.adam_betas):
        raise ValueError(f"{owner}.adam_betas must be two numbers in [0, 1), got {config.adam_betas!r}")
    require_float(owner, "max_grad_norm", config.max_grad_norm, minimum=0.0, strict_min=True, allow_none=True)
    require_int(owner, "warmup_steps", config.warmup_steps, minimum=0)
    require_choice(owner, "lr_scheduler", config.lr_scheduler, ("constant", "linear", "cosine"))
    require_int(owner, "max_steps", config.max_steps, minimum=1, allow_none=True)
    require_int(owner, "num_epochs", config.num_epochs, minimum=1)
    require_int(owner, "save_every", config.save_every, minimum=0)
    require_int(owner, "seed", config.seed, minimum=0)


# ----------------------------------------------------------------------------- state


def capture_rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """

    method: str
    step: int = 0
    data_position: int = 0
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """A picklable dict (torch.save-able); RNG states are captured at call time."""
        return {
            "method": self.method,
            "step": self.step,
            "data_position": self.data_position,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "modules": {name: m.state_dict() for name, m in self.modules.items()},
            "extra": dict(self.extra),
            "rng": capture_rng_state(),
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
    return torch.optim.AdamW(
        params, lr=config.learning_rate, betas=tuple(config.adam_betas),
        weight_decay=config.weight_decay,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config, num_steps: int):
    """Linear warmup over ``config.warmup_steps``, then constant, linear or cosine decay to 0."""
    warmup = config.warmup_steps
    kind = config.lr_scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, num_steps - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_and_step(params, optimizer, scheduler, max_grad_norm: float | None) -> torch.Tensor | None:
    """Clip the gradient norm (when set), step optimizer and scheduler, zero the gradients."""
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


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
