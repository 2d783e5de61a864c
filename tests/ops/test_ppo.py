"""ppo_policy_loss and value_loss on both backends against float64 oracles written from the
formulas in the ops' docstrings and `docs/conventions.md` ("Aggregation").

Per-token terms are O(1) fp32 values and the losses are fp32 sums of at most a few hundred of
them, so rtol 1e-5 / atol 1e-6 covers the accumulation with margin.
"""

from __future__ import annotations

import math

import pytest
import torch

from rftengine.ops.ppo import ppo_policy_loss, value_loss
from tests.ops.helpers import assert_close_f64

F64 = torch.float64


def _agg(l, m, aggregation, loss_constant):
    if aggregation == "token_mean":
        return (l * m).sum() / m.sum().clamp(min=1)
    if aggregation == "seq_mean_token_mean":
        per_seq = (l * m).sum(-1) / m.sum(-1).clamp(min=1)
        nonempty = m.sum(-1) > 0
        return per_seq[nonempty].sum() / nonempty.sum().clamp(min=1)
    c = loss_constant if loss_constant is not None else l.shape[-1]
    return ((l * m).sum(-1) / c).mean()


def policy_oracle(logp, old, adv, mask, *, clip_range=0.2, clip_range_high=0.2, dual_clip=None,
                  aggregation="token_mean", is_weights=None, loss_constant=None):
    """Loss, stats and d loss/d logp in float64, straight from the formulas (autograd)."""
    keep = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.bool()
    lp = logp.detach().to(F64).requires_grad_()
    o = torch.where(keep, old.to(F64), 0)
    a = adv.to(F64) if adv.dim() == 2 else adv.to(F64)[:, None].expand_as(lp)
    a = torch.where(keep, a, 0)
    log_ratio = torch.where(keep, lp, 0) - o
    ratio = torch.exp(torch.clamp(log_ratio, -20, 20))
    unclipped = -a * ratio
    clipped = -a * torch.clamp(ratio, 1 - clip_range, 1 + clip_range_high)
    l = torch.max(unclipped, clipped)
    dual = torch.zeros_like(l, dtype=torch.bool)
    if dual_clip is not None:
        dual = (a < 0) & (l > -a * dual_clip)
        l = torch.where(a < 0, torch.min(l, -a * dual_clip), l)
    if is_weights is not None:
        l = l * torch.where(keep, is_weights.to(F64), 0)
    m = keep.to(F64)
    loss = _agg(l, m, aggregation, loss_constant)
    (grad,) = torch.autograd.grad(loss, lp)
    n = m.sum().clamp(min=1)
    lr = torch.clamp(log_ratio, -20, 20).detach()
    stats = {
        "loss": loss.detach(),
        "clipfrac": ((clipped > unclipped).to(F64) * m).sum() / n,
        # the two sides as TRL's GRPOTrainer defines them, from the ratio and the sign of A
        "clipfrac_low": (((ratio < 1 - clip_range) & (a < 0)).to(F64) * m).sum() / n,
        "clipfrac_high": (((ratio > 1 + clip_range_high) & (a > 0)).to(F64) * m).sum() / n,
        "clipfrac_dual": (dual.to(F64) * m).sum() / n,
        "approx_kl": ((ratio - 1 - lr) * m).sum().detach() / n,
        "ratio_mean": (ratio * m).sum().detach() / n,
        "ratio_max": (ratio * m).max().detach(),
    }
    return loss.detach(), grad, stats


def _inputs(device, b=4, t=37, per_seq=False):
    logp = -3 * torch.rand(b, t)
    old = logp + 0.8 * torch.randn(b, t)
    adv = 2 * torch.randn((b,) if per_seq else (b, t))
    mask = torch.rand(b, t) > 0.25
    # every clip is reached by construction, not by the luck of the draw: token 0 of row 0
    # has A < 0 and ratio 5 (above every dual_clip tested: dual-clipped), token 0 of row 1
    # A > 0 and ratio 5 (above 1 + clip_range_high: clipped high), token 0 of row 2 A < 0 and
    # ratio 0.5 (below 1 - clip_range: clipped low)
    ratios, signs = torch.tensor([5.0, 5.0, 0.5])[:b], torch.tensor([-1.0, 1.0, -1.0])[:b]
    rows = slice(0, len(ratios))
    old[rows, 0] = logp[rows, 0] - ratios.log()
    first = (rows,) if per_seq else (rows, 0)
    adv[first] = adv[first].abs().add(0.5) * signs
    mask[rows, 0] = True
    return logp.to(device).requires_grad_(), old.to(device), adv.to(device), mask.to(device)


