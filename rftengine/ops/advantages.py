"""Advantage estimators: gae (value-based PPO), whiten, group_advantages (GRPO / RLOO).

Public function -> autograd.Function -> Triton launchers (`rftengine.kernels.gae`) on CUDA or
the torch references below elsewhere. Advantages are usually computed without gradient, but
every op here is differentiable (all are linear or smooth maps of their inputs), so they
compose with anything upstream.
"""

from __future__ import annotations

from collections.abc import Callable

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

GROUP_MODES = ("grpo", "rloo")
GROUP_SCALES = ("group", "batch", "none")


def _zeros_where_masked(t: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    t = t.to(dtype)
    return t if keep is None else torch.where(keep, t, torch.zeros((), dtype=dtype, device=t.device))


def _check_finite_where(name: str, t: torch.Tensor, keep: torch.Tensor | None) -> None:
    """NaN/inf are rejected at valid positions only: padding is never read."""
    check_finite(name, _zeros_where_masked(t, keep, t.dtype))


# ---------------------------------------------------------------- GAE


def gae_forward_reference(rewards, values, keep, gamma: float, lam: float):
    """Torch twin of the GAE kernel: a reverse loop over T, vectorised over B.

    At valid t: ``δ_t = r_t + γ·V_next - V_t``, ``A_t = δ_t + γλ·A_next`` where "next" is the
    next valid token (V_next = A_next = 0 after the last one); masked positions output 0 and
    pass the recursion through.
    """
    acc = accumulation_dtype(rewards, values)
    r = _zeros_where_masked(rewards, keep, acc)
    v = _zeros_where_masked(values, keep, acc)
    m = torch.ones_like(r) if keep is None else keep.to(acc)
    adv = torch.zeros_like(r)
    next_value = r.new_zeros(r.shape[0])
    carried = r.new_zeros(r.shape[0])
    for t in range(r.shape[1] - 1, -1, -1):
        m_t = m[:, t]
        delta = m_t * (r[:, t] + gamma * next_value - v[:, t])
        carried = m_t * (delta + gamma * lam * carried) + (1 - m_t) * carried
        adv[:, t] = m_t * carried
        next_value = m_t * v[:, t] + (1 - m_t) * next_value
    return adv, adv + m * v


def gae_backward_reference(keep, shape, gamma: float, lam: float, grad_adv, grad_ret, r_dtype, v_dtype):
    """Transposed recurrence, a forward loop over T: (d rewards, d values).

    With G_t = g_adv_t + g_ret_t and D_t = G_t + γλ·D_prev (prev = previous valid token):
    ``d r_t = D_t``, ``d V_t = g_ret_t - D_t + γ·D_prev``.
    """
    any_grad = grad_adv if grad_adv is not None else grad_ret
    acc = torch.float64 if any_grad.dtype == torch.float64 else torch.float32
    g_adv = grad_adv.to(acc) if grad_adv is not None else torch.zeros(shape, dtype=acc, device=any_grad.device)
    g_ret = grad_ret.to(acc) if grad_ret is not None else torch.zeros_like(g_adv)
    m = torch.ones_like(g_adv) if keep is None else keep.to(acc)
    grad_r = torch.zeros_like(g_adv)
    grad_v = torch.zeros_like(g_adv)
    d = g_adv.new_zeros(shape[0])
    for t in range(shape[1]):
        m_t = m[:, t]
        prev = d
        d = m_t * (g_adv[:, t] + g_ret[:, t] + gamma * lam * d) + (1 - m_t) * d
        grad_r[:, t] = m_t * d
        grad_v[:, t] = m_t * (g_ret[:, t] - d + gamma * prev)
    return grad_r.to(r_dtype), grad_v.to(v_dtype)


def _gae_implementation(triton_path: bool):
    if triton_path:
        from rftengine.kernels import gae as kernel

        return kernel.gae_forward, kernel.gae_backward
    return gae_forward_reference, gae_backward_reference


class _GAE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, values, keep, gamma, lam, triton_path):
        forward_impl, _ = _gae_implementation(triton_path)
        adv, ret = forward_impl(rewards, values, keep, gamma, lam)
        ctx.save_for_backward(keep)
        ctx.shape, ctx.dtypes = tuple(rewards.shape), (rewards.dtype, values.dtype)
        ctx.gamma, ctx.lam, ctx.triton_path = gamma, lam, triton_path
        ctx.set_materialize_grads(False)
        return adv, ret

    @staticmethod
    def backward(ctx, grad_adv, grad_ret):
        (keep,) = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]) or (grad_adv is None and grad_ret is None):
            return None, None, None, None, None, None
        _, backward_impl = _gae_implementation(ctx.triton_path)
        grad_r, grad_v = backward_impl(
            keep, ctx.shape, ctx.gamma, ctx.lam,
            grad_adv.contiguous() if grad_adv is not None else None,
            grad_ret.contiguous() if grad_ret is not None else None,
            *ctx.dtypes,
        )
        return grad_r, grad_v, None, None, None, None


