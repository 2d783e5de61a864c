"""The resumable state of a run: ``TrainState`` (and its stage view for multi-stage methods),
the RNG snapshot it carries, and ``FixedTensors``.

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

import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


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
