"""fused_ppo_loss: lm_head + log-probs + PPO/GRPO loss in one sweep, no logits stored.

The head is defined as a composition of the standalone ops (`ppo_composite_loss`) and returns
exactly what that composition returns (loss, stats, gradients w.r.t. hidden, weight and
bias); the fusion only changes how the lm_head part is swept.

The PPO/GRPO per-token loss has a token-local derivative in logp (and entropy), given weights
that depend on the mask only. So ONE sweep over the token chunks (`fused_sweep` of
`rftengine.ops._lm_head_chunks`) computes each chunk's logits once, its log-probs, the loss
derivative from the per-token closed forms the standalone ops use (`ppo_token_reference`,
`kl_token_reference`, `aggregation_weights`), dlogits in place, and the dh/dW/db matmuls:
6NHV FLOPs, 3/4 of `linear_token_logprobs` forward + backward. The gradients are computed in
forward and scaled by the upstream scalar in backward; the loss value and stats come from
the standalone ops on the [B, T] log-probs, so they are the composition's by construction.
"""

from __future__ import annotations

import torch

from rftengine.ops._checks import (
    as_mask,
    check_choice,
    check_floating,
    check_ndim,
    check_non_negative,
    check_positive,
    check_shape,
)
from rftengine.ops._deprecation import deprecated_call_forms, required_with_old_default
from rftengine.ops._lm_head_chunks import FusedSingleSweep, from_rows, prepare_head_inputs, to_rows
from rftengine.ops._precision import accumulation_dtype, autocast_operands
from rftengine.ops.kl import KL_ESTIMATORS, kl_penalty, kl_token_reference
from rftengine.ops.ppo import (
    DEPRECATED_CLIP_KEYWORDS,
    LOG_RATIO_CLAMP,
    PPO_STATS,
    aggregation_weights,
    check_aggregation,
    ppo_policy_loss,
    ppo_token_reference,
    resolve_clips,
)

PPO_STAT_NAMES = ("loss", "policy_loss", *PPO_STATS, "entropy", "kl")


def _masked_token_sum(x: torch.Tensor, keep: torch.Tensor | None, row_weight: torch.Tensor):
    """sum_b w_b sum_t m_bt x_bt (the policy loss's aggregation applied to another term)."""
    if keep is not None:
        x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return (x.sum(-1) * row_weight).sum()


def _token_mean(x: torch.Tensor, keep: torch.Tensor | None):
    if keep is None:
        return x.mean() if x.numel() else x.sum()
    x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() / keep.sum().clamp(min=1)


def ppo_composite_loss(
    logp, entropy, old_logp, advantages, keep, *, ref_logp, kl_coef, kl_estimator, kl_clamp,
    entropy_coef, clip_range, clip_range_high, dual_clip, aggregation, loss_constant, is_weights,
):
    """The composition `fused_ppo_loss` computes, on [B, T] log-probs and entropies:

    ``ppo_policy_loss(...) + kl_coef * agg(kl_penalty(logp, ref_logp)) - entropy_coef * agg(entropy)``
    with ``agg(x) = sum_b w_b sum_t m_bt x_bt`` and w the policy loss's `aggregation_weights`.
    Returns (loss, stats) like every loss; differentiable when its inputs are.
    """
    policy, pstats = ppo_policy_loss(
        logp, old_logp, advantages, mask=keep, clip_range=clip_range,
        clip_range_high=clip_range_high, dual_clip=dual_clip, aggregation=aggregation, is_weights=is_weights,
        loss_constant=loss_constant,
    )
    acc = policy.dtype
    counts = keep.to(acc).sum(-1) if keep is not None else torch.full(
        logp.shape[:1], float(logp.shape[-1]), dtype=acc, device=logp.device)
    row_weight = aggregation_weights(counts, aggregation, loss_constant, logp.shape[-1])
    loss = policy
    stats = dict(pstats)
    stats["policy_loss"] = pstats["loss"]
    if entropy is not None:
        if entropy_coef:
            loss = loss - entropy_coef * _masked_token_sum(entropy.to(acc), keep, row_weight)
        stats["entropy"] = _token_mean(entropy.detach().to(acc), keep)
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, estimator=kl_estimator, mask=keep, clamp=kl_clamp)
        if kl_coef:
            loss = loss + kl_coef * _masked_token_sum(kl.to(acc), keep, row_weight)
        stats["kl"] = _token_mean(kl.detach().to(acc), keep)
    stats["loss"] = loss.detach()
    return loss, stats


