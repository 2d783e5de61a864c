"""PPO clipped policy loss and clipped value loss over [B, T] tokens.

Grid (B, cdiv(T, BLOCK_T)): each program reads one block of one sequence once and writes
a few fp32 partial sums (loss, valid count, clip counts, KL, ratio) to `partials[K, B, NB]`;
the caller reduces those [B, NB] arrays into the loss and the per-sequence weights of the
chosen aggregation. Backward reads the same inputs once more and writes
d loss / d logp = grad * row_scale[b] * is_weight * dloss_t/dlogp.
`ppo_token` and `value_token` are the closed forms both directions share (and fused heads
reuse). All arithmetic is fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# rows of `partials` written by the policy forward kernel, in this order; "clipped_low" counts
# the clipped tokens with A < 0 (ratio below 1 - clip_low): the high side is clipped - clipped_low
PPO_PARTIALS = ("loss", "count", "clipped", "clipped_low", "dual_clipped", "approx_kl", "ratio", "ratio_max")
# rows written by the value forward kernel
VALUE_PARTIALS = ("loss", "count", "clipped", "values", "returns")


def _block_t(t: int) -> tuple[int, int]:
    # up to 1024 tokens a program (8 a thread at 4 warps); short rows use one small block
    block = min(triton.next_power_of_2(max(t, 1)), 1024)
    return block, 4


@triton.jit
def ppo_token(
    log_ratio, adv, clip_low, clip_high, dual_clip, log_ratio_clamp, HAS_DUAL: tl.constexpr,
):
    """One token of the clipped PPO objective, fp32 tensors in and out.

    Returns (loss, dloss/dlogp, clipped, dual_clipped, ratio, approx_kl) where
    ratio = exp(clamp(log_ratio)), loss = max(-A*ratio, -A*clip(ratio, 1-lo, 1+hi)),
    and with HAS_DUAL, for A < 0, loss = min(loss, -A*dual_clip).
    `clipped`/`dual_clipped` are 0/1 floats: the clip (dual clip) set the loss and cut its
    gradient. approx_kl = ratio - 1 - log(ratio), the k3 estimate of KL(old || new).
    """
    # PropagateNan.ALL: GPU min/max drop a NaN operand, which would turn a NaN log-prob into
    # a finite loss; torch.clamp/maximum (the reference) propagate it
    lr = tl.clamp(log_ratio, -log_ratio_clamp, log_ratio_clamp, propagate_nan=tl.PropagateNan.ALL)
    ratio = tl.exp(lr)
    unclipped = -adv * ratio
    clipped = -adv * tl.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high, propagate_nan=tl.PropagateNan.ALL)
    loss = tl.maximum(unclipped, clipped, propagate_nan=tl.PropagateNan.ALL)
    live = (unclipped >= clipped) & (log_ratio >= -log_ratio_clamp) & (log_ratio <= log_ratio_clamp)
    d_logp = tl.where(live, unclipped, 0.0)  # d(-A*exp(lr))/dlogp = -A*ratio
    d_logp = tl.where(log_ratio != log_ratio, log_ratio, d_logp)  # a NaN token gets a NaN gradient
    is_clipped = tl.where(clipped > unclipped, 1.0, 0.0)
    is_dual = tl.zeros_like(loss)
    if HAS_DUAL:
        cap = -adv * dual_clip
        capped = (adv < 0) & (loss > cap)
        loss = tl.where(capped, cap, loss)
        d_logp = tl.where(capped, 0.0, d_logp)
        is_dual = tl.where(capped, 1.0, 0.0)
    approx_kl = ratio - 1.0 - lr
    return loss, d_logp, is_clipped, is_dual, ratio, approx_kl


@triton.jit
def value_token(values, old_values, returns, clip, HAS_CLIP: tl.constexpr):
    """One token of the clipped value loss: (loss, dloss/dvalues, clipped 0/1).

    loss = 0.5 * max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2).
    """
    err = values - returns
    loss = 0.5 * err * err
    d_values = err
    is_clipped = tl.zeros_like(loss)
    if HAS_CLIP:
        # NaN-propagating (see ppo_token): a NaN old value makes the loss and gradient NaN
        v_clip = tl.minimum(
            tl.maximum(values, old_values - clip, propagate_nan=tl.PropagateNan.ALL),
            old_values + clip, propagate_nan=tl.PropagateNan.ALL,
        )
        err_clip = v_clip - returns
        loss_clip = 0.5 * err_clip * err_clip
        take_clip = loss_clip > loss
        loss = tl.maximum(loss, loss_clip, propagate_nan=tl.PropagateNan.ALL)
        # the clipped branch wins only when V is outside the clip range: zero gradient
        d_values = tl.where(take_clip, 0.0, d_values)
        d_values = tl.where(loss_clip != loss_clip, loss_clip, d_values)
        is_clipped = tl.where(take_clip, 1.0, 0.0)
    return loss, d_values, is_clipped


@triton.jit
def _max_keep_nan(a, b):
    # tl.max drops NaN like GPU fmaxf; torch.amax (the reference) keeps it
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_block(pid_b, pid_t, T, keep_ptr, keep_stride, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    cols = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    keep = cols < T
    if HAS_MASK:
        keep = keep & (tl.load(keep_ptr + pid_b * keep_stride + cols, mask=cols < T, other=0) != 0)
    return cols, keep


@triton.jit
def _ppo_row_block(
    logp_ptr, logp_stride, old_ptr, old_stride, adv_ptr, adv_stride, keep_ptr, keep_stride, T,
    ADV_PER_SEQ: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """This program's block of one row: (row, cols, keep, logp, old_logp, advantages), fp32."""
    pid_b = tl.program_id(0).to(tl.int64)
    cols, keep = _row_block(pid_b, tl.program_id(1), T, keep_ptr, keep_stride, HAS_MASK, BLOCK_T)
    logp = tl.load(logp_ptr + pid_b * logp_stride + cols, mask=keep, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + pid_b * old_stride + cols, mask=keep, other=0.0).to(tl.float32)
    if ADV_PER_SEQ:
        adv = tl.load(adv_ptr + pid_b).to(tl.float32) + tl.zeros([BLOCK_T], tl.float32)
    else:
        adv = tl.load(adv_ptr + pid_b * adv_stride + cols, mask=keep, other=0.0).to(tl.float32)
    return pid_b, cols, keep, logp, old, adv


