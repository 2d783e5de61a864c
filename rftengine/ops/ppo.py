"""ppo_policy_loss and value_loss: the clipped PPO objectives over [B, T] tokens.

Public function -> autograd.Function -> Triton launchers (`rftengine.kernels.ppo`) on CUDA or
the torch references below elsewhere. Both implementations produce the same per-sequence
partial sums; `aggregation_weights` turns the valid-token counts into per-sequence weights so
that loss = sum_b weight_b * sum_t loss_bt for all three aggregations, and backward is one
elementwise pass. `ppo_token_reference` / `value_token_reference` are the per-token closed
forms (the kernels' `ppo_token` / `value_token`), importable by fused losses.
"""

from __future__ import annotations

import torch

from rftengine.ops._checks import (
    as_mask,
    check_choice,
    check_finite,
    check_floating,
    check_ndim,
    check_non_negative,
    check_positive,
    check_same_device,
    check_shape,
)
from rftengine.ops._deprecation import deprecated_call_forms
from rftengine.ops._dispatch import use_triton
from rftengine.ops._precision import accumulation_dtype
from rftengine.ops.logprobs import rows_view

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "token_sum_norm")
# |logp - old_logp| is clamped to this before exp: exp(20) ~ 5e8 keeps the ratio finite in fp32
LOG_RATIO_CLAMP = 20.0

# the kernels' rows (rftengine.kernels.ppo.PPO_PARTIALS), not imported so that the torch path
# does not load Triton; "clipped_low": the clipped tokens with A < 0 (below the ratio floor)
PPO_PARTIALS = ("loss", "count", "clipped", "clipped_low", "dual_clipped", "approx_kl", "ratio", "ratio_max")
VALUE_PARTIALS = ("loss", "count", "clipped", "values", "returns")
# the stats of ppo_policy_loss besides "loss", in the order _PPOPolicyLoss stacks them
PPO_STATS = ("clipfrac", "clipfrac_low", "clipfrac_high", "clipfrac_dual", "approx_kl", "ratio_mean", "ratio_max")


# ---------------------------------------------------------------- per-token closed forms