CASES = [
    dict(aggregation="token_mean"),
    dict(aggregation="seq_mean_token_mean"),
    dict(aggregation="token_sum_norm"),
    dict(aggregation="token_sum_norm", loss_constant=100.0),
    dict(aggregation="token_mean", clip_range=0.2, clip_range_high=0.28, dual_clip=3.0),
    dict(aggregation="seq_mean_token_mean", dual_clip=1.5, is_weights=True),
    dict(aggregation="token_mean", is_weights=True, per_seq=True),
    dict(aggregation="token_sum_norm", clip_range=0.1, clip_range_high=0.3, per_seq=True, dual_clip=2.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_policy_matches_oracle(backend, device, case):
    case = dict(case)
    logp, old, adv, mask = _inputs(device, per_seq=case.pop("per_seq", False))
    if case.pop("is_weights", False):
        case["is_weights"] = torch.rand(logp.shape).to(device) * 2
    loss, stats = ppo_policy_loss(logp, old, adv, mask=mask, **case)
    exp_loss, exp_grad, exp_stats = policy_oracle(logp, old, adv, mask, **case)
    assert_close_f64(loss, exp_loss)
    (grad,) = torch.autograd.grad(loss, logp)
    assert_close_f64(grad, exp_grad)
    assert set(stats) == set(exp_stats)
    for k, v in exp_stats.items():
        assert not stats[k].requires_grad
        assert_close_f64(stats[k], v)
    if "dual_clip" in case:
        assert stats["clipfrac_dual"] > 0  # the inputs do exercise the dual clip
    assert stats["clipfrac_low"] > 0 and stats["clipfrac_high"] > 0
    # the sides partition the clipped tokens: equal up to the rounding of the divisions
    torch.testing.assert_close(stats["clipfrac_low"] + stats["clipfrac_high"], stats["clipfrac"],
                               rtol=2e-7, atol=0)


@pytest.mark.parametrize("per_seq", [False, True])
def test_policy_long_rows_span_kernel_blocks(backend, device, per_seq):
    logp, old, adv, mask = _inputs(device, b=2, t=1100, per_seq=per_seq)
    mask[1, 1000:] = False
    for aggregation in ("token_mean", "seq_mean_token_mean"):
        loss, stats = ppo_policy_loss(logp, old, adv, mask=mask, aggregation=aggregation, dual_clip=2.0)
        exp_loss, exp_grad, exp_stats = policy_oracle(
            logp, old, adv, mask, aggregation=aggregation, dual_clip=2.0
        )
        assert_close_f64(loss, exp_loss)
        (grad,) = torch.autograd.grad(loss, logp)
        assert_close_f64(grad, exp_grad)
        for k, v in exp_stats.items():
            assert_close_f64(stats[k], v)
    values = torch.randn(2, 1100).to(device).requires_grad_()
    loss, _ = value_loss(values, old, adv if not per_seq else old + 1, mask=mask)
    exp_loss, exp_grad, _ = value_oracle(values, old, adv if not per_seq else old + 1, mask)
    assert_close_f64(loss, exp_loss)
    (grad,) = torch.autograd.grad(loss, values)
    assert_close_f64(grad, exp_grad)


def test_policy_bf16(backend, device):
    logp, old, adv, mask = _inputs(device, b=3, t=29)
    logp16 = logp.detach().bfloat16().requires_grad_()
    loss, _ = ppo_policy_loss(logp16, old.bfloat16(), adv.bfloat16(), mask=mask)
    exp_loss, exp_grad, _ = policy_oracle(logp16, old.bfloat16(), adv.bfloat16(), mask)
    assert loss.dtype == torch.float32
    assert_close_f64(loss, exp_loss)
    (grad,) = torch.autograd.grad(loss, logp16)
    assert grad.dtype == torch.bfloat16
    assert_close_f64(grad, exp_grad, rtol=1e-2, atol=1e-4)


def test_policy_closed_form(backend, device):
    # ratios 1.5 (A=+1) and 0.5 (A=-1) are both clipped: l = [-1.2, 0.8]; ratio 1.1 (A=2) is not
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]], device=device, requires_grad=True)
    old = torch.zeros(1, 3, device=device)
    adv = torch.tensor([[1.0, -1.0, 2.0]], device=device)
    loss, stats = ppo_policy_loss(logp, old, adv, mask=None)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["clipfrac_low"].item() == pytest.approx(1 / 3) and stats["clipfrac_high"].item() == pytest.approx(1 / 3)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, -2.2 / 3]], device=device))
    # dual clip 3 caps A=-1 at ratio 4: l = min(4, 3) = 3
    logp = torch.tensor([[math.log(4.0)]], device=device)
    loss, stats = ppo_policy_loss(logp, torch.zeros(1, 1, device=device), torch.tensor([-1.0], device=device),
                                  mask=None, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0) and stats["clipfrac_dual"].item() == 1.0


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "token_sum_norm"])
def test_policy_empty_rows_and_length_one(backend, device, aggregation):
    logp, old, adv, _ = _inputs(device, b=3, t=1)
    mask = torch.tensor([[True], [False], [True]], device=device)
    loss, _ = ppo_policy_loss(logp, old, adv, mask=mask, aggregation=aggregation)
    exp_loss, exp_grad, _ = policy_oracle(logp, old, adv, mask, aggregation=aggregation)
    assert_close_f64(loss, exp_loss)
    (grad,) = torch.autograd.grad(loss, logp)
    assert_close_f64(grad, exp_grad)
    assert grad[1].abs().max() == 0
    # nothing valid at all: finite zero loss, zero gradient, zero stats
    loss, stats = ppo_policy_loss(logp, old, adv, mask=torch.zeros_like(mask), aggregation=aggregation)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0 and grad.abs().max() == 0
    assert all(torch.isfinite(v) and v.item() == 0 for v in stats.values())