@triton.jit
def _ppo_fwd_kernel(
    logp_ptr, logp_stride, old_ptr, old_stride, adv_ptr, adv_stride, keep_ptr, keep_stride,
    isw_ptr, isw_stride, partials_ptr, T, n_prog,
    clip_low, clip_high, dual_clip, log_ratio_clamp,
    ADV_PER_SEQ: tl.constexpr, HAS_MASK: tl.constexpr, HAS_IS: tl.constexpr,
    HAS_DUAL: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_b, cols, keep, logp, old, adv = _ppo_row_block(
        logp_ptr, logp_stride, old_ptr, old_stride, adv_ptr, adv_stride, keep_ptr, keep_stride, T,
        ADV_PER_SEQ, HAS_MASK, BLOCK_T,
    )
    loss, _, clipped, dual, ratio, approx_kl = ppo_token(
        logp - old, adv, clip_low, clip_high, dual_clip, log_ratio_clamp, HAS_DUAL
    )
    if HAS_IS:
        loss = loss * tl.load(isw_ptr + pid_b * isw_stride + cols, mask=keep, other=0.0).to(tl.float32)
    k = keep.to(tl.float32)
    out = partials_ptr + pid_b * tl.num_programs(1) + tl.program_id(1)
    tl.store(out, tl.sum(tl.where(keep, loss, 0.0), 0))
    tl.store(out + n_prog, tl.sum(k, 0))
    tl.store(out + 2 * n_prog, tl.sum(clipped * k, 0))
    # a clip with A < 0 can only be the floor 1 - clip_low (with A > 0 only the ceiling)
    tl.store(out + 3 * n_prog, tl.sum(tl.where(adv < 0, clipped, 0.0) * k, 0))
    tl.store(out + 4 * n_prog, tl.sum(dual * k, 0))
    tl.store(out + 5 * n_prog, tl.sum(tl.where(keep, approx_kl, 0.0), 0))
    tl.store(out + 6 * n_prog, tl.sum(tl.where(keep, ratio, 0.0), 0))
    tl.store(out + 7 * n_prog, tl.reduce(tl.where(keep, ratio, 0.0), 0, _max_keep_nan))


@triton.jit
def _ppo_bwd_kernel(
    logp_ptr, logp_stride, old_ptr, old_stride, adv_ptr, adv_stride, keep_ptr, keep_stride,
    isw_ptr, isw_stride, row_scale_ptr, grad_ptr, grad_logp_ptr, T,
    clip_low, clip_high, dual_clip, log_ratio_clamp,
    ADV_PER_SEQ: tl.constexpr, HAS_MASK: tl.constexpr, HAS_IS: tl.constexpr,
    HAS_DUAL: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_b, cols, keep, logp, old, adv = _ppo_row_block(
        logp_ptr, logp_stride, old_ptr, old_stride, adv_ptr, adv_stride, keep_ptr, keep_stride, T,
        ADV_PER_SEQ, HAS_MASK, BLOCK_T,
    )
    _, d_logp, _, _, _, _ = ppo_token(
        logp - old, adv, clip_low, clip_high, dual_clip, log_ratio_clamp, HAS_DUAL
    )
    if HAS_IS:
        d_logp = d_logp * tl.load(isw_ptr + pid_b * isw_stride + cols, mask=keep, other=0.0).to(tl.float32)
    scale = tl.load(grad_ptr).to(tl.float32) * tl.load(row_scale_ptr + pid_b)
    d_logp = tl.where(keep, d_logp * scale, 0.0)
    tl.store(grad_logp_ptr + pid_b * T + cols, d_logp.to(grad_logp_ptr.dtype.element_ty), mask=cols < T)


@triton.jit
def _value_fwd_kernel(
    v_ptr, v_stride, old_ptr, old_stride, ret_ptr, ret_stride, keep_ptr, keep_stride,
    partials_ptr, T, n_prog, clip,
    HAS_MASK: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    cols, keep = _row_block(pid_b, pid_t, T, keep_ptr, keep_stride, HAS_MASK, BLOCK_T)
    v = tl.load(v_ptr + pid_b * v_stride + cols, mask=keep, other=0.0).to(tl.float32)
    ret = tl.load(ret_ptr + pid_b * ret_stride + cols, mask=keep, other=0.0).to(tl.float32)
    old = v
    if HAS_CLIP:
        old = tl.load(old_ptr + pid_b * old_stride + cols, mask=keep, other=0.0).to(tl.float32)
    loss, _, clipped = value_token(v, old, ret, clip, HAS_CLIP)
    k = keep.to(tl.float32)
    out = partials_ptr + pid_b * tl.num_programs(1) + tl.program_id(1)
    tl.store(out, tl.sum(loss * k, 0))
    tl.store(out + n_prog, tl.sum(k, 0))
    tl.store(out + 2 * n_prog, tl.sum(clipped * k, 0))
    tl.store(out + 3 * n_prog, tl.sum(v * k, 0))
    tl.store(out + 4 * n_prog, tl.sum(ret * k, 0))


@triton.jit
def _value_bwd_kernel(
    v_ptr, v_stride, old_ptr, old_stride, ret_ptr, ret_stride, keep_ptr, keep_stride,
    row_scale_ptr, grad_ptr, grad_v_ptr, T, clip,
    HAS_MASK: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    cols, keep = _row_block(pid_b, pid_t, T, keep_ptr, keep_stride, HAS_MASK, BLOCK_T)
    v = tl.load(v_ptr + pid_b * v_stride + cols, mask=keep, other=0.0).to(tl.float32)
    ret = tl.load(ret_ptr + pid_b * ret_stride + cols, mask=keep, other=0.0).to(tl.float32)
    old = v
    if HAS_CLIP:
        old = tl.load(old_ptr + pid_b * old_stride + cols, mask=keep, other=0.0).to(tl.float32)
    _, d_v, _ = value_token(v, old, ret, clip, HAS_CLIP)
    scale = tl.load(grad_ptr).to(tl.float32) * tl.load(row_scale_ptr + pid_b)
    d_v = tl.where(keep, d_v * scale, 0.0)
    tl.store(grad_v_ptr + pid_b * T + cols, d_v.to(grad_v_ptr.dtype.element_ty), mask=cols < T)


def _stride(t: torch.Tensor | None) -> int:
    return t.stride(0) if t is not None and t.dim() == 2 else 0


def ppo_policy_forward(
    logp, old_logp, advantages, keep, is_weights,
    clip_low: float, clip_high: float, dual_clip: float | None, log_ratio_clamp: float,
) -> torch.Tensor:
    """[B, T] rows with unit inner stride (advantages [B, T] or [B]; keep/is_weights or None).

    Returns partials [len(PPO_PARTIALS), B, NB] fp32.
    """
    b, t = logp.shape
    block, warps = _block_t(t)
    nb = triton.cdiv(t, block)
    if b == 0 or t == 0:
        return torch.zeros((len(PPO_PARTIALS), b, 1), device=logp.device, dtype=torch.float32)
    partials = torch.empty((len(PPO_PARTIALS), b, nb), device=logp.device, dtype=torch.float32)
    _ppo_fwd_kernel[(b, nb)](
        logp, logp.stride(0), old_logp, old_logp.stride(0), advantages, _stride(advantages),
        keep if keep is not None else logp, _stride(keep),
        is_weights if is_weights is not None else logp, _stride(is_weights),
        partials, t, b * nb,
        clip_low, clip_high, dual_clip if dual_clip is not None else 0.0, log_ratio_clamp,
        ADV_PER_SEQ=advantages.dim() == 1, HAS_MASK=keep is not None,
        HAS_IS=is_weights is not None, HAS_DUAL=dual_clip is not None,
        BLOCK_T=block, num_warps=warps,
    )
    return partials


def ppo_policy_backward(
    logp, old_logp, advantages, keep, is_weights,
    clip_low: float, clip_high: float, dual_clip: float | None, log_ratio_clamp: float,
    row_scale: torch.Tensor, grad: torch.Tensor,
) -> torch.Tensor:
    """d loss / d logp [B, T] (contiguous, logp's dtype); grad is the 0-d upstream gradient."""
    b, t = logp.shape
    grad_logp = torch.empty((b, t), device=logp.device, dtype=logp.dtype)
    if b == 0 or t == 0:
        return grad_logp
    block, warps = _block_t(t)
    _ppo_bwd_kernel[(b, triton.cdiv(t, block))](
        logp, logp.stride(0), old_logp, old_logp.stride(0), advantages, _stride(advantages),
        keep if keep is not None else logp, _stride(keep),
        is_weights if is_weights is not None else logp, _stride(is_weights),
        row_scale, grad, grad_logp, t,
        clip_low, clip_high, dual_clip if dual_clip is not None else 0.0, log_ratio_clamp,
        ADV_PER_SEQ=advantages.dim() == 1, HAS_MASK=keep is not None,
        HAS_IS=is_weights is not None, HAS_DUAL=dual_clip is not None,
        BLOCK_T=block, num_warps=warps,
    )
    return grad_logp


def value_forward(values, old_values, returns, keep, clip: float | None) -> torch.Tensor:
    """[B, T] rows with unit inner stride -> partials [len(VALUE_PARTIALS), B, NB] fp32."""
    b, t = values.shape
    block, warps = _block_t(t)
    nb = triton.cdiv(t, block)
    old_values = old_values if old_values is not None else values  # not read without clip
    if b == 0 or t == 0:
        return torch.zeros((len(VALUE_PARTIALS), b, 1), device=values.device, dtype=torch.float32)
    partials = torch.empty((len(VALUE_PARTIALS), b, nb), device=values.device, dtype=torch.float32)
    _value_fwd_kernel[(b, nb)](
        values, values.stride(0), old_values, old_values.stride(0), returns, returns.stride(0),
        keep if keep is not None else values, _stride(keep),
        partials, t, b * nb, clip if clip is not None else 0.0,
        HAS_MASK=keep is not None, HAS_CLIP=clip is not None, BLOCK_T=block, num_warps=warps,
    )
    return partials


def value_backward(values, old_values, returns, keep, clip, row_scale, grad) -> torch.Tensor:
    """d loss / d values [B, T] (contiguous, values' dtype)."""
    b, t = values.shape
    grad_v = torch.empty((b, t), device=values.device, dtype=values.dtype)
    if b == 0 or t == 0:
        return grad_v
    block, warps = _block_t(t)
    old_values = old_values if old_values is not None else values
    _value_bwd_kernel[(b, triton.cdiv(t, block))](
        values, values.stride(0), old_values, old_values.stride(0), returns, returns.stride(0),
        keep if keep is not None else values, _stride(keep),
        row_scale, grad, grad_v, t, clip if clip is not None else 0.0,
        HAS_MASK=keep is not None, HAS_CLIP=clip is not None, BLOCK_T=block, num_warps=warps,
    )
    return grad_v
