"""fused_dpo_loss: lm_head + log-probs + DPO-family loss of a pair batch, no logits stored.

The head is defined as a composition of the standalone ops (`dpo_composite_loss`:
`sequence_logprobs` then `dpo_loss`) and returns exactly what that composition returns; the
fusion only changes how the lm_head part is swept (`rftengine.ops._lm_head_chunks`).

A pair's gradient depends on its whole-sequence log-probs. The kept rows are ordered pair by
pair (chosen_i's, then rejected_i's) and chunks are cut only at pair boundaries, as many
whole pairs as fit the plan's chunk budget; each chunk then holds the sequence sums of its
pairs, so ONE sweep computes the per-pair loss derivative (the standalone pair loss under
autograd, scaled by pairs-in-chunk / B), dlogits and the dh/dW/db matmuls: 6NHV. When one
pair has more kept tokens than the chunk budget (or rows cannot be compacted, under
CUDA-graph capture with a mask) it falls back to two sweeps: forward sweeps the log-probs
(2NHV) and takes dloss/dlogp from `sequence_logprobs` + `dpo_loss` under autograd on the
small [2B, T] tensor; backward recomputes each chunk's logits and writes dh/dW/db (6NHV):
8NHV, the cost of `linear_token_logprobs`.
"""

from __future__ import annotations

import torch

from rftengine.ops._checks import as_mask, check_floating, check_ndim, check_shape
from rftengine.ops._deprecation import deprecated_call_forms
from rftengine.ops._dispatch import use_triton
from rftengine.ops._lm_head_chunks import (
    GradBuffers,
    HeadInputs,
    FusedSingleSweep,
    from_rows,
    gradient_sweep,
    logprob_sweep,
    prepare_head_inputs,
    to_rows,
)
from rftengine.ops._precision import accumulation_dtype, autocast_operands
from rftengine.ops.preference import _DPOPairs, check_dpo_options, dpo_loss
from rftengine.ops.sequence import sequence_logprobs

DPO_STAT_NAMES = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected",
)


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
    token_logp, keep, ref_logps, *, beta, loss_type, label_smoothing, simpo_gamma, length_normalized,
):
    """The composition `fused_dpo_loss` computes, on [2B, T] policy token log-probs
    (rows [0:B] chosen, [B:2B] rejected) and [2B] reference sequence log-probs (or None):
    ``dpo_loss`` of the per-sequence sums from ``sequence_logprobs``, with the valid-token
    counts as lengths when ``length_normalized``."""
    seq = sequence_logprobs(token_logp, mask=keep, reduction="sum")
    pairs = seq.shape[0] // 2
    lengths = (None, None)
    if length_normalized:
        counts = keep.sum(-1) if keep is not None else torch.full(
            (2 * pairs,), token_logp.shape[-1], device=token_logp.device)
        lengths = (counts[:pairs], counts[pairs:])
    refs = (None, None) if ref_logps is None else (ref_logps[:pairs], ref_logps[pairs:])
    return dpo_loss(
        seq[:pairs], seq[pairs:], *refs, beta=beta, loss_type=loss_type,
        label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
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


@deprecated_call_forms(positional=("mask",), renamed={"gamma": "simpo_gamma"})
@autocast_operands("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias")
def fused_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
    length_normalized: bool | None = None,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    fp32_weight_grad: bool = False,
):
    """DPO-family loss of a pair batch straight from hidden states, no logits stored.

    The batch holds both sides of B pairs: rows ``[0:B]`` are the chosen sequences and rows
    ``[B:2B]`` the rejected ones, pair i = (row i, row B + i). Equal to
    ``logp = linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
    mask=mask)`` then
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
        beta, loss_type, label_smoothing, simpo_gamma: as in `dpo_loss` (``gamma``: deprecated
            name of ``simpo_gamma``).
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
    check_dpo_options(loss_type, beta, label_smoothing, simpo_gamma)
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
            ref_logps = sequence_logprobs(from_rows(ref_inp, ref_tokens).view(lead), mask=keep, reduction="sum")
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
            beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
            length_normalized=length_normalized, temperature=float(temperature),
            fp32_weight_grad=bool(fp32_weight_grad), weight=weight, bias=bias,
        )

    def finish(logp):
        token_logp = from_rows(inp, logp).view(lead).detach().requires_grad_()
        with torch.enable_grad():
            loss, stats = dpo_composite_loss(
                token_logp, keep, ref_logps, beta=beta, loss_type=loss_type,
                label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, length_normalized=length_normalized,
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
                      label_smoothing, simpo_gamma, length_normalized, temperature, fp32_weight_grad,
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
                float(beta), float(simpo_gamma), smoothing, triton_pairs,
            )
            (g,) = torch.autograd.grad(losses.sum() / pairs, x)
        return g, None

    def finish(logp, _entropy):
        with torch.no_grad():
            loss, stats = dpo_composite_loss(
                from_rows(inp, logp).view(lead), keep, ref_logps, beta=beta, loss_type=loss_type,
                label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, length_normalized=length_normalized,
            )
        return loss, torch.stack([stats[k].to(loss.dtype) for k in DPO_STAT_NAMES])

    loss, stat_values = FusedSingleSweep.apply(
        inp.hidden, weight, bias, inp, temperature, False, token_grad, fp32_weight_grad, finish,
        [(start, stop) for start, stop, _, _ in chunks],
    )
    return loss, dict(zip(DPO_STAT_NAMES, stat_values.unbind()))
