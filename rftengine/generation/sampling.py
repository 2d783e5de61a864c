"""Sampling from one decode step's logits: temperature, top-k/top-p truncation, exponential race.

Everything here is a pure function of device tensors with static shapes and no host sync, so
the rollout loop can capture it in a CUDA graph together with the model forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rftengine.ops import token_logprobs


class SamplingParams(NamedTuple):
    """How one rollout samples. Hashable: the CUDA graphs are captured per value.

    temperature: > 0; logits are divided by it before anything else (and before the log-prob).
    top_k: keep the k highest logits per row; 0 keeps the whole vocabulary.
    top_p: keep the smallest set of highest-probability tokens whose mass reaches top_p
        (computed after top-k); 1.0 keeps everything.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> SamplingParams:
        t, k, p = self
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(
                f"temperature must be a number > 0 (use top_k=1 for greedy decoding), got {t!r}"
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = no top-k), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1 = no top-p), got {p!r}")
        return SamplingParams(float(t), int(k), float(p))

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


def truncate_logits(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the logits outside the top-k / top-p set of each row.

    Args:
        z: ``[N, V]`` float32 temperature-scaled logits.
        top_k: keep the k largest per row (0 or >= V: all).
        top_p: then keep the smallest prefix of the sorted, renormalised distribution whose mass
            reaches top_p (the token that crosses top_p is kept; at least one token always is).

    Returns:
        ``[N, V]`` float32: ``z`` where kept, ``-inf`` elsewhere. The set is defined by a per-row
        cut value (``z >= cut`` is kept), so tokens tied with the last kept one are kept too.
    """
    vocab = z.shape[-1]
    use_k = 0 < top_k < vocab
    if not use_k and top_p >= 1.0:
        return z
    # Only the top-k candidates need sorting when top-k is on (topk returns them sorted).
    ranked = torch.topk(z, top_k, dim=-1).values if use_k else torch.sort(z, dim=-1, descending=True).values
    if top_p < 1.0:
        p = torch.softmax(ranked, dim=-1)
        mass_before = torch.cumsum(p, dim=-1) - p
        n_keep = (mass_before < top_p).sum(-1, keepdim=True).clamp_(min=1)
        cut = ranked.gather(-1, n_keep - 1)
    else:
        cut = ranked[:, -1:]
    return z.masked_fill(z < cut, float("-inf"))


def exponential_race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from ``probs`` ``[N, V]``: ``argmax_v p_v / E_v`` with ``E_v ~ Exp(1)``.

    The index of the smallest ``E_v / p_v`` (the first of V exponential clocks with rates p_v to
    ring) is distributed as ``p``. Unlike ``torch.multinomial`` this needs no host sync, so it can
    live inside a CUDA graph; the generator makes it reproducible. ``probs`` is overwritten.
    """
    race = torch.empty_like(probs).exponential_(generator=generator)
    # An Exp(1) draw of exactly 0 would turn 0 / 0 into NaN for a masked-out token.
    race.clamp_(min=torch.finfo(race.dtype).tiny)
    return probs.div_(race).argmax(dim=-1)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    with_truncated: bool = False,
):
    """Draw one token per row and score it.

    Args:
        logits: ``[N, V]`` raw logits of one decode step, in the model dtype.
        params: validated SamplingParams.
        generator: the torch.Generator the draws come from (on ``logits.device``).
        with_truncated: also return the log-prob under the truncated top-k/top-p distribution.

    Returns:
        ``(tokens [N] int64, logp [N] float32, truncated_logp [N] float32 or None)`` where
        ``logp = log softmax(logits / T)[token]`` over the full vocabulary, computed by
        ``rftengine.ops.token_logprobs``, the kernel the trainer uses on the same logits, and
        ``truncated_logp = log softmax(truncate(logits / T))[token]``.
    """
    z = logits.float() / params.temperature
    z_kept = truncate_logits(z, params.top_k, params.top_p)
    tokens = exponential_race(torch.softmax(z_kept, dim=-1), generator)
    logp = token_logprobs(logits, tokens, temperature=params.temperature)
    truncated = None
    if with_truncated:
        truncated = z_kept.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(z_kept, dim=-1)
    return tokens, logp, truncated
