"""The one result type of every ``train_*`` entry point.

``train_sft``, ``train_reward_model``, ``train_dpo``, ``train_ppo``, ``train_rlaif`` and
``train_cai`` all return a ``TrainResult``: the trained model, the final ``TrainState`` (what a
checkpoint needs to resume) and the per-step metrics. The fields below ``history`` are set only by
the methods that produce them and stay ``None`` (or empty) elsewhere.

The per-method names of earlier releases (``PPOResult``, ``DPOResult``, ``RewardResult``,
``SFTResult``, ``RLAIFResult``, ``CAIResult``) are deprecated aliases of this class; see
``DEPRECATED_RESULT_NAMES`` and ``deprecated_result``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from rftengine.methods.train_state import TrainState

if TYPE_CHECKING:  # only for the annotation: ppo imports this module
    from rftengine.methods.ppo import PPOContext


@dataclass
class TrainResult:
    """What a ``train_*`` entry point returns.

    model: the trained module: the policy (``policy`` is the same object), or the
        ``RewardModel`` of ``train_reward_model``.
    state: the final ``TrainState`` (``state.method`` names the method; DPO's carries its
        reference cache, CAI's its examples).
    history: every step's metrics, in order (CAI: across its stages, each with ``cai/stage``).
    accuracy: reward model only: the pairwise accuracy on ``eval_pairs`` (or the training pairs).
    critic: the trained critic of algorithm "ppo" (RLAIF and PPO; None for GRPO/RLOO).
    context: PPO only: the ``PPOContext`` (reference, generator, critic, KL controller).
    examples: CAI only: the generated ``CAIExample`` records (response, principle, critique,
        revision).
    pairs: CAI only: the (revision ≻ original) preference pairs.
    stage_results: CAI only: each stage's ``TrainResult`` by stage name.
    """

    model: nn.Module
    state: TrainState
    history: list[dict[str, float]] = field(default_factory=list)
    accuracy: float | None = None
    critic: nn.Module | None = None
    context: PPOContext | None = None
    examples: list[Any] | None = None
    pairs: list[dict[str, Any]] | None = None
    stage_results: dict[str, TrainResult] = field(default_factory=dict)

    @property
    def policy(self) -> nn.Module:
        """The trained policy (the same object as ``model``)."""
        return self.model


# The per-method result classes this type replaced; still importable, with a DeprecationWarning.
DEPRECATED_RESULT_NAMES = ("CAIResult", "DPOResult", "PPOResult", "RLAIFResult", "RewardResult", "SFTResult")


def deprecated_result(name: str) -> type[TrainResult]:
    """``TrainResult``, with a DeprecationWarning naming the old ``name`` (a module
    ``__getattr__`` calls this for the names in ``DEPRECATED_RESULT_NAMES``)."""
    warnings.warn(f"{name} is deprecated; every train_* entry point returns rftengine.methods.TrainResult",
                  DeprecationWarning, stacklevel=3)
    return TrainResult