def ppo_token_reference(
    log_ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float,
    dual_clip: float | None, log_ratio_clamp: float = LOG_RATIO_CLAMP,
):
    """One token of the clipped PPO policy loss, elementwise on fp32/fp64 tensors.

    Returns ``(loss, dloss/dlogp, clipped, dual_clipped, ratio, approx_kl)``:
    ``ratio = exp(clamp(log_ratio, ±log_ratio_clamp))``,
    ``loss = max(-A*ratio, -A*clip(ratio, 1-clip_low, 1+clip_high))``, and with ``dual_clip``,
    for ``A < 0``, ``loss = min(loss, -A*dual_clip)``; ``clipped``/``dual_clipped`` are 0/1
    (that clip set the loss and zeroed its gradient); ``approx_kl = ratio - 1 - log ratio``.
    """
    lr = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(lr)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    live = (unclipped >= clipped) & (log_ratio >= -log_ratio_clamp) & (log_ratio <= log_ratio_clamp)
    zero = torch.zeros_like(loss)
    d_logp = torch.where(live, unclipped, zero)
    d_logp = torch.where(torch.isnan(log_ratio), log_ratio, d_logp)  # a NaN token: NaN gradient
    is_clipped = (clipped > unclipped).to(loss.dtype)
    is_dual = zero
    if dual_clip is not None:
        cap = -adv * dual_clip
        capped = (adv < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
        d_logp = torch.where(capped, zero, d_logp)
        is_dual = capped.to(loss.dtype)
    return loss, d_logp, is_clipped, is_dual, ratio, ratio - 1.0 - lr


def value_token_reference(values, old_values, returns, clip: float | None):
    """One token of the clipped value loss: ``(loss, dloss/dvalues, clipped)``.

    ``loss = 0.5 * max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2)``.
    """
    err = values - returns
    loss = 0.5 * err * err
    if clip is None:
        return loss, err, torch.zeros_like(loss)
    err_clip = torch.minimum(torch.maximum(values, old_values - clip), old_values + clip) - returns
    loss_clip = 0.5 * err_clip * err_clip
    take_clip = loss_clip > loss
    d_values = torch.where(take_clip, torch.zeros_like(err), err)
    return (
        torch.maximum(loss, loss_clip),  # NaN in either term (e.g. a NaN old value) stays NaN
        torch.where(torch.isnan(loss_clip), loss_clip, d_values),
        take_clip.to(loss.dtype),
    )


def aggregation_weights(
    row_count: torch.Tensor, aggregation: str, loss_constant: float | None, n_cols: int,
) -> torch.Tensor:
    """Per-sequence weight w_b such that loss = sum_b w_b * sum_t valid_bt * loss_bt.

    - ``token_mean``: ``1 / max(N, 1)`` with N the valid tokens of the whole batch;
    - ``seq_mean_token_mean``: ``1 / (max(n_b, 1) * max(S, 1))`` with n_b the valid tokens of
      sequence b and S the number of sequences with at least one valid token;
    - ``token_sum_norm``: ``1 / (B * C)``, C = ``loss_constant`` (default ``n_cols`` = T):
      each sequence's token sum over a constant, averaged over the B sequences (Dr. GRPO).
    """
    if aggregation == "token_mean":
        return torch.ones_like(row_count) / row_count.sum().clamp(min=1.0)
    if aggregation == "seq_mean_token_mean":
        n_seq = (row_count > 0).sum().to(row_count.dtype).clamp(min=1.0)
        return 1.0 / (row_count.clamp(min=1.0) * n_seq)
    # T = 0 (no token at all): any weight gives the loss 0; max(T, 1) avoids dividing by 0
    constant = float(loss_constant) if loss_constant is not None else float(max(n_cols, 1))
    return torch.full_like(row_count, 1.0 / (max(row_count.numel(), 1) * constant))


# ---------------------------------------------------------------- torch references


def _load(t, keep, acc):
    """t in `acc` with masked entries zeroed (padding may hold -inf/NaN and is never read)."""
    t = t.to(acc)
    if keep is None or t.dim() == 1:
        return t
    return torch.where(keep, t, torch.zeros((), dtype=acc, device=t.device))


def ppo_policy_forward_reference(
    logp, old_logp, advantages, keep, is_weights, clip_low, clip_high, dual_clip, log_ratio_clamp,
) -> torch.Tensor:
    """Torch twin of the forward kernel: partials [len(PPO_PARTIALS), B, 1]."""
    acc = accumulation_dtype(logp, old_logp)
    adv = _load(advantages, keep, acc)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    loss, _, clipped, dual, ratio, approx_kl = ppo_token_reference(
        _load(logp, keep, acc) - _load(old_logp, keep, acc), adv,
        clip_low, clip_high, dual_clip, log_ratio_clamp,
    )
    if is_weights is not None:
        loss = loss * _load(is_weights, keep, acc)
    k = torch.ones_like(loss) if keep is None else keep.to(acc)
    # a clip with A < 0 can only be the floor 1 - clip_low (with A > 0 only the ceiling)
    clipped_low = torch.where(adv < 0, clipped, torch.zeros_like(clipped))
    sums = [(x * k).sum(-1) for x in (loss, k, clipped, clipped_low, dual, approx_kl, ratio)]
    sums.append((ratio * k).amax(-1) if ratio.shape[-1] else torch.zeros_like(sums[0]))
    return torch.stack(sums).unsqueeze(-1)


def ppo_policy_backward_reference(
    logp, old_logp, advantages, keep, is_weights, clip_low, clip_high, dual_clip, log_ratio_clamp,
    row_scale, grad,
) -> torch.Tensor:
    acc = accumulation_dtype(logp, old_logp)
    adv = _load(advantages, keep, acc)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    _, d_logp, *_ = ppo_token_reference(
        _load(logp, keep, acc) - _load(old_logp, keep, acc), adv,
        clip_low, clip_high, dual_clip, log_ratio_clamp,
    )
    if is_weights is not None:
        d_logp = d_logp * _load(is_weights, keep, acc)
    d_logp = d_logp * (grad.to(acc) * row_scale.to(acc)).unsqueeze(-1)
    if keep is not None:
        d_logp = d_logp.masked_fill(~keep, 0)
    return d_logp.to(logp.dtype)


def value_forward_reference(values, old_values, returns, keep, clip) -> torch.Tensor:
    """Torch twin of the value forward kernel: partials [len(VALUE_PARTIALS), B, 1]."""
    acc = accumulation_dtype(values, returns)
    v, r = _load(values, keep, acc), _load(returns, keep, acc)
    old = _load(old_values, keep, acc) if clip is not None else v
    loss, _, clipped = value_token_reference(v, old, r, clip)
    k = torch.ones_like(loss) if keep is None else keep.to(acc)
    return torch.stack([(x * k).sum(-1) for x in (loss, k, clipped, v, r)]).unsqueeze(-1)


def value_backward_reference(values, old_values, returns, keep, clip, row_scale, grad) -> torch.Tensor:
    acc = accumulation_dtype(values, returns)
    v, r = _load(values, keep, acc), _load(returns, keep, acc)
    old = _load(old_values, keep, acc) if clip is not None else v
    _, d_v, _ = value_token_reference(v, old, r, clip)
    d_v = d_v * (grad.to(acc) * row_scale.to(acc)).unsqueeze(-1)
    if keep is not None:
        d_v = d_v.masked_fill(~keep, 0)
    return d_v.to(values.dtype)


def _implementation(triton_path: bool):
    if triton_path:
        from rftengine.kernels import ppo as kernel

        return (kernel.ppo_policy_forward, kernel.ppo_policy_backward,
                kernel.value_forward, kernel.value_backward)
    return (ppo_policy_forward_reference, ppo_policy_backward_reference,
            value_forward_reference, value_backward_reference)


class _PPOPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, advantages, keep, is_weights, clips, aggregation, loss_constant,
                triton_path):
        forward_impl, *_ = _implementation(triton_path)
        partials = forward_impl(logp, old_logp, advantages, keep, is_weights, *clips)
        rows = dict(zip(PPO_PARTIALS[:-1], partials[:-1].sum(-1)))  # name -> [B], all but ratio_max
        row_scale = aggregation_weights(rows["count"], aggregation, loss_constant, logp.shape[-1])
        loss = (rows["loss"] * row_scale).sum()
        n_valid = rows["count"].sum().clamp(min=1.0)
        total = {k: v.sum() for k, v in rows.items()}
        # token counts are integers in fp32 (exact below 2^24): high = clipped - low is exact
        clipped_high = total["clipped"] - total["clipped_low"]
        ratio_max = partials[-1]
        stats = torch.stack([
            total["clipped"] / n_valid, total["clipped_low"] / n_valid, clipped_high / n_valid,
            total["dual_clipped"] / n_valid, total["approx_kl"] / n_valid, total["ratio"] / n_valid,
            ratio_max.amax() if ratio_max.numel() else loss * 0,
        ])
        ctx.save_for_backward(logp, old_logp, advantages, keep, is_weights, row_scale)
        ctx.clips, ctx.triton_path = clips, triton_path
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logp, old_logp, advantages, keep, is_weights, row_scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        _, backward_impl, *_ = _implementation(ctx.triton_path)
        grad_logp = backward_impl(
            logp, old_logp, advantages, keep, is_weights, *ctx.clips, row_scale,
            grad_loss.to(row_scale.dtype).contiguous(),
        )
        return (grad_logp,) + (None,) * 8


