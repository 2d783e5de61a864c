"""Preference losses over [B] pairs (DPO family, Bradley-Terry) and per-sequence log-prob sums.

DPO / Bradley-Terry: elementwise over pairs; forward writes each pair's loss (the caller takes
the mean), backward each input's gradient from the per-pair upstream gradient.
`preference_pair` is the closed form of one pair as a function of its log-ratio margin h
(the fused DPO head reuses it). Sequence log-probs: one program per sequence sums its valid
tokens in blocks; backward broadcasts the per-sequence gradient over the valid tokens.
All arithmetic is fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# constexpr codes of the DPO loss types, shared with the fused heads
DPO_LOSS_TYPES = {"sigmoid": 0, "ipo": 1, "hinge": 2, "robust": 3, "simpo": 4}

_BLOCK = 1024
_WARPS = 4


@triton.jit
def softplus(x):
    """log(1 + exp(x)) without overflow: max(x, 0) + log(1 + exp(-|x|))."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def stable_sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def preference_pair(h, beta, simpo_gamma, smoothing, LOSS_TYPE: tl.constexpr):
    """(loss, dloss/dh) of one pair from its margin h, fp32 tensors.

    sigmoid/simpo: z = beta*h - simpo_gamma, loss = (1-e)*softplus(-z) + e*softplus(z);
    robust: ((1-e)*softplus(-z) - e*softplus(z)) / (1 - 2e); ipo: (h - 1/(2 beta))^2;
    hinge: relu(1 - beta*h).
    """
    if LOSS_TYPE == 1:
        d = h - 0.5 / beta
        loss = d * d
        d_h = 2.0 * d
    elif LOSS_TYPE == 2:
        z = beta * h
        # NaN-propagating, as torch.relu: a NaN margin is never a zero loss
        loss = tl.maximum(1.0 - z, 0.0, propagate_nan=tl.PropagateNan.ALL)
        d_h = tl.where(z < 1.0, -beta, 0.0)
        d_h = tl.where(z != z, z, d_h)
    else:
        z = beta * h - simpo_gamma
        sig_neg = stable_sigmoid(-z)
        sig_pos = stable_sigmoid(z)
        if LOSS_TYPE == 3:
            inv = 1.0 / (1.0 - 2.0 * smoothing)
            loss = ((1.0 - smoothing) * softplus(-z) - smoothing * softplus(z)) * inv
            d_z = (-(1.0 - smoothing) * sig_neg - smoothing * sig_pos) * inv
        else:
            loss = (1.0 - smoothing) * softplus(-z) + smoothing * softplus(z)
            d_z = -(1.0 - smoothing) * sig_neg + smoothing * sig_pos
        d_h = beta * d_z
    return loss, d_h


