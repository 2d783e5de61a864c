"""sequence_logprobs: per-sequence sum or mean of per-token log-probs over the valid tokens.

Public function -> autograd.Function -> Triton launchers (`rftengine.kernels.preference`) on
CUDA or the torch references below elsewhere. This is the bridge from `token_logprobs` to the
[B] inputs of `dpo_loss`.
"""

from __future__ import annotations

import torch

from rftengine.ops._checks import as_mask, check_choice, check_floating, check_ndim, check_same_device
from rftengine.ops._deprecation import deprecated_call_forms
from rftengine.ops._dispatch import use_triton
from rftengine.ops._precision import accumulation_dtype
from rftengine.ops.logprobs import rows_view

REDUCTIONS = ("sum", "mean")


def sequence_logprobs_forward_reference(token_logp, keep, mean: bool):
    """Torch twin of the kernel: (sum or mean over valid tokens [B], valid counts [B])."""
    acc = accumulation_dtype(token_logp)
    x = token_logp.to(acc)
    if keep is None:
        count = torch.full(x.shape[:1], float(x.shape[1]), dtype=acc, device=x.device)
    else:
        x = torch.where(keep, x, torch.zeros((), dtype=acc, device=x.device))
        count = keep.to(acc).sum(-1)
    total = x.sum(-1)
    return (total / count.clamp(min=1.0) if mean else total), count


def sequence_logprobs_backward_reference(keep, count, grad, shape, dtype, mean: bool):
    g = grad.to(count.dtype)
    if mean:
        g = g / count.clamp(min=1.0)
    out = g.unsqueeze(-1).expand(shape)
    if keep is not None:
        out = torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.to(dtype).contiguous()


def _implementation(triton_path: bool):
    if triton_path:
        from rftengine.kernels import preference as kernel

        return kernel.sequence_logprobs_forward, kernel.sequence_logprobs_backward
    return sequence_logprobs_forward_reference, sequence_logprobs_backward_reference


class _SequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_logp, keep, mean, triton_path):
        forward_impl, _ = _implementation(triton_path)
        out, count = forward_impl(token_logp, keep, mean)
        ctx.save_for_backward(keep, count)
        ctx.shape, ctx.dtype = tuple(token_logp.shape), token_logp.dtype
        ctx.mean, ctx.triton_path = mean, triton_path
        return out

    @staticmethod
    def backward(ctx, grad):
        keep, count = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        _, backward_impl = _implementation(ctx.triton_path)
        return backward_impl(keep, count, grad.contiguous(), ctx.shape, ctx.dtype, ctx.mean), None, None, None


@deprecated_call_forms(positional=("mask",))
def sequence_logprobs(
    token_logp: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Log-prob of each whole sequence from its per-token log-probs.

    ``sum``: ``Σ_t m_t·logp_t`` (the sequence log-likelihood, DPO);
    ``mean``: that sum over ``max(Σ_t m_t, 1)`` (length-normalised, IPO/SimPO-style).

    Args:
        token_logp: ``[B, T]`` float per-token log-probs (e.g. from ``token_logprobs``).
        mask: ``[B, T]`` bool or 0/1 (True = token counts) or None. Masked positions are not
            read (padding may hold -inf) and get zero gradient.
        reduction: ``"sum"`` or ``"mean"``.

    Returns:
        ``[B]`` float32 (float64 for float64 input); a sequence without valid tokens (all
        masked, or T = 0) gives 0.
        Differentiable w.r.t. ``token_logp``.
    """
    check_floating("token_logp", token_logp)
    check_ndim("token_logp", token_logp, (2,), "[B, T]")
    device = check_same_device(token_logp=token_logp, mask=mask)
    keep = as_mask("mask", mask, token_logp.shape, device)
    check_choice("reduction", reduction, REDUCTIONS)
    triton_path = use_triton(token_logp) and accumulation_dtype(token_logp) == torch.float32
    return _SequenceLogprobs.apply(
        rows_view(token_logp), keep.contiguous() if keep is not None else None,
        reduction == "mean", triton_path,
    )