class _ValueLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, keep, clip, aggregation, loss_constant, triton_path):
        _, _, forward_impl, _ = _implementation(triton_path)
        sums = forward_impl(values, old_values, returns, keep, clip).sum(-1)  # [5, B]
        row_scale = aggregation_weights(sums[1], aggregation, loss_constant, values.shape[-1])
        loss = (sums[0] * row_scale).sum()
        n_valid = sums[1].sum().clamp(min=1.0)
        stats = torch.stack([sums[2].sum() / n_valid, sums[3].sum() / n_valid, sums[4].sum() / n_valid])
        ctx.save_for_backward(values, old_values, returns, keep, row_scale)
        ctx.clip, ctx.triton_path = clip, triton_path
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        values, old_values, returns, keep, row_scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        *_, backward_impl = _implementation(ctx.triton_path)
        grad_v = backward_impl(
            values, old_values, returns, keep, ctx.clip, row_scale,
            grad_loss.to(row_scale.dtype).contiguous(),
        )
        return (grad_v,) + (None,) * 7


# ---------------------------------------------------------------- validation helpers


def _check_tokens(name: str, t: torch.Tensor, shape) -> None:
    check_floating(name, t)
    check_shape(name, t, shape, "[B, T] like logp")


def _check_finite_where(name: str, t: torch.Tensor, keep: torch.Tensor | None) -> None:
    """NaN/inf are rejected at valid positions only: padding is never read."""
    if keep is not None and t.dim() == keep.dim():
        t = torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))
    check_finite(name, t)


