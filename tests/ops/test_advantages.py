"""gae, whiten and group_advantages on both backends against float64 oracles written from the
formulas in `docs/conventions.md` ("GAE") and the ops' docstrings.

GAE sums at most T geometric terms of O(1) fp32 values: rtol 1e-5 / atol 1e-5. Whitening and
group normalisation divide by standard deviations of O(1) inputs: same tolerances.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from rftengine.ops.advantages import gae, group_advantages, whiten
from tests.ops.helpers import assert_close_f64

F64 = torch.float64


_close = partial(assert_close_f64, atol=1e-5)  # this file's default tolerance


# ---------------------------------------------------------------- GAE


def gae_oracle(rewards, values, mask, gamma, lam):
    """Per sequence, over its valid positions only: δ = r + γ V_next - V, A = δ + γλ A_next."""
    r = rewards.detach().to(F64).requires_grad_()
    v = values.detach().to(F64).requires_grad_()
    b, t = r.shape
    keep = torch.ones(b, t, dtype=torch.bool) if mask is None else mask.bool().cpu()
    adv = [[r.new_zeros(()) for _ in range(t)] for _ in range(b)]
    for i in range(b):
        valid = [j for j in range(t) if keep[i, j]]
        a_next, v_next = r.new_zeros(()), r.new_zeros(())
        for j in reversed(valid):
            delta = r[i, j] + gamma * v_next - v[i, j]
            a_next = delta + gamma * lam * a_next
            v_next = v[i, j]
            adv[i][j] = a_next
    adv = torch.stack([torch.stack(row) for row in adv])
    ret = torch.where(keep.to(r.device), adv + v, 0)
    g_adv, g_ret = torch.randn(b, t, dtype=F64), torch.randn(b, t, dtype=F64)
    d_r, d_v = torch.autograd.grad((adv * g_adv.to(r.device)).sum() + (ret * g_ret.to(r.device)).sum(), (r, v))
    return adv.detach(), ret.detach(), d_r, d_v, g_adv.to(r.device), g_ret.to(r.device)


def _masks(kind, b, t, device):
    lengths = torch.randint(1, t + 1, (b,))
    lengths[0] = t
    lengths[-1] = 1
    pos = torch.arange(t)
    if kind == "right":
        mask = pos[None, :] < lengths[:, None]
    elif kind == "left":
        mask = pos[None, :] >= (t - lengths)[:, None]
    elif kind == "gaps":
        mask = torch.rand(b, t) > 0.4
        mask[1] = False  # an empty row
    else:
        return None
    return mask.to(device)


@pytest.mark.parametrize("kind", ["right", "left", "gaps", "none"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_oracle(backend, device, kind, gamma, lam):
    b, t = 3, 23
    rewards = torch.randn(b, t).to(device).requires_grad_()
    values = torch.randn(b, t).to(device).requires_grad_()
    mask = _masks(kind, b, t, device)
    adv, ret = gae(rewards, values, mask=mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret, exp_dr, exp_dv, g_adv, g_ret = gae_oracle(rewards, values, mask, gamma, lam)
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    _close(adv, exp_adv)
    _close(ret, exp_ret)
    d_r, d_v = torch.autograd.grad((adv * g_adv.float()).sum() + (ret * g_ret.float()).sum(), (rewards, values))
    _close(d_r, exp_dr)
    _close(d_v, exp_dv)


def test_gae_long_rows_cross_scan_blocks(backend, device):
    # T above the kernel's 256-token scan block: carries between blocks, gaps across the border
    b, t = 2, 300
    rewards = torch.randn(b, t).to(device).requires_grad_()
    values = torch.randn(b, t).to(device).requires_grad_()
    mask = torch.rand(b, t).to(device) > 0.2
    mask[0, 250:262] = False
    adv, ret = gae(rewards, values, mask=mask, gamma=0.99, lam=0.95)
    exp_adv, exp_ret, exp_dr, exp_dv, g_adv, g_ret = gae_oracle(rewards, values, mask, 0.99, 0.95)
    _close(adv, exp_adv)
    _close(ret, exp_ret)
    d_r, d_v = torch.autograd.grad((adv * g_adv.float()).sum() + (ret * g_ret.float()).sum(), (rewards, values))
    _close(d_r, exp_dr)
    _close(d_v, exp_dv)
    # only one output used: the other's gradient is None inside the backward
    adv, _ = gae(rewards, values, mask=mask, gamma=0.99, lam=0.95)
    (d_r,) = torch.autograd.grad((adv * g_adv.float()).sum(), rewards)
    assert torch.isfinite(d_r).all() and d_r.abs().max() > 0


def test_gae_closed_form(backend, device):
    rewards = torch.tensor([[0.0, 0.0, 1.0]], device=device)
    values = torch.full((1, 3), 0.5, device=device)
    adv, ret = gae(rewards, values, mask=None, gamma=1.0, lam=1.0)  # Monte Carlo: A = 1 - V
    _close(adv, torch.full((1, 3), 0.5, dtype=F64))
    _close(ret, torch.ones(1, 3, dtype=F64))
    adv, _ = gae(rewards, values, mask=None, gamma=1.0, lam=0.0)  # one-step TD errors
    _close(adv, torch.tensor([[0.0, 0.0, 0.5]], dtype=F64))


def test_gae_left_and_right_padding_agree(backend, device):
    rewards = torch.randn(1, 6).to(device)
    values = torch.randn(1, 6).to(device)
    right = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool, device=device)
    left = right.flip(-1)
    adv_r, ret_r = gae(rewards, values, mask=right)
    adv_l, ret_l = gae(rewards.roll(2, -1), values.roll(2, -1), mask=left)
    torch.testing.assert_close(adv_r[:, :4], adv_l[:, 2:])
    torch.testing.assert_close(ret_r[:, :4], ret_l[:, 2:])
    assert adv_r[:, 4:].abs().max() == 0 and adv_l[:, :2].abs().max() == 0


def test_gae_empty_mask_and_padding_not_read(backend, device):
    rewards = torch.full((2, 5), float("nan"), device=device, requires_grad=True)
    values = torch.full((2, 5), float("inf"), device=device, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool, device=device)
    adv, ret = gae(rewards, values, mask=mask)
    d_r, d_v = torch.autograd.grad(adv.sum() + ret.sum(), (rewards, values))
    for x in (adv, ret, d_r, d_v):
        assert x.abs().max() == 0


def test_gae_errors():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="gamma"):
        gae(x, x, mask=None, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        gae(x, x, mask=None, lam=-0.1)
    with pytest.raises(ValueError, match="values"):
        gae(x, torch.zeros(2, 5), mask=None)
    with pytest.raises(ValueError, match="rewards"):
        gae(torch.full((2, 4), float("nan")), x, mask=None)
    with pytest.raises(ValueError, match="rewards"):
        gae(torch.zeros(8), torch.zeros(8), mask=None)


# ---------------------------------------------------------------- whiten


def whiten_oracle(x, mask, shift_mean):
    keep = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    xv = x.detach().to(F64).requires_grad_()
    vals = xv[keep]
    mean = vals.mean()
    var = vals.var() if vals.numel() > 1 else vals.new_zeros(())
    y = (xv - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        y = y + mean
    y = torch.where(keep, y, 0)
    g = torch.randn(y.shape, dtype=y.dtype).to(y.device)
    (d_x,) = torch.autograd.grad((y * g).sum(), xv)
    return y.detach(), d_x, g


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape,masked", [((4, 37), True), ((3, 700), True), ((1, 5), False)])
def test_whiten_matches_oracle(backend, device, shift_mean, shape, masked):
    x = (3 * torch.randn(shape) + 1).to(device).requires_grad_()
    mask = (torch.rand(shape).to(device) > 0.3) if masked else None
    y = whiten(x, mask=mask, shift_mean=shift_mean)
    exp_y, exp_dx, g = whiten_oracle(x, mask, shift_mean)
    _close(y, exp_y)
    (d_x,) = torch.autograd.grad((y * g.float()).sum(), x)
    _close(d_x, exp_dx)
    valid = y[mask] if mask is not None else y.flatten()
    if shift_mean:
        assert abs(valid.mean().item()) < 1e-5 and abs(valid.std().item() - 1) < 1e-4


def test_whiten_empty_and_single(backend, device):
    x = torch.randn(2, 6).to(device).requires_grad_()
    mask = torch.zeros(2, 6, dtype=torch.bool, device=device)
    y = whiten(x, mask=mask)
    (d_x,) = torch.autograd.grad(y.sum(), x)
    assert y.abs().max() == 0 and d_x.abs().max() == 0
    mask[1, 3] = True  # one valid entry: centred to 0, finite gradient
    y = whiten(x, mask=mask)
    (d_x,) = torch.autograd.grad((y * torch.randn(y.shape, dtype=y.dtype).to(y.device)).sum(), x)
    assert y.abs().max() == 0 and torch.isfinite(d_x).all()


def test_whiten_errors():
    with pytest.raises(ValueError, match="eps"):
        whiten(torch.zeros(3), mask=None, eps=0.0)
    with pytest.raises(ValueError, match="mask"):
        whiten(torch.zeros(3), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="x"):
        whiten(torch.tensor([1.0, float("nan")]), mask=None)


# ---------------------------------------------------------------- group advantages


def group_oracle(scores, group_size, mode, scale, eps=1e-6):
    s = scores.detach().to(F64).requires_grad_()
    groups = s.view(-1, group_size)
    if mode == "grpo":
        a = groups - groups.mean(1, keepdim=True)
    else:  # leave-one-out baseline written directly
        others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
        a = groups - others
    if scale == "group":
        a = a / (groups.std(1, keepdim=True) + eps)
    elif scale == "batch":
        a = a / (s.std() + eps)
    a = a.reshape(-1)
    g = torch.randn(a.shape).to(F64)  # fp32 values: the op sees exactly this g
    (d_s,) = torch.autograd.grad((a * g).sum(), s)
    return a.detach(), d_s, g


def group_tolerances(scores, group_size, mode, scale, g, eps=1e-6):
    """Per-entry fp32 error bounds of group_advantages (forward, backward) from its arithmetic.

    Centring rounds each deviation by a few ulps of the largest score M of the scope (group;
    batch for scale="batch"): absolute error ~ u·M with u = 2^-24. Dividing by σ + eps turns
    that into u·k·M/σ (k the RLOO factor). The backward terms are g/σ and g·(s - μ)²/σ³, so
    the same rounding costs u·k·|g|max/σ·(1 + M/σ)². With σ small (two close scores in a
    group of 2) both grow without bound: a fixed atol passes or fails by the draw. The factor
    16 covers the handful of roundings (measured: at most 5.2x the bare bound over 200 seeds,
    both backends).
    """
    unit = 16 * 2.0**-24 * (group_size / (group_size - 1) if mode == "rloo" else 1.0)
    s = scores.detach().to(F64).cpu().view(-1, group_size)
    gg = g.view(-1, group_size).abs()
    if scale == "batch":
        m, gm, sigma = s.abs().amax(), gg.amax(), s.std() + eps
    else:
        m, gm = s.abs().amax(1, keepdim=True), gg.amax(1, keepdim=True)
        sigma = s.std(1, keepdim=True) + eps if scale == "group" else torch.ones((), dtype=F64)
    fwd = unit * m / sigma
    bwd = unit * gm / sigma * (1 + m / sigma) ** 2
    return fwd.expand_as(s).reshape(-1), bwd.expand_as(s).reshape(-1)


@pytest.mark.parametrize("mode", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size,n_groups", [(5, 3), (2, 4), (3, 600)])
def test_group_advantages_match_oracle(backend, device, mode, scale, group_size, n_groups):
    scores = torch.randn(group_size * n_groups).to(device).requires_grad_()
    adv = group_advantages(scores, group_size, mode=mode, scale=scale)
    exp_adv, exp_ds, g = group_oracle(scores, group_size, mode, scale)
    (d_s,) = torch.autograd.grad((adv * g.float().to(device)).sum(), scores)
    fwd_tol, bwd_tol = group_tolerances(scores, group_size, mode, scale, g)
    for name, got, expected, tol in (("advantages", adv, exp_adv, fwd_tol), ("d_scores", d_s, exp_ds, bwd_tol)):
        err = (got.detach().cpu().to(F64) - expected.cpu()).abs()
        bound = 1e-6 * expected.cpu().abs() + tol
        assert (err <= bound).all(), f"{name}: error {float((err / bound).max()):.2f}x the bound"


def test_group_advantages_closed_form(backend, device):
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0], device=device)
    a = group_advantages(scores, 2, mode="grpo", scale="group")
    # group (1, 0): mean 0.5, std sqrt(0.5) -> ±0.5/sqrt(0.5) = ±sqrt(0.5)
    _close(a, torch.tensor([1, -1, -1, 1], dtype=F64) * math.sqrt(0.5), rtol=1e-5)
    a = group_advantages(scores, 2, mode="rloo", scale="none")  # s_i - the other one
    _close(a, torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64))
    a = group_advantages(torch.tensor([3.0, 1.0, 2.0], device=device), 3, mode="grpo", scale="none")
    _close(a, torch.tensor([1.0, -1.0, 0.0], dtype=F64))


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_group_advantages_constant_groups(backend, device, scale):
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], device=device, requires_grad=True)
    a = group_advantages(scores, 3, scale=scale)
    (d_s,) = torch.autograd.grad((a * torch.randn(a.shape, dtype=a.dtype).to(a.device)).sum(), scores)
    assert a.abs().max() == 0 and torch.isfinite(d_s).all()


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group_size=3 must divide"):
        group_advantages(torch.zeros(10), 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(10), 1)
    with pytest.raises(ValueError, match="mode"):
        group_advantages(torch.zeros(4), 2, mode="ppo")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="global")
    with pytest.raises(ValueError, match="scores"):
        group_advantages(torch.tensor([0.0, float("inf")]), 2)
    with pytest.raises(ValueError, match="scores"):
        group_advantages(torch.zeros(2, 2), 2)


@pytest.mark.parametrize("mode", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [2, 3, 8, 16, 64])
def test_group_advantages_constant_groups_exactly_zero(backend, device, mode, scale, group_size):
    """A zero-variance group gets exactly 0, whatever its value: fp32 rounding of the group
    mean must not leave a residue that the division by std + eps blows up (eight times 0.7
    gave ±0.056)."""
    constants = torch.tensor([0.7, 0.1, 1e-3, 123.456, -2.3, 1e20])
    scores = constants.repeat_interleave(group_size)
    varied = torch.arange(group_size, dtype=torch.float32)  # one non-constant group
    scores = torch.cat([scores, varied]).to(device).requires_grad_()
    a = group_advantages(scores, group_size, mode=mode, scale=scale)
    assert (a[: -group_size] == 0).all(), a[: -group_size].abs().max()
    assert a[-group_size:].abs().min() > 0 or group_size % 2  # the varied group is not zeroed
    (d_s,) = torch.autograd.grad((a * torch.linspace(-1, 1, a.numel(), device=device)).sum(), scores)
    assert torch.isfinite(d_s).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("magnitude", [1e20, 1e30, 1e-20])
def test_group_advantages_extreme_magnitudes(backend, device, scale, magnitude):
    """Scores around 1e20 (squares overflow fp32) or 1e-20 keep their advantages: the std is
    computed on max-abs-scaled deviations. Oracle: float64 on the same fp32 scores."""
    base = torch.tensor([3.0, -1.0, 0.5, 2.0, 1.0, 1.5, -0.25, 4.0])
    scores = (base * magnitude).to(device).requires_grad_()
    a = group_advantages(scores, 4, scale=scale)
    exp_a, exp_ds, g = group_oracle(scores, 4, "grpo", scale, eps=1e-6)
    if scale == "none":
        _close(a, exp_a, rtol=1e-5, atol=0)
    else:
        # eps = 1e-6 is negligible beside a std of 1e20, dominant beside 1e-20: the oracle has it
        _close(a, exp_a, rtol=1e-5, atol=1e-6)
        assert a.abs().max() > 0.1 or magnitude < 1
    (d_s,) = torch.autograd.grad((a * g.float()).sum(), scores)
    if magnitude > 1:  # gradients of size 1/std ~ 1e-20: relative comparison
        _close(d_s / exp_ds.abs().max(), exp_ds / exp_ds.abs().max(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_whiten_extreme_magnitudes(backend, device, shift_mean, magnitude):
    """Values around 1e20 whiten like values around 1: (x - μ)² would overflow fp32."""
    x = ((3 * torch.randn(4, 37) + 1) * magnitude).to(device).requires_grad_()
    mask = (torch.rand(4, 37) > 0.3).to(device)
    y = whiten(x, mask=mask, shift_mean=shift_mean)
    exp_y, exp_dx, g = whiten_oracle(x, mask, shift_mean)
    scale = exp_y.abs().max()
    _close(y / scale, exp_y / scale)
    valid = y[mask]
    if shift_mean:
        assert abs(valid.mean().item()) < 1e-5 and abs(valid.std().item() - 1) < 1e-4
    (d_x,) = torch.autograd.grad((y * g.float()).sum(), x)
    d_scale = exp_dx.abs().max()
    _close(d_x / d_scale, exp_dx / d_scale)


class _ThreadSum:
    """``reduce`` for whiten over ``n`` threads standing in for processes: each call returns
    the sum of the n threads' tensors (calls pair up in order, as collectives do)."""

    def __init__(self, n):
        import threading

        self.barrier = threading.Barrier(n, timeout=60)  # a thread that failed breaks it: no hang
        self.parts: dict[int, torch.Tensor] = {}
        self.lock = threading.Lock()

    def __call__(self, t):
        import threading

        with self.lock:
            self.parts[threading.get_ident()] = t.detach().cpu()
        self.barrier.wait()
        total = sum(self.parts.values()).to(t.device)
        self.barrier.wait()  # every thread has read the sum before the next call overwrites it
        return total