@triton.jit
def _dpo_margin(pc_ptr, pr_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, offs, ok,
                HAS_REF: tl.constexpr, HAS_LEN: tl.constexpr):
    """h = a_c (pc - rc) - a_r (pr - rr) with a = 1/length (HAS_LEN) or 1."""
    chosen = tl.load(pc_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    rejected = tl.load(pr_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_REF:
        chosen -= tl.load(rc_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        rejected -= tl.load(rr_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    a_c = tl.full(chosen.shape, 1.0, tl.float32)
    a_r = tl.full(chosen.shape, 1.0, tl.float32)
    if HAS_LEN:
        a_c = 1.0 / tl.load(lc_ptr + offs, mask=ok, other=1.0).to(tl.float32)
        a_r = 1.0 / tl.load(lr_ptr + offs, mask=ok, other=1.0).to(tl.float32)
    return a_c * chosen - a_r * rejected, a_c, a_r


@triton.jit
def _dpo_fwd_kernel(
    pc_ptr, pr_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, loss_ptr, N, beta, simpo_gamma, smoothing,
    LOSS_TYPE: tl.constexpr, HAS_REF: tl.constexpr, HAS_LEN: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    h, _, _ = _dpo_margin(pc_ptr, pr_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, offs, ok, HAS_REF, HAS_LEN)
    loss, _ = preference_pair(h, beta, simpo_gamma, smoothing, LOSS_TYPE)
    tl.store(loss_ptr + offs, loss, mask=ok)


@triton.jit
def _dpo_bwd_kernel(
    pc_ptr, pr_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, g_ptr,
    d_pc_ptr, d_pr_ptr, d_rc_ptr, d_rr_ptr, N, beta, simpo_gamma, smoothing,
    LOSS_TYPE: tl.constexpr, HAS_REF: tl.constexpr, HAS_LEN: tl.constexpr,
    WANT_POLICY: tl.constexpr, WANT_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    h, a_c, a_r = _dpo_margin(pc_ptr, pr_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, offs, ok, HAS_REF, HAS_LEN)
    _, d_h = preference_pair(h, beta, simpo_gamma, smoothing, LOSS_TYPE)
    d_h = d_h * tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    d_c = d_h * a_c
    d_r = -d_h * a_r
    if WANT_POLICY:
        tl.store(d_pc_ptr + offs, d_c.to(d_pc_ptr.dtype.element_ty), mask=ok)
        tl.store(d_pr_ptr + offs, d_r.to(d_pr_ptr.dtype.element_ty), mask=ok)
    if WANT_REF:
        tl.store(d_rc_ptr + offs, (-d_c).to(d_rc_ptr.dtype.element_ty), mask=ok)
        tl.store(d_rr_ptr + offs, (-d_r).to(d_rr_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bt_terms(rc_ptr, rr_ptr, m_ptr, offs, ok, margin, HAS_MARGIN_TENSOR: tl.constexpr):
    rc = tl.load(rc_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    rr = tl.load(rr_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = margin
    if HAS_MARGIN_TENSOR:
        m = tl.load(m_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    return rc - rr - m, rc + rr


@triton.jit
def _bt_fwd_kernel(
    rc_ptr, rr_ptr, m_ptr, loss_ptr, N, margin, center,
    HAS_MARGIN_TENSOR: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    d, s = _bt_terms(rc_ptr, rr_ptr, m_ptr, offs, ok, margin, HAS_MARGIN_TENSOR)
    tl.store(loss_ptr + offs, softplus(-d) + center * s * s, mask=ok)


@triton.jit
def _bt_bwd_kernel(
    rc_ptr, rr_ptr, m_ptr, g_ptr, d_rc_ptr, d_rr_ptr, N, margin, center,
    HAS_MARGIN_TENSOR: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    d, s = _bt_terms(rc_ptr, rr_ptr, m_ptr, offs, ok, margin, HAS_MARGIN_TENSOR)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    sig_neg = stable_sigmoid(-d)
    center_term = 2.0 * center * s
    tl.store(d_rc_ptr + offs, (g * (center_term - sig_neg)).to(d_rc_ptr.dtype.element_ty), mask=ok)
    tl.store(d_rr_ptr + offs, (g * (center_term + sig_neg)).to(d_rr_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _seq_fwd_kernel(
    x_ptr, x_stride, keep_ptr, keep_stride, out_ptr, count_ptr, T,
    MEAN: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    total = 0.0
    count = 0.0
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        keep = cols < T
        if HAS_MASK:
            keep = keep & (tl.load(keep_ptr + row * keep_stride + cols, mask=cols < T, other=0) != 0)
        total += tl.sum(tl.load(x_ptr + row * x_stride + cols, mask=keep, other=0.0).to(tl.float32), 0)
        count += tl.sum(keep.to(tl.float32), 0)
    if MEAN:
        total = total / tl.maximum(count, 1.0)
    tl.store(out_ptr + row, total)
    tl.store(count_ptr + row, count)


@triton.jit
def _seq_bwd_kernel(
    keep_ptr, keep_stride, count_ptr, g_ptr, grad_ptr, T,
    MEAN: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    keep = cols < T
    if HAS_MASK:
        keep = keep & (tl.load(keep_ptr + row * keep_stride + cols, mask=cols < T, other=0) != 0)
    g = tl.load(g_ptr + row).to(tl.float32)
    if MEAN:
        g = g / tl.maximum(tl.load(count_ptr + row), 1.0)
    tl.store(grad_ptr + row * T + cols, tl.where(keep, g, 0.0).to(grad_ptr.dtype.element_ty), mask=cols < T)


# ---------------------------------------------------------------- launchers


def dpo_forward(pc, pr, rc, rr, lc, lr, loss_type: int, beta: float, simpo_gamma: float, smoothing: float):
    """Pairs [B] (contiguous; rc/rr and lc/lr may be None) -> per-pair losses [B] fp32."""
    n = pc.numel()
    out = torch.empty(n, device=pc.device, dtype=torch.float32)
    if n:
        _dpo_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
            pc, pr, rc if rc is not None else pc, rr if rr is not None else pr,
            lc if lc is not None else pc, lr if lr is not None else pr, out, n, beta, simpo_gamma, smoothing,
            LOSS_TYPE=loss_type, HAS_REF=rc is not None, HAS_LEN=lc is not None,
            BLOCK=_BLOCK, num_warps=_WARPS,
        )
    return out


def dpo_backward(pc, pr, rc, rr, lc, lr, loss_type: int, beta: float, simpo_gamma: float, smoothing: float,
                 grad, want_policy: bool, want_ref: bool):
    """Per-pair upstream gradient [B] -> (d pc, d pr, d rc, d rr), None where not wanted."""
    n = pc.numel()
    d_pc = torch.empty_like(pc) if want_policy else None
    d_pr = torch.empty_like(pr) if want_policy else None
    want_ref = want_ref and rc is not None
    d_rc = torch.empty_like(rc) if want_ref else None
    d_rr = torch.empty_like(rr) if want_ref else None
    if n and (want_policy or want_ref):
        _dpo_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
            pc, pr, rc if rc is not None else pc, rr if rr is not None else pr,
            lc if lc is not None else pc, lr if lr is not None else pr, grad,
            d_pc if want_policy else grad, d_pr if want_policy else grad,
            d_rc if want_ref else grad, d_rr if want_ref else grad,
            n, beta, simpo_gamma, smoothing,
            LOSS_TYPE=loss_type, HAS_REF=rc is not None, HAS_LEN=lc is not None,
            WANT_POLICY=want_policy, WANT_REF=want_ref, BLOCK=_BLOCK, num_warps=_WARPS,
        )
    return d_pc, d_pr, d_rc, d_rr


def bradley_terry_forward(r_chosen, r_rejected, margin_t, margin: float, center: float):
    """Pairs [B] contiguous (margin_t [B] or None) -> per-pair losses [B] fp32."""
    n = r_chosen.numel()
    out = torch.empty(n, device=r_chosen.device, dtype=torch.float32)
    if n:
        _bt_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
            r_chosen, r_rejected, margin_t if margin_t is not None else r_chosen, out, n, margin, center,
            HAS_MARGIN_TENSOR=margin_t is not None, BLOCK=_BLOCK, num_warps=_WARPS,
        )
    return out


def bradley_terry_backward(r_chosen, r_rejected, margin_t, margin: float, center: float, grad):
    """Per-pair upstream gradient [B] -> (d r_chosen, d r_rejected)."""
    n = r_chosen.numel()
    d_rc = torch.empty_like(r_chosen)
    d_rr = torch.empty_like(r_rejected)
    if n:
        _bt_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
            r_chosen, r_rejected, margin_t if margin_t is not None else r_chosen, grad, d_rc, d_rr,
            n, margin, center, HAS_MARGIN_TENSOR=margin_t is not None, BLOCK=_BLOCK, num_warps=_WARPS,
        )
    return d_rc, d_rr


def _seq_block(t: int) -> int:
    return min(triton.next_power_of_2(max(t, 1)), 1024)


def sequence_logprobs_forward(token_logp, keep, mean: bool):
    """token_logp [B, T] (unit inner stride), keep [B, T] bool or None.

    Returns (per-sequence sum or mean [B] fp32, valid counts [B] fp32).
    """
    b, t = token_logp.shape
    out = torch.zeros(b, device=token_logp.device, dtype=torch.float32)
    count = torch.zeros_like(out)
    if b and t:
        _seq_fwd_kernel[(b,)](
            token_logp, token_logp.stride(0), keep if keep is not None else token_logp,
            keep.stride(0) if keep is not None else 0, out, count, t,
            MEAN=mean, HAS_MASK=keep is not None, BLOCK_T=_seq_block(t), num_warps=_WARPS,
        )
    return out, count


def sequence_logprobs_backward(keep, count, grad, shape, dtype, mean: bool):
    """Per-sequence gradient [B] -> d token_logp [B, T] in `dtype`, 0 where masked."""
    b, t = shape
    grad_x = torch.empty((b, t), device=grad.device, dtype=dtype)
    if b and t:
        block = _seq_block(t)
        _seq_bwd_kernel[(b, triton.cdiv(t, block))](
            keep if keep is not None else grad, keep.stride(0) if keep is not None else 0,
            count, grad, grad_x, t,
            MEAN=mean, HAS_MASK=keep is not None, BLOCK_T=block, num_warps=_WARPS,
        )
    return grad_x