def check_aggregation(aggregation: str, loss_constant: float | None) -> None:
    """The aggregation name, and loss_constant: a finite number > 0, only with token_sum_norm."""
    check_choice("aggregation", aggregation, AGGREGATIONS)
    if loss_constant is not None:
        if aggregation != "token_sum_norm":
            raise ValueError(
                f"loss_constant is used only with aggregation='token_sum_norm', got aggregation={aggregation!r}"
            )
        check_positive("loss_constant", loss_constant)


def resolve_clips(
    clip_range: float, clip_range_high: float | None, dual_clip: float | None,
) -> tuple[float, float, float | None]:
    """Check ``0 <= clip_range < 1``, ``clip_range_high`` None or >= 0, ``dual_clip`` None or
    > 1; returns ``(low, high, dual)`` as floats, high = clip_range where clip_range_high is None."""
    check_non_negative("clip_range", clip_range)
    if clip_range >= 1:
        raise ValueError(f"clip_range must be < 1 (the ratio floor is 1 - clip_range), got {clip_range!r}")
    if clip_range_high is None:
        clip_range_high = clip_range
    check_non_negative("clip_range_high", clip_range_high)
    if dual_clip is not None:
        check_positive("dual_clip", dual_clip)
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be None or > 1, got {dual_clip!r}")
    return float(clip_range), float(clip_range_high), None if dual_clip is None else float(dual_clip)


# the old keywords of the clip ranges; clip_high defaulted to 0.2 whatever clip_low was
DEPRECATED_CLIP_KEYWORDS = dict(renamed={"clip_low": "clip_range", "clip_high": "clip_range_high"},
                                old_defaults={"clip_range_high": 0.2})


# ---------------------------------------------------------------- public API


@deprecated_call_forms(positional=("mask",), **DEPRECATED_CLIP_KEYWORDS)
def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
    is_weights: torch.Tensor | None = None,
    loss_constant: float | None = None,
):
    """Clipped PPO policy loss (Schulman et al., 2017), as used by PPO, GRPO and RLOO.

    Per valid token, with ``ρ = exp(clamp(logp - old_logp, ±20))``:
    ``l = max(-A·ρ, -A·clip(ρ, 1 - ε, 1 + ε_high))`` with ε = ``clip_range`` and ε_high =
    ``clip_range_high`` (asymmetric clip as in DAPO);
    with ``dual_clip = c > 1`` and ``A < 0``: ``l = min(l, -A·c)`` (Ye et al., 2020);
    with ``is_weights`` w: ``l = w·l`` (truncated importance-sampling correction for the
    rollout/trainer mismatch; w is a constant, no gradient).

    Aggregation (explicit; see `docs/conventions.md`, "Aggregation"):

    - ``"token_mean"``: sum of l over all valid tokens / their number;
    - ``"seq_mean_token_mean"``: mean over sequences (those with ≥ 1 valid token) of each
      sequence's token mean;
    - ``"token_sum_norm"``: each sequence's token sum divided by the constant
      ``loss_constant`` (default T = ``logp.shape[-1]``, the padded max length), averaged over
      the B sequences: the length-unbiased form of Dr. GRPO (Liu et al., 2025).

    Args:
        logp: ``[B, T]`` float policy log-probs of the sampled tokens (gets the gradient).
        old_logp: ``[B, T]`` log-probs at rollout time (constant).
        advantages: ``[B, T]`` per token or ``[B]`` per sequence (constant); must be finite
            at valid positions.
        mask: ``[B, T]`` bool or 0/1 (True = token counts) or None (all count). Masked
            positions are never read.
        clip_range: ``0 <= clip_range < 1``, the ratio floor is ``1 - clip_range``.
        clip_range_high: ``>= 0`` or None (= ``clip_range``), the ratio ceiling is
            ``1 + clip_range_high``. (``clip_low`` / ``clip_high``: deprecated names.)
        dual_clip: None or a number > 1.
        aggregation: one of the three above.
        is_weights: optional ``[B, T]`` finite weights (constant).
        loss_constant: > 0, only with ``"token_sum_norm"``.

    Returns:
        ``(loss, stats)``: ``loss`` a 0-d float32 tensor (float64 for float64 inputs)
        differentiable w.r.t. ``logp`` only; ``stats`` detached 0-d tensors, token means over
        valid tokens whatever the aggregation: ``loss``, ``clipfrac`` (the clip set the loss),
        its two sides ``clipfrac_low`` (A < 0 and ρ < 1 - ε) and ``clipfrac_high`` (A > 0 and
        ρ > 1 + ε_high), which sum to ``clipfrac``, ``clipfrac_dual``, ``approx_kl`` (k3
        estimate of KL(old‖new): ``ρ - 1 - log ρ``), ``ratio_mean``, ``ratio_max``. A batch
        without valid tokens (all masked, B = 0 or T = 0) gives loss 0, stats 0 and zero
        gradient, never NaN.
    """
    check_floating("logp", logp)
    check_ndim("logp", logp, (2,), "[B, T]")
    shape = logp.shape
    _check_tokens("old_logp", old_logp, shape)
    check_floating("advantages", advantages)
    if tuple(advantages.shape) not in (tuple(shape), tuple(shape[:1])):
        raise ValueError(
            f"advantages must have shape {tuple(shape)} (per token) or {tuple(shape[:1])} "
            f"(per sequence), got {tuple(advantages.shape)}"
        )
    if is_weights is not None:
        _check_tokens("is_weights", is_weights, shape)
    device = check_same_device(
        logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, is_weights=is_weights
    )
    keep = as_mask("mask", mask, shape, device)
    low, high, dual = resolve_clips(clip_range, clip_range_high, dual_clip)
    check_aggregation(aggregation, loss_constant)
    _check_finite_where("advantages", advantages, keep)
    if is_weights is not None:
        _check_finite_where("is_weights", is_weights, keep)

    triton_path = use_triton(logp, old_logp, advantages) and accumulation_dtype(logp, old_logp) == torch.float32
    clips = (low, high, dual, LOG_RATIO_CLAMP)
    loss, stats = _PPOPolicyLoss.apply(
        rows_view(logp), rows_view(old_logp),
        advantages.contiguous() if advantages.dim() == 1 else rows_view(advantages),
        keep.contiguous() if keep is not None else None,
        rows_view(is_weights) if is_weights is not None else None,
        clips, aggregation, loss_constant, triton_path,
    )
    return loss, {"loss": loss.detach(), **dict(zip(PPO_STATS, stats.unbind()))}