def _in_threads(fns):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(len(fns)) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("magnitude", [1.0, 1e30])
def test_whiten_reduce_equals_whiten_of_concatenated_batch(monkeypatch, device, shift_mean, magnitude):
    """Two "processes" (threads) whitening their rows with a summing ``reduce`` get the rows of
    the whitened concatenated batch, values and gradients; a process with no valid entry too.
    The torch path only: Triton's interpreter is not thread-safe (both backends run in real
    processes in tests/distributed/test_distributed.py)."""
    monkeypatch.setenv("RFTENGINE_BACKEND", "torch")
    x = ((3 * torch.randn(6, 37) + 1) * magnitude).to(device)
    mask = (torch.rand(6, 37) > 0.3).to(device)
    mask[5] = False
    exp_y, exp_dx, g = whiten_oracle(x, mask, shift_mean)
    reduce = _ThreadSum(2)

    def part(rows):
        xs = x[rows].clone().requires_grad_()
        y = whiten(xs, mask=mask[rows], shift_mean=shift_mean, reduce=reduce)
        (d_x,) = torch.autograd.grad((y * g[rows].float()).sum(), xs)
        return y.detach(), d_x

    (y0, d0), (y1, d1) = _in_threads([lambda: part(slice(0, 4)), lambda: part(slice(4, 6))])
    y, d_x = torch.cat([y0, y1]), torch.cat([d0, d1])
    scale = exp_y.abs().max()
    _close(y / scale, exp_y / scale)
    d_scale = exp_dx.abs().max()
    _close(d_x / d_scale, exp_dx / d_scale)


def test_whiten_reduce_identity_is_whiten(backend, device):
    x = torch.randn(3, 50).to(device)
    mask = (torch.rand(3, 50) > 0.2).to(device)
    _close(whiten(x, mask=mask, reduce=lambda t: t), whiten(x, mask=mask))
    with pytest.raises(ValueError, match="reduce"):
        whiten(x, mask=mask, reduce=3)
