"""The pure advantage math of PPO, GRPO and RLOO: no model forwards, tensors in and out.

The KL-shaped per-token rewards of PPO (``r_t = -β·KL_t``, plus the score at the last response
token; Ziegler et al. 2019, Ouyang et al. 2022), their GAE advantages and returns, the group
advantages of the critic-free estimators (with the sequence KL optionally taken out of each
score first, as TRL's RLOO does), and the adaptive KL controller that sets β. The kernels
(``gae``, ``whiten``, ``group_advantages``) are the ops in ``rftengine.ops.advantages``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rftengine.ops import gae, group_advantages, whiten


@dataclass
class KLController:
    """β for the KL penalty: fixed, or adaptive toward ``target`` (Ziegler et al. 2019, §2.2)::

        e = clip(KL / target - 1, -0.2, 0.2);   β ← β · (1 + e · n / horizon)

    where KL is the measured sequence-level KL and n the number of rollouts in the batch.
    """

    value: float
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000

    def update(self, current_kl: float, n: int) -> float:
        if self.adaptive:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value


def kl_shaped_rewards(scores: torch.Tensor, mask: torch.Tensor, token_kl: torch.Tensor | None = None, *,
                      kl_coef: float = 0.0) -> torch.Tensor:
    """Per-token rewards ``[N, T]`` (``scores``' dtype): ``-kl_coef·token_kl`` (zero without
    ``token_kl``), plus ``scores [N]`` at each response's last valid token of ``mask [N, T]``
    (the first position for an empty response)."""
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    if token_kl is not None:
        rewards = -kl_coef * token_kl
    last = (mask.sum(-1) - 1).clamp(min=0)
    return rewards.scatter_add(1, last.unsqueeze(1), scores.unsqueeze(1))


def critic_advantages(
    scores: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, token_kl: torch.Tensor | None = None, *,
    kl_coef: float = 0.0, gamma: float, lam: float, whiten_advantages: bool,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm "ppo": ``(advantages, returns, old_values)``, each ``[N, T]`` fp32 and zero
    outside ``mask``. GAE with ``gamma``/``lam`` over the ``kl_shaped_rewards`` and the critic's
    ``values [N, T]``; advantages whitened over the valid tokens when ``whiten_advantages``
    (``reduce``: the sum over ranks, so N ranks whiten as one process whitens the global batch)."""
    old_values = values * mask
    rewards = kl_shaped_rewards(scores, mask, token_kl, kl_coef=kl_coef)
    advantages, returns = gae(rewards, old_values, mask=mask, gamma=gamma, lam=lam)
    if whiten_advantages:
        advantages = whiten(advantages, mask=mask, reduce=reduce)
    return advantages * mask, returns, old_values


def critic_free_advantages(scores: torch.Tensor, group_size: int, seq_kl: torch.Tensor | None = None, *,
                           kl_coef: float = 0.0, mode: str, scale: str) -> torch.Tensor:
    """Algorithms "grpo"/"rloo" (``mode``): per-sequence advantages ``[N]`` of ``scores [N]``
    (rows group-contiguous, ``group_size`` per prompt) against their group's baseline
    (``group_advantages``; ``scale`` "group", "batch" or "none"). With ``seq_kl [N]`` (KL in the
    reward), ``kl_coef·seq_kl`` leaves each score before the baseline, so β shapes the advantages."""
    if seq_kl is not None:
        scores = scores - kl_coef * seq_kl
    return group_advantages(scores, group_size, mode=mode, scale=scale)