def test_policy_extreme_logps_and_zero_advantages(backend, device):
    sign = torch.where(torch.rand(3, 17).to(device) > 0.5, 1.0, -1.0)
    logp = (1e4 * sign).requires_grad_()
    old = -1e4 * sign
    adv = torch.randn(3, 17).to(device)
    loss, stats = ppo_policy_loss(logp, old, adv, mask=None, dual_clip=3.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in stats.values())
    loss, _ = ppo_policy_loss(logp, old, torch.zeros(3, device=device), mask=None)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0 and grad.abs().max() == 0


def test_policy_masked_padding_not_read(backend, device):
    logp, old, adv, mask = _inputs(device, b=2, t=9)
    bad = ~mask
    loss_a, _ = ppo_policy_loss(logp, old, adv, mask=mask)
    garbage_old = old.masked_fill(bad, float("-inf"))
    loss_b, _ = ppo_policy_loss(logp, garbage_old, adv.masked_fill(bad, float("nan")), mask=mask)
    torch.testing.assert_close(loss_a, loss_b)


def value_oracle(values, old_values, returns, mask, clip=0.2, aggregation="token_mean"):
    keep = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    v = values.detach().to(F64).requires_grad_()
    r = returns.to(F64)
    l = (v - r) ** 2
    clipped = torch.zeros_like(l, dtype=torch.bool)
    if clip is not None:
        vo = old_values.to(F64)
        lc = (torch.clamp(v, vo - clip, vo + clip) - r) ** 2
        clipped = lc > l
        l = torch.max(l, lc)
    l = 0.5 * l
    m = keep.to(F64)
    loss = _agg(torch.where(keep, l, 0), m, aggregation, None)
    (grad,) = torch.autograd.grad(loss, v)
    n = m.sum().clamp(min=1)
    stats = {
        "loss": loss.detach(),
        "clipfrac": (clipped.to(F64) * m).sum() / n,
        "values/mean": (v.detach() * m).sum() / n,
        "returns/mean": (r * m).sum() / n,
    }
    return loss.detach(), grad, stats


