"""Fused heads: lm_head + log-probs + alignment loss, with every gradient, no logits stored.

Each head is defined as a composition of the standalone ops and returns exactly what that
composition returns (loss, stats, gradients w.r.t. hidden, weight and bias); the fusion only
changes how the lm_head part is swept.

- `fused_ppo_loss`: the PPO/GRPO per-token loss has a token-local derivative in logp (and
  entropy), given weights that depend on the mask only. So ONE sweep over the token chunks
  computes each chunk's logits once, its log-probs, the loss derivative from the per-token
  closed forms the standalone ops use (`ppo_token_reference`, `kl_token_reference`,
  `aggregation_weights`), dlogits in place, and the dh/dW/db matmuls: 6NHV FLOPs, 3/4 of
  `linear_token_logprobs` forward + backward. The gradients are computed in forward and
  scaled by the upstream scalar in backward; the loss value and stats come from the
  standalone ops on the [B, T] log-probs, so they are the composition's by construction.
- `fused_dpo_loss`: a pair's gradient depends on its whole-sequence log-probs. The kept
  rows are ordered pair by pair (chosen_i's, then rejected_i's) and chunks are cut only at
  pair boundaries, as many whole pairs as fit the plan's chunk budget; each chunk then holds
  the sequence sums of its pairs, so ONE sweep computes the per-pair loss derivative (the
  standalone pair loss under autograd, scaled by pairs-in-chunk / B), dlogits and the
  dh/dW/db matmuls: 6NHV. When one pair has more kept tokens than the chunk budget (or rows
  cannot be compacted, under CUDA-graph capture with a mask) it falls back to two sweeps:
  forward sweeps the log-probs (2NHV) and takes dloss/dlogp from `sequence_logprobs` +
  `dpo_loss` under autograd on the small [2B, T] tensor; backward recomputes each chunk's
  logits and writes dh/dW/db (6NHV): 8NHV, the cost of `linear_token_logprobs`.
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
from rftengine.ops.kl import KL_ESTIMATORS, kl_penalty, kl_token_reference
from rftengine.ops.linear_logprobs import (
    GradBuffers,
    HeadInputs,
    fused_sweep,
    from_rows,
    gradient_sweep,
    logprob_sweep,
    prepare_head_inputs,
    to_rows,
)
from rftengine.ops._precision import accumulation_dtype, autocast_operands
from rftengine.ops.ppo import (
    LOG_RATIO_CLAMP,
    aggregation_weights,
    check_aggregation,
    check_clips,
    ppo_policy_loss,
    ppo_token_reference,
)
from rftengine.ops._dispatch import use_triton
from rftengine.ops.preference import _DPOPairs, check_dpo_options, dpo_loss
from rftengine.ops.sequence import sequence_logprobs

PPO_STAT_NAMES = (
    "loss", "policy_loss", "clipfrac", "clipfrac_dual", "approx_kl", "ratio_mean", "ratio_max",
    "entropy", "kl",
)
DPO_STAT_NAMES = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected",
)


def _scaled(t: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.mul_(grad.to(t.dtype))


# ---------------------------------------------------------------------------------------
# PPO / GRPO


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
    entropy_coef, clip_low, clip_high, dual_clip, aggregation, loss_constant, is_weights,
):
    """The composition `fused_ppo_loss` computes, on [B, T] log-probs and entropies:

    ``ppo_policy_loss(...) + kl_coef * agg(kl_penalty(logp, ref_logp)) - entropy_coef * agg(entropy)``
    with ``agg(x) = sum_b w_b sum_t m_bt x_bt`` and w the policy loss's `aggregation_weights`.
    Returns (loss, stats) like every loss; differentiable when its inputs are.
    """
    policy, pstats = ppo_policy_loss(
        logp, old_logp, advantages, keep, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, aggregation=aggregation, is_weights=is_weights,
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


class _FusedSingleSweep(torch.autograd.Function):
    """Loss and gradients from one `fused_sweep`; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, inp, temperature, with_entropy, token_grad,
                fp32_weight_grad, finish, bounds):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = GradBuffers(inp, need_h, need_w, need_b and bias is not None, fp32_weight_grad)
        logp, entropy = fused_sweep(inp, temperature, with_entropy, token_grad, grads, bounds)
        loss, stat_values = finish(logp, entropy)
        dh, dw, db = grads.results(weight.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(dh, dw, db)
        ctx.mark_non_differentiable(stat_values)
        return loss, stat_values

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        dh, dw, db = ctx.saved_tensors
        return (_scaled(dh, grad_loss), _scaled(dw, grad_loss), _scaled(db, grad_loss)) + (None,) * 7


@autocast_operands("hidden", "weight", "bias")
def fused_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: float = 20.0,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
    loss_constant: float | None = None,
    is_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    fp32_weight_grad: bool = False,
):
    """PPO / GRPO / RLOO policy loss straight from hidden states, in one sweep over the tokens.

    Equal to ``logp, H = linear_token_logprobs(hidden, weight, targets, bias, temperature,
    mask, return_entropy=True)`` followed by `ppo_composite_loss` (see there): the clipped
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
        kl_estimator, kl_clamp: as in `kl_penalty`.
        temperature: the sampling temperature (> 0).
        clip_low, clip_high, dual_clip, aggregation, loss_constant, is_weights: as in
            `ppo_policy_loss`.
        bias: optional ``[V]`` lm_head bias.
        chunk_size, fp32_weight_grad: as in `linear_token_logprobs`.

    Returns:
        ``(loss, stats)``: 0-d float32 loss (float64 for float64 inputs) differentiable
        w.r.t. hidden, weight and bias; stats detached: ``loss``, ``policy_loss``,
        ``clipfrac``, ``clipfrac_dual``, ``approx_kl``, ``ratio_mean``, ``ratio_max``,
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
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    check_positive("kl_clamp", kl_clamp, allow_inf=True)
    check_non_negative("kl_coef", kl_coef)
    check_non_negative("entropy_coef", entropy_coef)
    # before the sweep, which uses them (aggregation_weights divides by loss_constant)
    check_clips(clip_low, clip_high, dual_clip)
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
    clip_args = (float(clip_low), float(clip_high), None if dual_clip is None else float(dual_clip))

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
                clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                aggregation=aggregation, loss_constant=loss_constant, is_weights=is_weights,
            )
        return loss, torch.stack([stats[k].to(loss.dtype) for k in names])

    names = [k for k in PPO_STAT_NAMES if k != "kl" or ref_logp is not None]
    loss, stat_values = _FusedSingleSweep.apply(
        inp.hidden, weight, bias, inp, float(temperature), True, token_grad,
        bool(fp32_weight_grad), finish, None,
    )
    return loss, dict(zip(names, stat_values.unbind()))


# ---------------------------------------------------------------------------------------
# DPO family


class _FusedDPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, inp, temperature, fp32_weight_grad, finish):
        logp, lse, _ = logprob_sweep(inp, temperature, False)
        loss, stat_values, grad_logp = finish(logp)
        ctx.save_for_backward(hidden, weight, bias, lse, grad_logp)
        ctx.inp = inp._replace(hidden=None, weight=None, bias=None)
        ctx.temperature, ctx.fp32_weight_grad = temperature, fp32_weight_grad
        ctx.mark_non_differentiable(stat_values)
        return loss, stat_values

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        hidden, weight, bias, lse, grad_logp = ctx.saved_tensors
        inp: HeadInputs = ctx.inp._replace(hidden=hidden, weight=weight, bias=bias)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_h or need_w or need_b):
            return (None,) * 7
        grads = GradBuffers(inp, need_h, need_w, need_b and bias is not None, ctx.fp32_weight_grad)
        g = (grad_logp * grad_loss.to(grad_logp.dtype)).contiguous()
        gradient_sweep(inp, ctx.temperature, lse, None, g, None, grads)
        return grads.results(weight.dtype, bias.dtype if bias is not None else None) + (None,) * 4


def dpo_composite_loss(
    token_logp, keep, ref_logps, *, beta, loss_type, label_smoothing, gamma, length_normalized,
):
    """The composition `fused_dpo_loss` computes, on [2B, T] policy token log-probs
    (rows [0:B] chosen, [B:2B] rejected) and [2B] reference sequence log-probs (or None):
    ``dpo_loss`` of the per-sequence sums from ``sequence_logprobs``, with the valid-token
    counts as lengths when ``length_normalized``."""
    seq = sequence_logprobs(token_logp, keep, reduction="sum")
    pairs = seq.shape[0] // 2
    lengths = (None, None)
    if length_normalized:
        counts = keep.sum(-1) if keep is not None else torch.full(
            (2 * pairs,), token_logp.shape[-1], device=token_logp.device)
        lengths = (counts[:pairs], counts[pairs:])
    refs = (None, None) if ref_logps is None else (ref_logps[:pairs], ref_logps[pairs:])
    return dpo_loss(
        seq[:pairs], seq[pairs:], *refs, beta=beta, loss_type=loss_type,
        label_smoothing=label_smoothing, gamma=gamma,
        chosen_lengths=lengths[0], rejected_lengths=lengths[1],
    )


def _pair_chunks(sizes: tuple[int, ...] | None, budget: int):
    """Chunks of whole pairs, ``(start, stop, first_pair, end_pair)`` in pair-ordered rows,
    greedily as many pairs as fit `budget` rows; None when one pair alone does not fit."""
    if sizes is None or (sizes and max(sizes) > budget):
        return None
    chunks, start, first, size = [], 0, 0, 0
    for p, s in enumerate(sizes):
        if size + s > budget:
            chunks.append((start, start + size, first, p))
            start, first, size = start + size, p, 0
        size += s
    chunks.append((start, start + size, first, len(sizes)))
    return [c for c in chunks if c[1] > c[0]]  # pairs without kept tokens get no gradient


def _pair_ordered(inp: HeadInputs, targets, keep, pairs: int, seq_len: int):
    """`inp` with its kept rows reordered pair by pair (chosen_i's, then rejected_i's, each in
    position order), and the [n] segment id ``2 * pair + side`` of every processed row."""
    device = targets.device
    flat = torch.arange(inp.n_total, device=device)
    order = flat.view(2, pairs, seq_len).transpose(0, 1).reshape(-1)
    if keep is not None:
        dropped = (~keep.reshape(-1).index_select(0, order)).to(torch.uint8)
        order = order.index_select(0, torch.argsort(dropped, stable=True)[: inp.targets.shape[0]])
    segment = (flat // seq_len % pairs) * 2 + flat // (pairs * seq_len)
    ordered = inp._replace(rows=order, targets=targets.reshape(-1).index_select(0, order).contiguous())
    return ordered, segment.index_select(0, order)


@autocast_operands("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias")
def fused_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    ref_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    length_normalized: bool | None = None,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    fp32_weight_grad: bool = False,
):
    """DPO-family loss of a pair batch straight from hidden states, no logits stored.

    The batch holds both sides of B pairs: rows ``[0:B]`` are the chosen sequences and rows
    ``[B:2B]`` the rejected ones, pair i = (row i, row B + i). Equal to
    ``logp = linear_token_logprobs(hidden, weight, targets, bias, temperature, mask)`` then
    `dpo_composite_loss`: sequence log-probs (sums over valid tokens, `sequence_logprobs`)
    fed to `dpo_loss`.

    Args:
        hidden: ``[2B, T, H]``; weight ``[V, H]``; targets ``[2B, T]``; mask ``[2B, T]`` or
            None (prompt and padding False: only response tokens count).
        ref_logps: ``[2B]`` reference sequence log-probs in the same row order (constant).
        ref_hidden, ref_weight, ref_bias: instead of ``ref_logps``, the reference model's
            final hidden states ``[2B, T, H_ref]`` and lm_head ``[V, H_ref]`` (+ ``[V]``):
            its log-probs are computed here, without gradient, by the same chunked op.
            ``loss_type="simpo"`` takes no reference (any given is ignored, as `dpo_loss`).
        beta, loss_type, label_smoothing, gamma: as in `dpo_loss`.
        length_normalized: divide each sequence log-prob by its valid-token count (default:
            True for ``"simpo"``, False otherwise; ``"ipo"`` accepts either).
        temperature, bias, chunk_size, fp32_weight_grad: as in `linear_token_logprobs`.

    Returns:
        ``(loss, stats)`` as `dpo_loss`: 0-d loss differentiable w.r.t. hidden, weight and
        bias; stats ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
        ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``. Cost 6NHV FLOPs over
        the kept tokens when every pair's kept tokens (chosen + rejected) fit in one chunk
        (``chunk_size``, or the default budget): one sweep, gradients computed during forward
        and only scaled by backward. Otherwise (a pair longer than a chunk, or CUDA-graph
        capture with a mask) 8NHV: forward 2NHV, backward 6NHV. Extra memory one chunk of
        logits. B = 0 is an error; T = 0 (or an all-masked pair) makes sequence log-probs 0.
    """
    check_ndim("hidden", hidden, (3,), "[2B, T, H] (B chosen rows, then B rejected rows)")
    if hidden.shape[0] % 2 or hidden.shape[0] == 0:
        raise ValueError(
            f"hidden must hold at least one pair: 2B sequences, B >= 1 (B chosen, then B rejected), "
            f"got {hidden.shape[0]} rows"
        )
    pairs, seq_len = hidden.shape[0] // 2, hidden.shape[1]
    keep = as_mask("mask", mask, hidden.shape[:-1], hidden.device)
    inp, lead = prepare_head_inputs(
        hidden, weight, targets, bias=bias, mask=mask, temperature=temperature, chunk_size=chunk_size,
        # kept tokens per pair, read on the host with the compaction count (no extra sync)
        host_counts=None if keep is None else keep.reshape(2, pairs, seq_len).sum((0, 2)),
    )
    check_dpo_options(loss_type, beta, label_smoothing, gamma)
    if length_normalized is None:
        length_normalized = loss_type == "simpo"
    use_ref = loss_type != "simpo"
    if use_ref and (ref_logps is None) == (ref_hidden is None):
        raise ValueError(
            f"give exactly one of ref_logps or ref_hidden (with ref_weight) for "
            f"loss_type={loss_type!r}, got {'both' if ref_logps is not None else 'neither'}"
        )
    if use_ref and ref_hidden is not None:
        if ref_weight is None:
            raise ValueError("ref_weight must be the reference lm_head [V, H_ref] when ref_hidden is given, got None")
        ref_inp, _ = prepare_head_inputs(
            ref_hidden, ref_weight, targets, bias=ref_bias, mask=keep, temperature=temperature,
            chunk_size=chunk_size, names=("ref_hidden", "ref_weight", "targets", "ref_bias"),
        )
        with torch.no_grad():
            ref_tokens, _, _ = logprob_sweep(ref_inp, float(temperature), False)
            ref_logps = sequence_logprobs(from_rows(ref_inp, ref_tokens).view(lead), keep, reduction="sum")
    elif use_ref:
        check_floating("ref_logps", ref_logps)
        check_shape("ref_logps", ref_logps, lead[:1], "[2B]: chosen rows, then rejected rows")
    else:
        ref_logps = None
    acc = accumulation_dtype(hidden)

    # one sweep when rows are compacted (or need none) and every pair fits in a chunk
    sizes = inp.counts if keep is not None else (2 * seq_len,) * pairs
    chunks = None if inp.keep is not None else _pair_chunks(sizes, inp.plan.chunk)
    if chunks is not None:
        lengths = None
        if length_normalized:
            lengths = keep.sum(-1) if keep is not None else torch.full(lead[:1], lead[1], device=hidden.device)
        return _single_sweep_dpo(
            inp, targets, keep, lead, chunks, ref_logps, lengths,
            beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma,
            length_normalized=length_normalized, temperature=float(temperature),
            fp32_weight_grad=bool(fp32_weight_grad), weight=weight, bias=bias,
        )

    def finish(logp):
        token_logp = from_rows(inp, logp).view(lead).detach().requires_grad_()
        with torch.enable_grad():
            loss, stats = dpo_composite_loss(
                token_logp, keep, ref_logps, beta=beta, loss_type=loss_type,
                label_smoothing=label_smoothing, gamma=gamma, length_normalized=length_normalized,
            )
            (grad_logp,) = torch.autograd.grad(loss, token_logp)
        grad_rows = to_rows(inp, grad_logp.reshape(-1).to(acc))
        stat_values = torch.stack([stats[k].to(loss.dtype) for k in DPO_STAT_NAMES])
        return loss.detach(), stat_values, grad_rows

    loss, stat_values = _FusedDPO.apply(
        inp.hidden, weight, bias, inp, float(temperature), bool(fp32_weight_grad), finish,
    )
    return loss, dict(zip(DPO_STAT_NAMES, stat_values.unbind()))


def _single_sweep_dpo(inp, targets, keep, lead, chunks, ref_logps, lengths, *, beta, loss_type,
                      label_smoothing, gamma, length_normalized, temperature, fp32_weight_grad,
                      weight, bias):
    """`fused_dpo_loss` in one sweep over chunks of whole pairs (see the module docstring)."""
    pairs = lead[0] // 2
    inp, segment = _pair_ordered(inp, targets, keep, pairs, lead[1])
    acc = accumulation_dtype(inp.hidden)
    first_pair = {start: (p0, p1) for start, _, p0, p1 in chunks}
    triton_pairs = use_triton(inp.hidden) and acc == torch.float32
    if lengths is not None:
        lengths = lengths.to(torch.float32)
    smoothing = float(label_smoothing)
    no_ref = ref_logps is None

    def token_grad(start, stop, logp_c, _entropy_c):
        p0, p1 = first_pair[start]
        k = p1 - p0
        x = logp_c.detach().to(acc).requires_grad_()
        with torch.enable_grad():
            sums = x.new_zeros(2 * k).index_add(0, segment[start:stop] - 2 * p0, x).view(k, 2)
            side = (slice(p0, p1), slice(pairs + p0, pairs + p1))
            refs = (None, None) if no_ref else tuple(ref_logps[s].contiguous() for s in side)
            lens = (None, None) if lengths is None else tuple(lengths[s].contiguous() for s in side)
            # the pair loss `dpo_loss` applies, without its per-call validation (syncs): the
            # same inputs are validated once, by `dpo_loss` in `finish`
            losses = _DPOPairs.apply(
                sums[:, 0].contiguous(), sums[:, 1].contiguous(), *refs, *lens, loss_type,
                float(beta), float(gamma), smoothing, triton_pairs,
            )
            (g,) = torch.autograd.grad(losses.sum() / pairs, x)
        return g, None

    def finish(logp, _entropy):
        with torch.no_grad():
            loss, stats = dpo_composite_loss(
                from_rows(inp, logp).view(lead), keep, ref_logps, beta=beta, loss_type=loss_type,
                label_smoothing=label_smoothing, gamma=gamma, length_normalized=length_normalized,
            )
        return loss, torch.stack([stats[k].to(loss.dtype) for k in DPO_STAT_NAMES])

    loss, stat_values = _FusedSingleSweep.apply(
        inp.hidden, weight, bias, inp, temperature, False, token_grad, fp32_weight_grad, finish,
        [(start, stop) for start, stop, _, _ in chunks],
    )
    return loss, dict(zip(DPO_STAT_NAMES, stat_values.unbind()))
