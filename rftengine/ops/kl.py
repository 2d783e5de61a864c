"""kl_penalty: the per-token KL estimate between the policy and a reference policy.

Public function -> autograd.Function -> Triton launchers (`rftengine.kernels.kl`) on CUDA, or
the closed-form torch references below elsewhere. `kl_token_reference` is the same per-token
math the kernels use (`rftengine.kernels.kl.kl_token`), importable by fused losses.
"""

from __future__ import annotations

import torch

from rftengine.ops._checks import (
    as_mask,
    check_choice,
    check_floating,
    check_positive,
    check_same_device,
    check_shape,
)
from rftengine.ops._deprecation import required_with_old_default
from rftengine.ops._dispatch import use_triton
from rftengine.ops._precision import accumulation_dtype

KL_ESTIMATORS = ("k1", "k2", "k3")



def kl_token_reference(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: float):
    """Closed form of one token's KL estimate: ``(kl, dkl/dlogp)``; ``dkl/dref_logp = -dkl/dlogp``.

    With ``r = ref_logp - logp``: k1 = -r; k2 = r^2/2; k3 = exp(rc) - rc - 1 with
    ``rc = clamp(r, -clamp, clamp)`` (derivative 0 where r is outside the clamp range).
    Inputs are used in their own dtype; pass fp32/fp64.
    """
    r = ref_logp - logp
    if estimator == "k1":
        return -r, torch.ones_like(r)
    if estimator == "k2":
        return 0.5 * r * r, -r
    rc = r.clamp(-clamp, clamp)
    e = torch.exp(rc)
    inside = (r >= -clamp) & (r <= clamp) | torch.isnan(r)  # a NaN r keeps a NaN derivative
    return e - rc - 1.0, torch.where(inside, 1.0 - e, torch.zeros_like(e))


def _kept(t: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype` with masked entries replaced by 0 (padding may hold -inf)."""
    t = t.to(dtype)
    return t if keep is None else torch.where(keep, t, torch.zeros((), dtype=dtype, device=t.device))


def kl_forward_reference(logp, ref_logp, keep, estimator: str, clamp: float) -> torch.Tensor:
    """Torch twin of the forward kernel: flat inputs -> kl, 0 at masked tokens."""
    acc = accumulation_dtype(logp, ref_logp)
    kl, _ = kl_token_reference(_kept(logp, keep, acc), _kept(ref_logp, keep, acc), estimator, clamp)
    return kl if keep is None else kl.masked_fill(~keep, 0)


def kl_backward_reference(logp, ref_logp, keep, estimator: str, clamp: float, grad, want_logp, want_ref):
    """Torch twin of the backward kernel: (d logp or None, d ref_logp or None)."""
    acc = accumulation_dtype(logp, ref_logp)
    _, d = kl_token_reference(_kept(logp, keep, acc), _kept(ref_logp, keep, acc), estimator, clamp)
    d = d * grad.to(acc)
    if keep is not None:
        d = d.masked_fill(~keep, 0)
    return (
        d.to(logp.dtype) if want_logp else None,
        (-d).to(ref_logp.dtype) if want_ref else None,
    )


def _implementation(triton_path: bool):
    if triton_path:
        from rftengine.kernels import kl as kernel

        code = kernel.KL_ESTIMATORS
        return (
            lambda lp, rf, k, est, c: kernel.kl_forward(lp, rf, k, code[est], c),
            lambda lp, rf, k, est, c, g, wl, wr: kernel.kl_backward(lp, rf, k, code[est], c, g, wl, wr),
        )
    return kl_forward_reference, kl_backward_reference


class _KLPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, keep, estimator, clamp, triton_path):
        forward_impl, _ = _implementation(triton_path)
        kl = forward_impl(logp, ref_logp, keep, estimator, clamp)
        ctx.save_for_backward(logp, ref_logp, keep)
        ctx.estimator, ctx.clamp, ctx.triton_path = estimator, clamp, triton_path
        return kl

    @staticmethod
    def backward(ctx, grad):
        logp, ref_logp, keep = ctx.saved_tensors
        want_logp, want_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_logp or want_ref):
            return None, None, None, None, None, None
        _, backward_impl = _implementation(ctx.triton_path)
        grad_logp, grad_ref = backward_impl(
            logp, ref_logp, keep, ctx.estimator, ctx.clamp, grad.contiguous(), want_logp, want_ref
        )
        return grad_logp, grad_ref, None, None, None, None


def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    *,
    estimator: str | None = None,
    mask: torch.Tensor | None = None,
    clamp: float = 20.0,
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of the sampled tokens.

    With ``r = ref_logp - logp`` (Schulman, "Approximating KL divergence", 2020):

    - ``k1 = -r``: unbiased, can be negative;
    - ``k2 = r^2 / 2``: biased, non-negative, low variance;
    - ``k3 = exp(r) - r - 1``: unbiased, non-negative; r is clamped to ``[-clamp, clamp]``
      before exp so a huge gap stays finite (where clamped, its gradient is 0).

    Args:
        logp: ``[..., T]`` float16/bfloat16/float32/float64 policy log-probs.
        ref_logp: ``[..., T]`` reference log-probs, same shape (any floating dtype).
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``; required (see `docs/conventions.md`,
            "KL estimators", for which to pick). Leaving it out still gives ``"k1"`` for one
            release, with a DeprecationWarning.
        mask: optional ``[..., T]`` bool or 0/1; masked positions are not read, return 0
            and get zero gradient.
        clamp: > 0 bound on |r| for k3 (``math.inf`` disables it).

    Returns:
        ``kl`` ``[..., T]`` float32 (float64 when an input is float64), differentiable
        w.r.t. ``logp`` and ``ref_logp``. Triton kernel on CUDA, torch elsewhere.
    """
    check_floating("logp", logp)
    check_floating("ref_logp", ref_logp)
    check_shape("ref_logp", ref_logp, logp.shape, "logp.shape")
    device = check_same_device(logp=logp, ref_logp=ref_logp, mask=mask)
    estimator = required_with_old_default("kl_penalty", "estimator", estimator, "k1")
    check_choice("estimator", estimator, KL_ESTIMATORS)
    check_positive("clamp", clamp, allow_inf=True)
    keep = as_mask("mask", mask, logp.shape, device)

    triton_path = use_triton(logp, ref_logp) and accumulation_dtype(logp, ref_logp) == torch.float32
    kl = _KLPenalty.apply(
        # reshape(-1) of a strided 1-D view is that view: the kernel needs unit stride
        logp.reshape(-1).contiguous(), ref_logp.reshape(-1).contiguous(),
        keep.reshape(-1).contiguous() if keep is not None else None,
        estimator, float(clamp), triton_path,
    )
    return kl.view(logp.shape)