@deprecated_call_forms(positional=("mask",), renamed={"clip": "clip_range"})
def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor | None,
    returns: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    clip_range: float | None = 0.2,
    aggregation: str = "token_mean",
    loss_constant: float | None = None,
):
    """Clipped value loss: ``0.5·max((V - R)², (clip(V, V_old - ε, V_old + ε) - R)²)``, ε = ``clip_range``.

    Args:
        values: ``[B, T]`` float value predictions (gets the gradient).
        old_values: ``[B, T]`` values at rollout time (constant); may be None when
            ``clip_range`` is None (plain ``0.5·(V - R)²``).
        returns: ``[B, T]`` targets (constant), finite at valid positions.
        mask: ``[B, T]`` bool or 0/1 or None; masked positions are never read.
        clip_range: > 0 or None (no clipping). (``clip``: deprecated name.)
        aggregation, loss_constant: as in :func:`ppo_policy_loss`.

    Returns:
        ``(loss, stats)``: 0-d loss (float32, float64 for float64 inputs), differentiable
        w.r.t. ``values``; stats detached token means over valid tokens: ``loss``,
        ``clipfrac`` (the clipped term was larger), ``values/mean``, ``returns/mean``.
        Without valid tokens (all masked, B = 0 or T = 0): loss 0, stats 0, zero gradient.
    """
    check_floating("values", values)
    check_ndim("values", values, (2,), "[B, T]")
    shape = values.shape
    _check_tokens("returns", returns, shape)
    if clip_range is not None:
        check_positive("clip_range", clip_range)
        if old_values is None:
            raise ValueError("old_values must be a [B, T] tensor when clip_range is set, got None")
    if old_values is not None:
        _check_tokens("old_values", old_values, shape)
    device = check_same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    keep = as_mask("mask", mask, shape, device)
    check_aggregation(aggregation, loss_constant)
    _check_finite_where("returns", returns, keep)

    triton_path = use_triton(values, returns) and accumulation_dtype(values, returns) == torch.float32
    old = rows_view(old_values) if old_values is not None and clip_range is not None else None
    loss, stats = _ValueLoss.apply(
        rows_view(values), old, rows_view(returns),
        keep.contiguous() if keep is not None else None,
        None if clip_range is None else float(clip_range), aggregation, loss_constant, triton_path,
    )
    names = ("clipfrac", "values/mean", "returns/mean")
    return loss, {"loss": loss.detach(), **dict(zip(names, stats.unbind()))}