def _check_unit_interval(name: str, value: float) -> None:
    check_non_negative(name, value)
    if value > 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


@deprecated_call_forms(positional=("mask",))
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
):
    """Generalised advantage estimation (Schulman et al., 2016) over padded sequences.

    Over the valid tokens of each sequence, in order:
    ``δ_t = r_t + γ·V_{t+1} - V_t``, ``A_t = δ_t + γλ·A_{t+1}``, ``returns_t = A_t + V_t``,
    where t+1 is the next valid token and the bootstrap after the last valid token is 0
    (V = A = 0). Padding may be on the left, on the right, or inside (e.g. masked tool
    output): masked positions are skipped by the recursion and output 0.

    Args:
        rewards: ``[B, T]`` float per-token rewards (e.g. -β·KL with the score added at the
            last response token); finite at valid positions.
        values: ``[B, T]`` float value estimates V(s_t); finite at valid positions.
        mask: ``[B, T]`` bool or 0/1 (True = token counts) or None (all count).
        gamma: discount in [0, 1]. lam: GAE λ in [0, 1].

    Returns:
        ``(advantages, returns)``, each ``[B, T]`` float32 (float64 for float64 inputs), 0 at
        masked positions; differentiable w.r.t. ``rewards`` and ``values``. On CUDA one Triton
        kernel (one program per sequence, a reverse scan over T); elsewhere a torch loop.
        Empty inputs (B = 0 or T = 0) give empty outputs.
    """
    check_floating("rewards", rewards)
    check_ndim("rewards", rewards, (2,), "[B, T]")
    check_floating("values", values)
    check_shape("values", values, rewards.shape, "rewards.shape")
    device = check_same_device(rewards=rewards, values=values, mask=mask)
    keep = as_mask("mask", mask, rewards.shape, device)
    _check_unit_interval("gamma", gamma)
    _check_unit_interval("lam", lam)
    _check_finite_where("rewards", rewards, keep)
    _check_finite_where("values", values, keep)

    triton_path = use_triton(rewards, values) and accumulation_dtype(rewards, values) == torch.float32
    return _GAE.apply(
        rows_view(rewards), rows_view(values), keep.contiguous() if keep is not None else None,
        float(gamma), float(lam), triton_path,
    )


# ---------------------------------------------------------------- whitening


