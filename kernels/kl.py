"""Per-token KL estimate between the policy and a reference, elementwise over N tokens.

With r = ref_logp - logp: k1 = -r, k2 = r^2 / 2, k3 = exp(r) - r - 1 (r clamped first).
Forward writes the estimate; backward writes d/dlogp and d/dref_logp (= -d/dlogp).
`kl_token` is the closed form both kernels share; the fused heads call it too.
All arithmetic is fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# constexpr codes of the estimators, shared with the fused heads
KL_ESTIMATORS = {"k1": 0, "k2": 1, "k3": 2}

# one block of 1024 tokens per program: 8 fp32 values per thread at 4 warps
_BLOCK = 1024
_WARPS = 4


@triton.jit
def kl_token(logp, ref_logp, clamp, ESTIMATOR: tl.constexpr):
    """(kl, dkl/dlogp) for fp32 tensors; dkl/dref_logp is -dkl/dlogp.

    k3 clamps r to [-clamp, clamp] before exp; outside that range its derivative is 0,
    as for torch.clamp.
    """
    r = ref_logp - logp
    if ESTIMATOR == 0:
        kl = -r
        d_logp = tl.full(r.shape, 1.0, tl.float32)
    elif ESTIMATOR == 1:
        kl = 0.5 * r * r
        d_logp = -r
    else:
        # NaN-propagating clamp (GPU min/max drop NaN); a NaN r keeps a NaN derivative
        rc = tl.clamp(r, -clamp, clamp, propagate_nan=tl.PropagateNan.ALL)
        e = tl.exp(rc)
        kl = e - rc - 1.0
        d_logp = tl.where(((r >= -clamp) & (r <= clamp)) | (r != r), 1.0 - e, 0.0)
    return kl, d_logp


@triton.jit
def _kl_fwd_kernel(
    logp_ptr, ref_ptr, keep_ptr, out_ptr, N, clamp,
    ESTIMATOR: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < N
    if HAS_MASK:
        keep = keep & (tl.load(keep_ptr + offs, mask=offs < N, other=0) != 0)
    # masked tokens are not read: padding may hold -inf log-probs
    logp = tl.load(logp_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    kl, _ = kl_token(logp, ref, clamp, ESTIMATOR)
    tl.store(out_ptr + offs, tl.where(keep, kl, 0.0), mask=offs < N)


@triton.jit
def _kl_bwd_kernel(
    logp_ptr, ref_ptr, keep_ptr, grad_ptr, grad_logp_ptr, grad_ref_ptr, N, clamp,
    ESTIMATOR: tl.constexpr, HAS_MASK: tl.constexpr,
    WANT_LOGP: tl.constexpr, WANT_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < N
    keep = in_range
    if HAS_MASK:
        keep = keep & (tl.load(keep_ptr + offs, mask=in_range, other=0) != 0)
    logp = tl.load(logp_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    _, d_logp = kl_token(logp, ref, clamp, ESTIMATOR)
    d_logp = tl.where(keep, g * d_logp, 0.0)
    if WANT_LOGP:
        tl.store(grad_logp_ptr + offs, d_logp.to(grad_logp_ptr.dtype.element_ty), mask=in_range)
    if WANT_REF:
        tl.store(grad_ref_ptr + offs, (-d_logp).to(grad_ref_ptr.dtype.element_ty), mask=in_range)


def kl_forward(
    logp: torch.Tensor, ref_logp: torch.Tensor, keep: torch.Tensor | None,
    estimator: int, clamp: float,
) -> torch.Tensor:
    """logp, ref_logp [N] contiguous, keep [N] bool or None -> kl [N] fp32 (0 where masked)."""
    n = logp.numel()
    out = torch.empty(n, device=logp.device, dtype=torch.float32)
    if n == 0:
        return out
    _kl_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
        logp, ref_logp, keep if keep is not None else logp, out, n, clamp,
        ESTIMATOR=estimator, HAS_MASK=keep is not None, BLOCK=_BLOCK, num_warps=_WARPS,
    )
    return out


def kl_backward(
    logp: torch.Tensor, ref_logp: torch.Tensor, keep: torch.Tensor | None,
    estimator: int, clamp: float, grad: torch.Tensor, want_logp: bool, want_ref: bool,
):
    """Gradients of sum(grad * kl): (d logp [N] in logp's dtype or None, d ref [N] or None)."""
    n = logp.numel()
    grad_logp = torch.empty_like(logp) if want_logp else None
    grad_ref = torch.empty_like(ref_logp) if want_ref else None
    if n == 0 or not (want_logp or want_ref):
        return grad_logp, grad_ref
    _kl_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
        logp, ref_logp, keep if keep is not None else logp, grad,
        grad_logp if want_logp else grad, grad_ref if want_ref else grad, n, clamp,
        ESTIMATOR=estimator, HAS_MASK=keep is not None,
        WANT_LOGP=want_logp, WANT_REF=want_ref, BLOCK=_BLOCK, num_warps=_WARPS,
    )
    return grad_logp, grad_ref