@pytest.mark.parametrize("clip", [0.2, None])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "token_sum_norm"])
def test_value_matches_oracle(backend, device, clip, aggregation):
    values = torch.randn(4, 33).to(device).requires_grad_()
    old_values = values.detach() + 0.3 * torch.randn(4, 33).to(device)
    returns = torch.randn(4, 33).to(device)
    mask = torch.rand(4, 33).to(device) > 0.3
    mask[2] = False
    loss, stats = value_loss(values, old_values, returns, mask=mask, clip_range=clip, aggregation=aggregation)
    exp_loss, exp_grad, exp_stats = value_oracle(values, old_values, returns, mask, clip, aggregation)
    assert_close_f64(loss, exp_loss)
    (grad,) = torch.autograd.grad(loss, values)
    assert_close_f64(grad, exp_grad)
    for k, v in exp_stats.items():
        assert_close_f64(stats[k], v)
    if clip is not None:
        assert stats["clipfrac"] > 0


def test_value_closed_form_and_empty(backend, device):
    # V=1, V_old=0, R=0, clip 0.2: max(1, 0.04)/2 = 0.5, gradient V - R = 1
    values = torch.ones(1, 1, device=device, requires_grad=True)
    loss, _ = value_loss(values, torch.zeros(1, 1, device=device), torch.zeros(1, 1, device=device), mask=None)
    (grad,) = torch.autograd.grad(loss, values)
    assert loss.item() == pytest.approx(0.5) and grad.item() == pytest.approx(1.0)
    # V=0.5, V_old=0, R=1: clipped V=0.2 is further from R: 0.5*0.64 with no gradient
    values = torch.full((1, 1), 0.5, device=device, requires_grad=True)
    loss, stats = value_loss(values, torch.zeros(1, 1, device=device), torch.ones(1, 1, device=device), mask=None)
    (grad,) = torch.autograd.grad(loss, values)
    assert loss.item() == pytest.approx(0.32) and grad.item() == 0 and stats["clipfrac"].item() == 1
    nothing = torch.zeros(1, 1, device=device)
    loss, _ = value_loss(values, values.detach(), torch.ones(1, 1, device=device), mask=nothing)
    (grad,) = torch.autograd.grad(loss, values)
    assert loss.item() == 0 and grad.item() == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"aggregation": "mean"}, "aggregation"),
        ({"clip_range": 1.0}, "clip_range"),
        ({"clip_range_high": -0.1}, "clip_range_high"),
        ({"dual_clip": 1.0}, "dual_clip"),
        ({"loss_constant": 10.0}, "loss_constant"),
        ({"aggregation": "token_sum_norm", "loss_constant": 0.0}, "loss_constant"),
        ({"advantages": torch.zeros(3)}, "advantages"),
        ({"advantages": torch.full((2, 5), float("nan"))}, "advantages"),
        ({"old_logp": torch.zeros(2, 4)}, "old_logp"),
        ({"is_weights": torch.zeros(5)}, "is_weights"),
        ({"mask": torch.ones(2, 4)}, "mask"),
        ({"logp": torch.zeros(10)}, "logp"),
    ],
)
def test_policy_errors(kwargs, match):
    args = {"logp": torch.zeros(2, 5), "old_logp": torch.zeros(2, 5), "advantages": torch.zeros(2),
            "mask": None}
    args.update({k: kwargs.pop(k) for k in list(args) if k in kwargs})
    with pytest.raises(ValueError, match=match):
        ppo_policy_loss(args["logp"], args["old_logp"], args["advantages"], mask=args["mask"], **kwargs)


def test_value_errors():
    v = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="old_values"):
        value_loss(v, None, v, mask=None)
    with pytest.raises(ValueError, match="returns"):
        value_loss(v, v, torch.full((2, 5), float("inf")), mask=None)
    with pytest.raises(ValueError, match="clip"):
        value_loss(v, v, v, mask=None, clip_range=-1.0)
    with pytest.raises(ValueError, match="aggregation"):
        value_loss(v, v, v, mask=None, aggregation="sum")


def test_ops_name_the_kernels_partial_rows_in_their_order():
    """The torch path keeps its own copy of the kernels' row names (so that it does not load
    Triton); the two must not drift apart."""
    from rftengine.kernels import ppo as kernel
    from rftengine.ops import ppo as ops

    assert ops.PPO_PARTIALS == kernel.PPO_PARTIALS and ops.VALUE_PARTIALS == kernel.VALUE_PARTIALS