def power_of_two_scale(x: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """0-d: the smallest power of two >= max |x| over the valid entries, at least 1.

    Statistics of x / scale cannot overflow (squares of values around 1e20 do in fp32), and
    dividing by a power of two is exact, so inputs of ordinary size get bit-identical results.
    """
    if x.numel() == 0:
        return torch.ones((), dtype=dtype, device=x.device)
    m = _zeros_where_masked(x, keep, dtype).abs().amax()
    return torch.ldexp(torch.ones_like(m), torch.frexp(m).exponent).clamp(min=1.0)


def combine_moments(part: torch.Tensor, eps: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-block (count, mean, M2) partials [3, P] of x / scale -> (mean, inv_std, count) [3]
    of x (Chan et al.).

    ``var = M2 / max(n - 1, 1)`` (Bessel-corrected, as torch.var), ``inv_std = (var + eps)^-1/2``,
    evaluated as ``(var' + eps / scale²)^-1/2 / scale`` on the scaled variance var'.
    """
    count, means, m2 = part
    scale = torch.ones((), dtype=part.dtype, device=part.device) if scale is None else scale.to(part.dtype)
    n = count.sum()
    mean = (count * means).sum() / n.clamp(min=1.0)
    m2_total = m2.sum() + (count * (means - mean) ** 2).sum()
    inv_std = torch.rsqrt(m2_total / (n - 1).clamp(min=1.0) + eps / scale / scale) / scale
    return torch.stack([mean * scale, inv_std, n])


def whiten_forward_reference(x, keep, shift_mean: bool, eps: float):
    """Torch path of whiten on flat x [N]: (y [N], stats [3] = (mean, inv_std, count))."""
    acc = accumulation_dtype(x)
    scale = power_of_two_scale(x, keep, acc)
    xv = _zeros_where_masked(x, keep, acc) / scale
    k = torch.ones_like(xv) if keep is None else keep.to(acc)
    n = k.sum()
    mean = xv.sum() / n.clamp(min=1.0)
    xc = (xv - mean) * k
    inv_std = torch.rsqrt((xc * xc).sum() / (n - 1).clamp(min=1.0) + eps / scale / scale)
    y = xc * inv_std + (0.0 if shift_mean else mean * scale * k)
    return y, torch.stack([mean * scale, inv_std / scale, n])


def whiten_backward_reference(x, keep, stats, grad, shift_mean: bool):
    """``dx = s·(g - ḡ) - s·Σ(g·y)/max(n - 1, 1)·y`` with ``y = s·(x - μ)`` (+ ḡ without
    shift_mean); the same as ``s³·Σ g·(x - μ)·(x - μ) / (n - 1)``, whose s³ underflows fp32."""
    acc = stats.dtype
    mean, inv_std, n = stats.unbind()
    k = torch.ones(x.shape, dtype=acc, device=x.device) if keep is None else keep.to(acc)
    y = (_zeros_where_masked(x, keep, acc) - mean) * inv_std * k
    g = grad.to(acc) * k
    g_mean = g.sum() / n.clamp(min=1.0)
    coef = inv_std * (g * y).sum() / (n - 1).clamp(min=1.0)
    dx = inv_std * (g - g_mean) - coef * y + (0.0 if shift_mean else g_mean)
    return (dx * k).to(x.dtype)


def _whiten_forward_triton(x, keep, shift_mean: bool, eps: float):
    from rftengine.kernels import gae as kernel

    scale = power_of_two_scale(x, keep, torch.float32)
    stats = combine_moments(kernel.masked_moments(x, keep, scale), eps, scale)
    return kernel.whiten_apply(x, keep, stats, shift_mean), stats


def _whiten_backward_triton(x, keep, stats, grad, shift_mean: bool):
    from rftengine.kernels import gae as kernel

    g_sum, gy_sum = kernel.whiten_grad_sums(x, keep, stats, grad).sum(-1)
    mean, inv_std, n = stats.unbind()
    coef = inv_std * gy_sum / (n - 1).clamp(min=1.0)
    bwd_stats = torch.stack([mean, inv_std, g_sum / n.clamp(min=1.0), coef])
    return kernel.whiten_backward_apply(x, keep, bwd_stats, grad, shift_mean)


def _local_moments(x, keep, triton_path: bool) -> torch.Tensor:
    """(count, mean, M2) [3] float64 of this process's valid entries of flat x [N], from the
    power-of-two-scaled statistics of either backend (float64 holds M2 of any fp32 x)."""
    acc = torch.float32 if triton_path else accumulation_dtype(x)
    scale = power_of_two_scale(x, keep, acc)
    if triton_path:
        from rftengine.kernels import gae as kernel

        count, means, m2 = kernel.masked_moments(x, keep, scale).double()
        n = count.sum()
        mean = (count * means).sum() / n.clamp(min=1.0)
        m2 = m2.sum() + (count * (means - mean) ** 2).sum()
    else:
        xv = _zeros_where_masked(x, keep, acc) / scale
        k = torch.ones_like(xv) if keep is None else keep.to(acc)
        n = k.sum()
        mean = xv.sum() / n.clamp(min=1.0)
        m2 = (((xv - mean) * k) ** 2).sum()
        n, mean, m2 = n.double(), mean.double(), m2.double()
    s = scale.double()
    return torch.stack([n, mean * s, m2 * s * s])


def _global_whiten_stats(x, keep, eps: float, triton_path: bool, reduce) -> torch.Tensor:
    """(mean, inv_std, count) [3] over every process's valid entries (``reduce`` sums a tensor
    over the processes): the count-weighted mean first, then each process's M2 about it
    (Chan et al.: ``M2_r + n_r·(mean_r - mean)²``), so no Σx² - (Σx)²/n cancellation."""
    n_r, mean_r, m2_r = _local_moments(x, keep, triton_path).unbind()
    n, total = reduce(torch.stack([n_r, n_r * mean_r])).unbind()
    mean = total / n.clamp(min=1.0)
    m2 = reduce((m2_r + n_r * (mean_r - mean) ** 2).reshape(1))[0]
    inv_std = torch.rsqrt(m2 / (n - 1).clamp(min=1.0) + eps)
    acc = torch.float32 if triton_path else accumulation_dtype(x)
    return torch.stack([mean, inv_std, n]).to(acc)


def _global_whiten_apply(x, keep, stats, shift_mean: bool, triton_path: bool) -> torch.Tensor:
    if triton_path:
        from rftengine.kernels import gae as kernel

        return kernel.whiten_apply(x, keep, stats, shift_mean)
    mean, inv_std, _ = stats.unbind()
    k = torch.ones(x.shape, dtype=stats.dtype, device=x.device) if keep is None else keep.to(stats.dtype)
    xv = _zeros_where_masked(x, keep, stats.dtype)
    return ((xv - mean) * inv_std + (0.0 if shift_mean else mean)) * k


def _global_whiten_backward(x, keep, stats, grad, shift_mean: bool, triton_path: bool, reduce):
    """The backward of whiten over every process's entries: the two sums it reads (Σg and
    Σg·y over valid entries) are summed over the processes, the rest is elementwise."""
    mean, inv_std, n = stats.unbind()
    if triton_path:
        from rftengine.kernels import gae as kernel

        g_sum, gy_sum = reduce(kernel.whiten_grad_sums(x, keep, stats, grad).sum(-1).double()).to(stats.dtype)
        coef = inv_std * gy_sum / (n - 1).clamp(min=1.0)
        return kernel.whiten_backward_apply(x, keep, torch.stack([mean, inv_std, g_sum / n.clamp(min=1.0), coef]),
                                            grad, shift_mean)
    acc = stats.dtype
    k = torch.ones(x.shape, dtype=acc, device=x.device) if keep is None else keep.to(acc)
    y = (_zeros_where_masked(x, keep, acc) - mean) * inv_std * k
    g = grad.to(acc) * k
    g_sum, gy_sum = reduce(torch.stack([g.sum(), (g * y).sum()]).double()).to(acc)
    coef = inv_std * gy_sum / (n - 1).clamp(min=1.0)
    g_mean = g_sum / n.clamp(min=1.0)
    dx = inv_std * (g - g_mean) - coef * y + (0.0 if shift_mean else g_mean)
    return (dx * k).to(x.dtype)


class _Whiten(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, shift_mean, eps, triton_path, reduce):
        if reduce is not None:
            stats = _global_whiten_stats(x, keep, eps, triton_path, reduce)
            y = _global_whiten_apply(x, keep, stats, shift_mean, triton_path)
        else:
            forward_impl = _whiten_forward_triton if triton_path else whiten_forward_reference
            y, stats = forward_impl(x, keep, shift_mean, eps)
        ctx.save_for_backward(x, keep, stats)
        ctx.shift_mean, ctx.triton_path, ctx.reduce = shift_mean, triton_path, reduce
        return y

    @staticmethod
    def backward(ctx, grad):
        x, keep, stats = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        if ctx.reduce is not None:
            dx = _global_whiten_backward(x, keep, stats, grad.contiguous(), ctx.shift_mean, ctx.triton_path,
                                         ctx.reduce)
        else:
            backward_impl = _whiten_backward_triton if ctx.triton_path else whiten_backward_reference
            dx = backward_impl(x, keep, stats, grad.contiguous(), ctx.shift_mean)
        return dx, None, None, None, None, None


@deprecated_call_forms(positional=("mask",))
def whiten(
    x: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalise x with the mean and variance of its valid entries only.

    ``y = (x - μ) / sqrt(σ² + eps)`` with μ, σ² (Bessel-corrected, ``Σ(x - μ)² / (n - 1)``)
    over the n valid entries; with ``shift_mean=False`` the mean is added back
    (``y + μ``: rescale only, as TRL's ``masked_whiten``). Masked entries return 0; with no
    valid entry everything is 0 and the gradient is 0.

    Args:
        x: ``[...]`` float (typically advantages ``[B, T]``).
        mask: same shape, bool or 0/1, or None (all valid). Masked entries are not read.
        shift_mean: subtract the mean (True) or keep it.
        eps: > 0, added to the variance.
        reduce: None, or a function that sums a tensor over the processes of a data-parallel
            run (``rftengine.distributed.all_reduce_sum``): then μ, σ² and n are those of every
            process's valid entries together, and so are the sums the gradient reads, so each
            process gets its rows of the whitened concatenated batch. Every process must call
            it (forward and backward are collectives). The moments are then accumulated in
            float64 (no power-of-two scaling needed for any fp32 x).

    Returns:
        ``[...]`` float32 (float64 for float64 x), differentiable w.r.t. x; empty for an
        empty x. The statistics are computed on x scaled by a power of two (exact), so values
        around 1e20, whose squares overflow fp32, whiten like values around 1.
    """
    check_floating("x", x)
    device = check_same_device(x=x, mask=mask)
    keep = as_mask("mask", mask, x.shape, device)
    check_positive("eps", eps)
    if reduce is not None and not callable(reduce):
        raise ValueError(f"reduce must be None or a function summing a tensor over processes, got {reduce!r}")
    _check_finite_where("x", x, keep)
    triton_path = use_triton(x) and accumulation_dtype(x) == torch.float32
    y = _Whiten.apply(
        # reshape(-1) of a strided 1-D view is that view: the kernels need unit stride
        x.reshape(-1).contiguous(), keep.reshape(-1).contiguous() if keep is not None else None,
        bool(shift_mean), float(eps), triton_path, reduce,
    )
    return y.view(x.shape)


# ---------------------------------------------------------------- group-relative advantages


def _centered(s: torch.Tensor) -> torch.Tensor:
    """s [n_groups, G] - group mean, computed from s - s[:, 0] so that a constant group gives
    exactly 0: fp32 rounding of its mean would leave a residue that 1/(std + eps) blows up."""
    d = s - s[:, :1]
    return d - d.mean(1, keepdim=True)


def _bessel_std(v: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Bessel std of centred values over `dim` (None: all), on max-abs-scaled values: v² would
    overflow fp32 from |v| ~ 1e19. 0 exactly where every v is 0."""
    n = v.numel() if dim is None else v.shape[dim]
    m = v.abs().amax() if dim is None else v.abs().amax(dim, keepdim=True)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    r = v / safe
    return safe * ((r * r).sum() if dim is None else (r * r).sum(dim, keepdim=True)).div(n - 1).sqrt()


def _group_stats_reference(s: torch.Tensor, scale: str):
    """s [n_groups, G] -> (u = s - group mean, std [n_groups, 1] or 0-d or None, v = s - scope mean)."""
    u = _centered(s)
    if scale == "group":
        return u, _bessel_std(u, 1), u
    if scale == "batch":
        v = s - s.mean()
        return u, _bessel_std(v, None), v
    return u, None, None


def group_advantages_forward_reference(scores, group_size: int, factor: float, scale: str, eps: float):
    acc = accumulation_dtype(scores)
    u, std, _ = _group_stats_reference(scores.to(acc).view(-1, group_size), scale)
    y = factor * u
    if std is not None:
        y = y / (std + eps)
    return y.reshape(-1)


def group_advantages_backward_reference(scores, group_size: int, factor: float, scale: str, eps: float, grad):
    """Closed form: ``d s_i = k/c·(g_i - ḡ_group) - k·Σ_scope(g·u)/c²·dσ/ds_i``.

    c = σ + eps with σ the std over the scope (group or batch), ``dσ/ds_i = v_i / ((n-1)σ)``
    (v = s - scope mean), taken as 0 when σ = 0 so a constant group stays finite.
    """
    acc = accumulation_dtype(scores)
    s = scores.to(acc).view(-1, group_size)
    g = grad.to(acc).view_as(s)
    u, std, v = _group_stats_reference(s, scale)
    g_centered = g - g.mean(1, keepdim=True)
    if std is None:
        return (factor * g_centered).reshape(-1).to(scores.dtype)
    c = std + eps
    if scale == "group":
        gu, n = (g * u).sum(1, keepdim=True), group_size
    else:
        gu, n = (g * u).sum(), s.numel()
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    dstd = torch.where(std > 0, v / ((n - 1) * safe_std), torch.zeros_like(v))
    # gu / c / c, not gu / c²: c² overflows fp32 for scores around 1e20
    return (factor * (g_centered / c - gu / c / c * dstd)).reshape(-1).to(scores.dtype)


class _GroupAdvantages(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, group_size, factor, scale, eps, triton_path):
        if triton_path:
            from rftengine.kernels import gae as kernel

            out = kernel.group_advantages_forward(scores, group_size, factor, kernel.GROUP_SCALES[scale], eps)
        else:
            out = group_advantages_forward_reference(scores, group_size, factor, scale, eps)
        ctx.save_for_backward(scores)
        ctx.args, ctx.triton_path = (group_size, factor, scale, eps), triton_path
        return out

    @staticmethod
    def backward(ctx, grad):
        (scores,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        group_size, factor, scale, eps = ctx.args
        if ctx.triton_path:
            from rftengine.kernels import gae as kernel

            grad_s = kernel.group_advantages_backward(
                scores, group_size, factor, kernel.GROUP_SCALES[scale], eps, grad.contiguous()
            )
        else:
            grad_s = group_advantages_backward_reference(scores, group_size, factor, scale, eps, grad)
        return grad_s, None, None, None, None, None


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    *,
    mode: str = "grpo",
    scale: str = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Critic-free advantages from the scores of ``group_size`` responses per prompt.

    ``scores`` holds consecutive groups: entries ``[i*G, (i+1)*G)`` answer prompt i.
    With μ_g the group mean and G the group size:

    - ``mode="grpo"`` (Shao et al., 2024, DeepSeekMath): ``A_i = s_i - μ_g``;
    - ``mode="rloo"`` (Ahmadian et al., 2024): ``A_i = s_i - mean_{j≠i} s_j
      = G/(G-1)·(s_i - μ_g)``;

    then divided by ``σ + eps`` according to ``scale``:

    - ``"group"``: σ = std of the group's scores (GRPO);
    - ``"batch"``: σ = std of all B scores (group mean, batch std: Liu et al. 2025,
      "Part I: Tricks or Traps?", Lite PPO);
    - ``"none"``: no division (Dr. GRPO; the usual RLOO).

    Standard deviations are Bessel-corrected (``/(n-1)``), as ``torch.std``.

    Args:
        scores: ``[B]`` float, finite; ``B = n_prompts * group_size``.
        group_size: int >= 2 dividing B.
        mode: ``"grpo"`` or ``"rloo"``. scale: ``"group"``, ``"batch"`` or ``"none"``.
        eps: > 0, keeps a constant group (σ = 0) at advantage 0.

    Returns:
        ``[B]`` float32 (float64 for float64 scores), differentiable w.r.t. scores (σ's
        derivative is taken as 0 where σ = 0). A constant group (σ = 0) gets exactly 0 on
        both backends; σ is computed on max-abs-scaled deviations, so scores around 1e20
        (whose squares overflow fp32) keep their advantages.
    """
    check_floating("scores", scores)
    check_ndim("scores", scores, (1,), "[B] (one score per response)")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (responses per prompt), got {group_size!r}")
    if scores.shape[0] % group_size:
        raise ValueError(
            f"group_size={group_size} must divide the number of scores (B = n_prompts * group_size), "
            f"got B={scores.shape[0]}"
        )
    check_choice("mode", mode, GROUP_MODES)
    check_choice("scale", scale, GROUP_SCALES)
    check_positive("eps", eps)
    check_finite("scores", scores)
    factor = group_size / (group_size - 1) if mode == "rloo" else 1.0
    triton_path = use_triton(scores) and accumulation_dtype(scores) == torch.float32
    return _GroupAdvantages.apply(scores.contiguous(), group_size, factor, scale, float(eps), triton_path)
