"""Advantage estimation: GAE as a reverse scan, masked whitening, group-relative advantages.

GAE: one program per sequence walks T from the end in blocks. Inside a block the two
first-order recurrences (the value of the next valid token, and the advantage carried from
the right) are `tl.associative_scan`s over (a, b) pairs, x_t = a_t * x_{t+1} + b_t, with the
running value carried between blocks. Masked positions have a = 1, b = 0, so they pass the
carry through untouched: left, right or interior padding all work. Backward is the transposed
recurrence, a forward scan in time.
Whitening: per-block (count, mean, M2) partials of x / scale combined by the caller (Chan et
al.), then one elementwise pass; backward the same with (sum g, sum g * whitened x).
Group advantages: each program holds [BLOCK_G groups, group size] of scores in registers;
batch statistics (scale="batch") are recomputed by every program with a loop over all groups,
which is cheap for [B] scores.
All arithmetic is fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# group_advantages scale codes
GROUP_SCALES = {"none": 0, "group": 1, "batch": 2}

_BLOCK = 1024
_WARPS = 4


def _block_t(t: int) -> int:
    # 256 tokens a scan block: scans cost log2(BLOCK) shuffle rounds and the loop over blocks
    # is sequential anyway; short rows use one small block
    return min(triton.next_power_of_2(max(t, 1)), 256)


@triton.jit
def _linear_combine(a_l, b_l, a_r, b_r):
    # apply (a_l, b_l) first, then (a_r, b_r): x -> a_r * (a_l * x + b_l) + b_r
    return a_l * a_r, a_r * b_l + b_r


@triton.jit
def _scan_with_carry(a, b, carry, idx, BLOCK: tl.constexpr):
    """x_i = a_i * x_{i-1} + b_i over the block with x_{-1} = carry; returns (x, x_last)."""
    a_acc, b_acc = tl.associative_scan((a, b), 0, _linear_combine)
    x = a_acc * carry + b_acc
    return x, tl.sum(tl.where(idx == BLOCK - 1, x, 0.0), 0)


@triton.jit
def _gae_fwd_kernel(
    r_ptr, r_stride, v_ptr, v_stride, keep_ptr, keep_stride, adv_ptr, ret_ptr,
    T, gamma, gamma_lam, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    r_row = r_ptr + row * r_stride
    v_row = v_ptr + row * v_stride
    k_row = keep_ptr + row * keep_stride
    idx = tl.arange(0, BLOCK_T)
    next_value = 0.0  # value of the first valid token to the right (0 after the last one)
    carried = 0.0  # advantage of the first valid token to the right
    n_blocks = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_blocks):
        t = (n_blocks - 1 - i) * BLOCK_T + BLOCK_T - 1 - idx  # this block, right to left
        m = t < T
        m_next = (t + 1) < T
        if HAS_MASK:
            m = m & (tl.load(k_row + t, mask=m, other=0) != 0)
            m_next = m_next & (tl.load(k_row + t + 1, mask=m_next, other=0) != 0)
        v = tl.load(v_row + t, mask=m, other=0.0).to(tl.float32)
        r = tl.load(r_row + t, mask=m, other=0.0).to(tl.float32)
        v_next = tl.load(v_row + t + 1, mask=m_next, other=0.0).to(tl.float32)
        mf = m.to(tl.float32)
        mnf = m_next.to(tl.float32)
        # z_t = value of the first valid token after t: z_t = m_{t+1} V_{t+1} + (1 - m_{t+1}) z_{t+1}
        z, next_value = _scan_with_carry(1.0 - mnf, mnf * v_next, next_value, idx, BLOCK_T)
        delta = mf * (r + gamma * z - v)
        # C_t = m_t (delta_t + gamma*lam*C_{t+1}) + (1 - m_t) C_{t+1}
        c, carried = _scan_with_carry(mf * gamma_lam + 1.0 - mf, delta, carried, idx, BLOCK_T)
        tl.store(adv_ptr + row * T + t, mf * c, mask=t < T)
        tl.store(ret_ptr + row * T + t, mf * (c + v), mask=t < T)


@triton.jit
def _gae_bwd_kernel(
    keep_ptr, keep_stride, g_adv_ptr, g_ret_ptr, grad_r_ptr, grad_v_ptr,
    T, gamma, gamma_lam,
    HAS_MASK: tl.constexpr, HAS_G_ADV: tl.constexpr, HAS_G_RET: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    k_row = keep_ptr + row * keep_stride
    idx = tl.arange(0, BLOCK_T)
    d_carry = 0.0  # D at the last valid token up to t: the gradient reaching delta_t
    p_carry = 0.0  # the same one token behind: D at the last valid token before t
    for start in range(0, T, BLOCK_T):
        t = start + idx
        m = t < T
        m_prev = (t >= 1) & (t - 1 < T)
        if HAS_MASK:
            m = m & (tl.load(k_row + t, mask=m, other=0) != 0)
            m_prev = m_prev & (tl.load(k_row + t - 1, mask=m_prev, other=0) != 0)
        g = tl.zeros([BLOCK_T], tl.float32)
        g_prev = tl.zeros([BLOCK_T], tl.float32)
        g_ret = tl.zeros([BLOCK_T], tl.float32)
        if HAS_G_ADV:
            g += tl.load(g_adv_ptr + row * T + t, mask=m, other=0.0).to(tl.float32)
            g_prev += tl.load(g_adv_ptr + row * T + t - 1, mask=m_prev, other=0.0).to(tl.float32)
        if HAS_G_RET:
            g_ret = tl.load(g_ret_ptr + row * T + t, mask=m, other=0.0).to(tl.float32)
            g += g_ret
            g_prev += tl.load(g_ret_ptr + row * T + t - 1, mask=m_prev, other=0.0).to(tl.float32)
        mf = m.to(tl.float32)
        mpf = m_prev.to(tl.float32)
        d, d_carry = _scan_with_carry(mf * gamma_lam + 1.0 - mf, mf * g, d_carry, idx, BLOCK_T)
        p, p_carry = _scan_with_carry(mpf * gamma_lam + 1.0 - mpf, mpf * g_prev, p_carry, idx, BLOCK_T)
        tl.store(grad_r_ptr + row * T + t, (mf * d).to(grad_r_ptr.dtype.element_ty), mask=t < T)
        grad_v = mf * (g_ret - d + gamma * p)
        tl.store(grad_v_ptr + row * T + t, grad_v.to(grad_v_ptr.dtype.element_ty), mask=t < T)


@triton.jit
def _moments_kernel(
    x_ptr, keep_ptr, scale_ptr, part_ptr, N, n_prog, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < N
    if HAS_MASK:
        keep = keep & (tl.load(keep_ptr + offs, mask=offs < N, other=0) != 0)
    # moments of x / scale (a power of two, exact): (x - mean)^2 overflows fp32 from 1e19
    x = tl.load(x_ptr + offs, mask=keep, other=0.0).to(tl.float32) / tl.load(scale_ptr)
    n = tl.sum(keep.to(tl.float32), 0)
    mean = tl.sum(x, 0) / tl.maximum(n, 1.0)
    xc = tl.where(keep, x - mean, 0.0)
    tl.store(part_ptr + pid, n)
    tl.store(part_ptr + n_prog + pid, mean)
    tl.store(part_ptr + 2 * n_prog + pid, tl.sum(xc * xc, 0))


@triton.jit
def _whiten_fwd_kernel(
    x_ptr, keep_ptr, stats_ptr, out_ptr, N,
    HAS_MASK: tl.constexpr, SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < N
    if HAS_MASK:
        keep = keep & (tl.load(keep_ptr + offs, mask=offs < N, other=0) != 0)
    mean = tl.load(stats_ptr)
    inv_std = tl.load(stats_ptr + 1)
    x = tl.load(x_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    y = (x - mean) * inv_std
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + offs, tl.where(keep, y, 0.0), mask=offs < N)


@triton.jit
def _whiten_grad_sums_kernel(
    x_ptr, keep_ptr, stats_ptr, g_ptr, part_ptr, N, n_prog, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < N
    if HAS_MASK:
        keep = keep & (tl.load(keep_ptr + offs, mask=offs < N, other=0) != 0)
    mean = tl.load(stats_ptr)
    inv_std = tl.load(stats_ptr + 1)
    x = tl.load(x_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.sum(g, 0))
    # g * whitened x, O(g) whatever the scale of x (g * (x - mean) alone can overflow)
    tl.store(part_ptr + n_prog + pid, tl.sum(tl.where(keep, g * ((x - mean) * inv_std), 0.0), 0))


@triton.jit
def _whiten_bwd_kernel(
    x_ptr, keep_ptr, stats_ptr, g_ptr, grad_x_ptr, N,
    HAS_MASK: tl.constexpr, SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    # stats: mean, inv_std, mean of g, coef = inv_std * sum(g * y) / max(n - 1, 1) with
    # y = (x - mean) * inv_std (inv_std^3 alone underflows fp32 for x around 1e13)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < N
    if HAS_MASK:
        keep = keep & (tl.load(keep_ptr + offs, mask=offs < N, other=0) != 0)
    mean = tl.load(stats_ptr)
    inv_std = tl.load(stats_ptr + 1)
    g_mean = tl.load(stats_ptr + 2)
    coef = tl.load(stats_ptr + 3)
    x = tl.load(x_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    dx = inv_std * (g - g_mean) - coef * ((x - mean) * inv_std)
    if not SHIFT_MEAN:
        dx += g_mean
    tl.store(grad_x_ptr + offs, tl.where(keep, dx, 0.0).to(grad_x_ptr.dtype.element_ty), mask=offs < N)


@triton.jit
def _batch_moments(s_ptr, n_groups, G, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Mean and std (Bessel) of all n_groups * G scores, three passes over 2-D tiles: the sum,
    the largest |s - mean|, and the squares of the deviations scaled by it (unscaled squares
    overflow fp32 from |s - mean| ~ 1e19)."""
    cols = tl.arange(0, BLOCK_M)[None, :]
    total = 0.0
    for g0 in range(0, n_groups, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G)[:, None]
        ok = (rows < n_groups) & (cols < G)
        total += tl.sum(tl.sum(tl.load(s_ptr + rows * G + cols, mask=ok, other=0.0).to(tl.float32), 1), 0)
    n = n_groups * G
    mean = total / n
    dmax = 0.0
    for g0 in range(0, n_groups, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G)[:, None]
        ok = (rows < n_groups) & (cols < G)
        s = tl.load(s_ptr + rows * G + cols, mask=ok, other=0.0).to(tl.float32)
        dmax = tl.maximum(dmax, tl.max(tl.max(tl.where(ok, tl.abs(s - mean), 0.0), 1), 0))
    safe = tl.where(dmax > 0, dmax, 1.0)
    m2 = 0.0
    for g0 in range(0, n_groups, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G)[:, None]
        ok = (rows < n_groups) & (cols < G)
        s = tl.load(s_ptr + rows * G + cols, mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, (s - mean) / safe, 0.0)
        m2 += tl.sum(tl.sum(d * d, 1), 0)
    return mean, safe * tl.sqrt(m2 / (n - 1))