@deprecated_call_forms(positional=("mask",), **DEPRECATED_CLIP_KEYWORDS)
@autocast_operands("hidden", "weight", "bias")
def fused_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str | None = None,
    kl_clamp: float = 20.0,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
    loss_constant: float | None = None,
    is_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    fp32_weight_grad: bool = False,
):
    """PPO / GRPO / RLOO policy loss straight from hidden states, in one sweep over the tokens.

    Equal to ``logp, H = linear_token_logprobs(hidden, weight, targets, bias=bias,
    temperature=temperature, mask=mask, return_entropy=True)`` followed by `ppo_composite_loss` (see there): the clipped
    policy loss of `ppo_policy_loss`, plus ``kl_coef`` times the KL penalty `kl_penalty`
    against ``ref_logp`` (the KL-in-loss form of GRPO; leave ``ref_logp`` None or
    ``kl_coef=0`` for KL-in-reward PPO), minus ``entropy_coef`` times the entropy, the last
    two aggregated with the same ``aggregation`` weights as the policy term.

    Args:
        hidden: ``[B, T, H]`` float16/bfloat16/float32 (float64: torch path), shifted so that
            position t scores ``targets[:, t]``.
        weight: ``[V, H]`` lm_head weight (same dtype), possibly tied to the embedding.
        targets: ``[B, T]`` sampled token ids, in ``[0, V)`` where mask is True.
        old_logp: ``[B, T]`` rollout-time log-probs (constant).
        advantages: ``[B, T]`` or ``[B]`` (constant).
        mask: ``[B, T]`` bool or 0/1 or None; masked tokens cost no matmul work.
        ref_logp: optional ``[B, T]`` reference log-probs (constant).
        kl_coef, entropy_coef: >= 0.
        kl_estimator, kl_clamp: as in `kl_penalty`; ``kl_estimator`` is required when
            ``ref_logp`` is given (left out, it is ``"k3"`` for one release, with a
            DeprecationWarning).
        temperature: the sampling temperature (> 0).
        clip_range, clip_range_high, dual_clip, aggregation, loss_constant, is_weights: as
            in `ppo_policy_loss` (``clip_low`` / ``clip_high``: deprecated names).
        bias: optional ``[V]`` lm_head bias.
        chunk_size, fp32_weight_grad: as in `linear_token_logprobs`.

    Returns:
        ``(loss, stats)``: 0-d float32 loss (float64 for float64 inputs) differentiable
        w.r.t. hidden, weight and bias; stats detached: ``loss``, ``policy_loss``,
        ``clipfrac`` (= ``clipfrac_low`` + ``clipfrac_high``), ``clipfrac_low``,
        ``clipfrac_high``, ``clipfrac_dual``, ``approx_kl``, ``ratio_mean``, ``ratio_max``,
        ``entropy`` (token mean), and ``kl`` (token mean) when ``ref_logp`` is given.
        Cost 6NHV FLOPs over the kept tokens; gradients are computed during forward (their
        memory is held from then on), a backward call only scales them. Without valid tokens
        (all masked, B = 0 or T = 0): loss 0, stats 0, zero gradients.
    """
    check_ndim("hidden", hidden, (3,), "[B, T, H]")
    inp, lead = prepare_head_inputs(
        hidden, weight, targets, bias=bias, mask=mask, temperature=temperature, chunk_size=chunk_size,
    )
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("is_weights", is_weights)):
        if t is not None:
            check_floating(name, t)
            check_shape(name, t, lead, "[B, T] like targets")
    check_floating("advantages", advantages)
    if tuple(advantages.shape) not in (tuple(lead), tuple(lead[:1])):
        raise ValueError(
            f"advantages must have shape {tuple(lead)} (per token) or {tuple(lead[:1])} "
            f"(per sequence), got {tuple(advantages.shape)}"
        )
    if ref_logp is not None:  # the estimator matters only with a reference
        kl_estimator = required_with_old_default("fused_ppo_loss", "kl_estimator", kl_estimator, "k3")
    if kl_estimator is not None:
        check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    check_positive("kl_clamp", kl_clamp, allow_inf=True)
    check_non_negative("kl_coef", kl_coef)
    check_non_negative("entropy_coef", entropy_coef)
    # before the sweep, which uses them (aggregation_weights divides by loss_constant)
    clip_args = resolve_clips(clip_range, clip_range_high, dual_clip)
    check_aggregation(aggregation, loss_constant)
    keep = as_mask("mask", mask, lead, hidden.device)
    acc = accumulation_dtype(hidden)

    # per-token constants of the loss, flattened and in the sweep's row order
    counts = keep.to(acc).sum(-1) if keep is not None else torch.full(
        lead[:1], float(lead[1]), dtype=acc, device=hidden.device)
    row_weight = aggregation_weights(counts, aggregation, loss_constant, lead[1])
    per_token = {
        "w": row_weight.unsqueeze(-1).expand(lead),
        "old": old_logp,
        "adv": advantages.unsqueeze(-1).expand(lead) if advantages.dim() == 1 else advantages,
    }
    if is_weights is not None:
        per_token["isw"] = is_weights
    if ref_logp is not None and kl_coef:
        per_token["ref"] = ref_logp
    rows = {k: to_rows(inp, v.reshape(-1)).to(acc) for k, v in per_token.items()}
    if inp.keep is not None:  # not compacted (CUDA-graph capture): padding may hold NaN/-inf
        rows = {k: torch.where(inp.keep, v, torch.zeros((), dtype=acc, device=v.device)) for k, v in rows.items()}
        rows["w"] = rows["w"] * inp.keep

    def token_grad(start, stop, logp_c, entropy_c):
        r = {k: v[start:stop] for k, v in rows.items()}
        _, d_logp, *_ = ppo_token_reference(logp_c.to(acc) - r["old"], r["adv"], *clip_args, LOG_RATIO_CLAMP)
        if "isw" in r:
            d_logp = d_logp * r["isw"]
        if "ref" in r:
            d_logp = d_logp + kl_coef * kl_token_reference(logp_c.to(acc), r["ref"], kl_estimator, kl_clamp)[1]
        g_ent = -entropy_coef * r["w"] if entropy_coef else None
        return d_logp * r["w"], g_ent

    def finish(logp, entropy):
        with torch.no_grad():
            loss, stats = ppo_composite_loss(
                from_rows(inp, logp).view(lead), from_rows(inp, entropy).view(lead),
                old_logp, advantages, keep, ref_logp=ref_logp, kl_coef=kl_coef,
                kl_estimator=kl_estimator, kl_clamp=kl_clamp, entropy_coef=entropy_coef,
                clip_range=clip_range, clip_range_high=clip_range_high, dual_clip=dual_clip,
                aggregation=aggregation, loss_constant=loss_constant, is_weights=is_weights,
            )
        return loss, torch.stack([stats[k].to(loss.dtype) for k in names])

    names = [k for k in PPO_STAT_NAMES if k != "kl" or ref_logp is not None]
    loss, stat_values = FusedSingleSweep.apply(
        inp.hidden, weight, bias, inp, float(temperature), True, token_grad,
        bool(fp32_weight_grad), finish, None,
    )
    return loss, dict(zip(names, stat_values.unbind()))
