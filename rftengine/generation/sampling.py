"""Sampling from one decode step's logits: the rollout's sampling parameters and the call into
`rftengine.ops.sample_tokens` (temperature, min-p/top-k/top-p, the counter-based exponential race).

Everything is capturable in a CUDA graph together with the model forward; a row's draw depends
on its own logits and noise key only (``noise_keys``), not on the rows beside it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rftengine.ops.sampling import check_sampling_args, noise_keys, sample_tokens

__all__ = ["SamplerSettings", "noise_keys", "sample"]


class SamplerSettings(NamedTuple):
    """How one rollout samples. Hashable: the CUDA graphs are captured per value.

    temperature: > 0; logits are divided by it before anything else (and before the log-prob).
    top_k: keep the k highest logits per row; 0 keeps the whole vocabulary; 1 is greedy.
    top_p: keep the smallest set of highest-probability tokens whose mass reaches top_p
        (computed after min-p and top-k); 1.0 keeps everything.
    min_p: keep the tokens whose probability is at least min_p times the row's largest
        (vLLM's min-p); 0.0 keeps everything.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def validate(self) -> SamplerSettings:
        t, k, p, min_p = self
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(
                f"temperature must be a number > 0 (use top_k=1 for greedy decoding), got {t!r}"
            )
        check_sampling_args(t, k, p, min_p)
        return SamplerSettings(float(t), int(k), float(p), float(min_p))

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def sample(
    logits: torch.Tensor,
    params: SamplerSettings,
    keys: torch.Tensor,
    with_truncated: bool = False,
):
    """Draw one token per row and score it.

    Args:
        logits: ``[N, V]`` raw logits of one decode step, in the model dtype.
        params: validated SamplerSettings.
        keys: ``[N]`` int64 noise keys (``noise_keys``): row n's draw is a function of
            ``logits[n]`` and ``keys[n]`` only. Greedy decoding (``top_k=1``) draws no noise.
        with_truncated: also return the log-prob under the truncated min-p/top-k/top-p
            distribution.

    Returns:
        ``(tokens [N] int64, logp [N] float32, truncated_logp [N] float32 or None)`` where
        ``logp = log softmax(logits / T)[token]`` over the full vocabulary, the trainer's
        formula (``rftengine.ops.token_logprobs``), and
        ``truncated_logp = log softmax(truncate(logits / T))[token]``; see
        ``rftengine.ops.sample_tokens``.
    """
    return sample_tokens(
        logits, keys, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        min_p=params.min_p, with_truncated=with_truncated,
    )