@triton.jit
def _group_std(u, G):
    """Bessel std of each row of centred u [BLOCK_G, BLOCK_M] (0 outside the group), scaled by
    the row's max |u| so that u² cannot overflow; exactly 0 for a constant group."""
    m = tl.max(tl.abs(u), 1)
    safe = tl.where(m > 0, m, 1.0)
    r = u / safe[:, None]
    return safe * tl.sqrt(tl.sum(r * r, 1) / (G - 1))


@triton.jit
def _group_tile(s_ptr, pid, n_groups, G, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = pid * BLOCK_G + tl.arange(0, BLOCK_G)[:, None]
    cols = tl.arange(0, BLOCK_M)[None, :]
    ok = (rows < n_groups) & (cols < G)
    offs = rows * G + cols
    s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    # deviations from the group's first score, then centred: a constant group gives exactly 0
    # (fp32 rounding of its mean would leave a residue that 1 / (std + eps) blows up)
    d = tl.where(ok, s - tl.sum(tl.where(cols == 0, s, 0.0), 1)[:, None], 0.0)
    u = tl.where(ok, d - (tl.sum(d, 1) / G)[:, None], 0.0)
    return offs, ok, s, u


@triton.jit
def _group_adv_fwd_kernel(
    s_ptr, out_ptr, n_groups, G, factor, eps,
    SCALE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs, ok, s, u = _group_tile(s_ptr, tl.program_id(0), n_groups, G, BLOCK_G, BLOCK_M)
    y = factor * u
    if SCALE == 1:
        y = y / (_group_std(u, G) + eps)[:, None]
    elif SCALE == 2:
        _, std_b = _batch_moments(s_ptr, n_groups, G, BLOCK_G, BLOCK_M)
        y = y / (std_b + eps)
    tl.store(out_ptr + offs, y, mask=ok)


@triton.jit
def _group_adv_bwd_kernel(
    s_ptr, g_ptr, grad_ptr, n_groups, G, factor, eps,
    SCALE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, ok, s, u = _group_tile(s_ptr, pid, n_groups, G, BLOCK_G, BLOCK_M)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g_centered = tl.where(ok, g - (tl.sum(g, 1) / G)[:, None], 0.0)
    if SCALE == 0:
        grad = factor * g_centered
    elif SCALE == 1:
        std = _group_std(u, G)[:, None]
        c = std + eps
        gu = tl.sum(g * u, 1)[:, None]
        # d std / d s_i = u_i / ((G - 1) std), taken as 0 for a constant group (std = 0)
        dstd = tl.where(std > 0, u / ((G - 1) * tl.where(std > 0, std, 1.0)), 0.0)
        grad = factor * (g_centered / c - gu / c / c * dstd)  # c² overflows fp32 at std ~ 1e20
    else:
        mean_b, std_b = _batch_moments(s_ptr, n_groups, G, BLOCK_G, BLOCK_M)
        c = std_b + eps
        # sum over the whole batch of g * u needs every group's mean: one more loop
        gu = 0.0
        for g0 in range(0, n_groups, BLOCK_G):
            _, ok_j, _, u_j = _group_tile(s_ptr, g0 // BLOCK_G, n_groups, G, BLOCK_G, BLOCK_M)
            rows = g0 + tl.arange(0, BLOCK_G)[:, None]
            g_j = tl.load(g_ptr + rows * G + tl.arange(0, BLOCK_M)[None, :], mask=ok_j, other=0.0)
            gu += tl.sum(tl.sum(g_j.to(tl.float32) * u_j, 1), 0)
        n = n_groups * G
        safe = tl.where(std_b > 0, std_b, 1.0)
        dstd = tl.where(std_b > 0, (s - mean_b) / ((n - 1) * safe), 0.0)
        grad = factor * (g_centered / c - gu / c / c * dstd)
    tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- launchers


def gae_forward(rewards, values, keep, gamma: float, lam: float):
    """rewards, values [B, T] (unit inner stride), keep [B, T] bool or None.

    Returns (advantages, returns), [B, T] fp32 contiguous, 0 at masked positions.
    """
    b, t = rewards.shape
    adv = torch.empty((b, t), device=rewards.device, dtype=torch.float32)
    ret = torch.empty_like(adv)
    if b == 0 or t == 0:
        return adv, ret
    _gae_fwd_kernel[(b,)](
        rewards, rewards.stride(0), values, values.stride(0),
        keep if keep is not None else rewards, keep.stride(0) if keep is not None else 0,
        adv, ret, t, gamma, gamma * lam,
        HAS_MASK=keep is not None, BLOCK_T=_block_t(t), num_warps=4,
    )
    return adv, ret


def gae_backward(keep, shape, gamma: float, lam: float, grad_adv, grad_ret, r_dtype, v_dtype):
    """Gradients (d rewards, d values) [B, T]; grad_adv/grad_ret contiguous [B, T] or None."""
    b, t = shape
    device = (grad_adv if grad_adv is not None else grad_ret).device
    grad_r = torch.empty((b, t), device=device, dtype=r_dtype)
    grad_v = torch.empty((b, t), device=device, dtype=v_dtype)
    if b == 0 or t == 0:
        return grad_r, grad_v
    any_grad = grad_adv if grad_adv is not None else grad_ret
    _gae_bwd_kernel[(b,)](
        keep if keep is not None else any_grad, keep.stride(0) if keep is not None else 0,
        grad_adv if grad_adv is not None else any_grad, grad_ret if grad_ret is not None else any_grad,
        grad_r, grad_v, t, gamma, gamma * lam,
        HAS_MASK=keep is not None, HAS_G_ADV=grad_adv is not None, HAS_G_RET=grad_ret is not None,
        BLOCK_T=_block_t(t), num_warps=4,
    )
    return grad_r, grad_v


def masked_moments(x: torch.Tensor, keep: torch.Tensor | None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [N] contiguous -> per-block partials [3, P] fp32: (count, mean, M2) of x / scale.

    scale: 0-d/[1] fp32 on x's device (a power of two keeps it exact), None for 1.
    """
    n = x.numel()
    n_prog = max(triton.cdiv(n, _BLOCK), 1)
    part = torch.zeros((3, n_prog), device=x.device, dtype=torch.float32)
    if n == 0:
        return part
    if scale is None:
        scale = torch.ones(1, device=x.device, dtype=torch.float32)
    _moments_kernel[(n_prog,)](
        x, keep if keep is not None else x, scale, part, n, n_prog,
        HAS_MASK=keep is not None, BLOCK=_BLOCK, num_warps=_WARPS,
    )
    return part


def whiten_apply(x, keep, stats, shift_mean: bool) -> torch.Tensor:
    """stats [2] = (mean, inv_std) on device -> whitened x [N] fp32, 0 where masked."""
    n = x.numel()
    out = torch.empty(n, device=x.device, dtype=torch.float32)
    if n:
        _whiten_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
            x, keep if keep is not None else x, stats, out, n,
            HAS_MASK=keep is not None, SHIFT_MEAN=shift_mean, BLOCK=_BLOCK, num_warps=_WARPS,
        )
    return out


def whiten_grad_sums(x, keep, stats, grad) -> torch.Tensor:
    """Per-block partials [2, P] fp32: (sum g, sum g * (x - mean) * inv_std) over valid entries."""
    n = x.numel()
    n_prog = max(triton.cdiv(n, _BLOCK), 1)
    part = torch.zeros((2, n_prog), device=x.device, dtype=torch.float32)
    if n:
        _whiten_grad_sums_kernel[(n_prog,)](
            x, keep if keep is not None else x, stats, grad, part, n, n_prog,
            HAS_MASK=keep is not None, BLOCK=_BLOCK, num_warps=_WARPS,
        )
    return part


def whiten_backward_apply(x, keep, stats, grad, shift_mean: bool) -> torch.Tensor:
    """stats [4] = (mean, inv_std, mean g, coef) -> d x [N] in x's dtype, 0 where masked:
    ``dx = inv_std * (g - mean g) - coef * (x - mean) * inv_std``."""
    n = x.numel()
    grad_x = torch.empty_like(x)
    if n:
        _whiten_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
            x, keep if keep is not None else x, stats, grad, grad_x, n,
            HAS_MASK=keep is not None, SHIFT_MEAN=shift_mean, BLOCK=_BLOCK, num_warps=_WARPS,
        )
    return grad_x


def _group_blocks(n_groups: int, group_size: int) -> tuple[int, int, int]:
    block_m = triton.next_power_of_2(group_size)
    # about 2048 scores a tile
    block_g = max(1, min(triton.next_power_of_2(n_groups), 2048 // block_m))
    return block_g, block_m, triton.cdiv(n_groups, block_g)


def group_advantages_forward(scores, group_size: int, factor: float, scale: int, eps: float):
    """scores [B] contiguous, B = n_groups * group_size -> advantages [B] fp32."""
    n_groups = scores.numel() // group_size
    out = torch.empty(scores.numel(), device=scores.device, dtype=torch.float32)
    if n_groups == 0:
        return out
    block_g, block_m, n_prog = _group_blocks(n_groups, group_size)
    _group_adv_fwd_kernel[(n_prog,)](
        scores, out, n_groups, group_size, factor, eps,
        SCALE=scale, BLOCK_G=block_g, BLOCK_M=block_m, num_warps=4,
    )
    return out


def group_advantages_backward(scores, group_size: int, factor: float, scale: int, eps: float, grad):
    """d scores [B] in scores' dtype."""
    n_groups = scores.numel() // group_size
    grad_s = torch.empty_like(scores)
    if n_groups == 0:
        return grad_s
    block_g, block_m, n_prog = _group_blocks(n_groups, group_size)
    _group_adv_bwd_kernel[(n_prog,)](
        scores, grad, grad_s, n_groups, group_size, factor, eps,
        SCALE=scale, BLOCK_G=block_g, BLOCK_M=block_m, num_warps=4,
    )
    return grad_s
