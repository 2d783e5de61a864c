"""dpo_loss and bradley_terry_loss on both backends against float64 oracles written from the
per-pair formulas (and their papers) in the docstrings of `dpo_loss` and `bradley_terry_loss`.

Per-pair terms are O(1) fp32 values (softplus, sigmoid) averaged over B: rtol 1e-5 / atol 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rftengine.ops.preference import bradley_terry_loss, dpo_loss
from tests.ops.helpers import assert_close_f64

F64 = torch.float64


def dpo_oracle(pc, pr, rc, rr, *, beta, loss_type, label_smoothing=0.0, simpo_gamma=0.0, lc=None, lr=None):
    """Each variant written from its paper's formula (TRL semantics), float64 autograd."""
    x = [t.detach().to(F64).requires_grad_() for t in (pc, pr, rc, rr)]
    pc_, pr_, rc_, rr_ = x
    eps = label_smoothing
    if loss_type == "simpo":
        logits = pc_ / lc.to(F64) - pr_ / lr.to(F64)
        z = beta * logits - simpo_gamma
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        r_c, r_r = beta * pc_ / lc.to(F64), beta * pr_ / lr.to(F64)
    else:
        if lc is not None:  # IPO on per-token averages
            pc_, rc_ = pc_ / lc.to(F64), rc_ / lc.to(F64)
            pr_, rr_ = pr_ / lr.to(F64), rr_ / lr.to(F64)
        h = (pc_ - pr_) - (rc_ - rr_)
        if loss_type == "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        elif loss_type == "robust":
            losses = ((1 - eps) * -F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
        elif loss_type == "ipo":
            losses = (h - 1 / (2 * beta)) ** 2
        else:
            losses = torch.relu(1 - beta * h)
        r_c, r_r = beta * (pc_ - rc_), beta * (pr_ - rr_)
    loss = losses.mean()
    grads = torch.autograd.grad(loss, x, allow_unused=True)
    stats = {
        "loss": loss.detach(),
        "rewards/chosen": r_c.detach().mean(),
        "rewards/rejected": r_r.detach().mean(),
        "rewards/margins": (r_c - r_r).detach().mean(),
        "rewards/accuracies": (r_c > r_r).to(F64).mean(),
        "logps/chosen": pc.detach().to(F64).mean(),
        "logps/rejected": pr.detach().to(F64).mean(),
    }
    return loss.detach(), grads, stats


CASES = [
    dict(loss_type="sigmoid"),
    dict(loss_type="sigmoid", label_smoothing=0.1),
    dict(loss_type="robust", label_smoothing=0.2),
    dict(loss_type="robust"),
    dict(loss_type="ipo"),
    dict(loss_type="ipo", lengths=True),
    dict(loss_type="hinge", beta=0.5),
    dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, lengths=True),
    dict(loss_type="simpo", beta=2.0, simpo_gamma=0.0, label_smoothing=0.1, lengths=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_dpo_matches_oracle(backend, device, case):
    case = dict(case)
    b = 37
    pc, pr, rc, rr = (-30 * torch.rand(b).to(device) for _ in range(4))
    pc.requires_grad_(), pr.requires_grad_(), rc.requires_grad_(), rr.requires_grad_()
    kwargs = {"beta": case.pop("beta", 0.1), **case}
    if kwargs.pop("lengths", False):
        kwargs["chosen_lengths"] = torch.randint(1, 60, (b,)).to(device)
        kwargs["rejected_lengths"] = torch.randint(1, 60, (b,)).to(device).float()
    loss, stats = dpo_loss(pc, pr, rc, rr, **kwargs)
    oracle_kw = {k: v for k, v in kwargs.items() if not k.endswith("lengths")}
    exp_loss, exp_grads, exp_stats = dpo_oracle(
        pc, pr, rc, rr, lc=kwargs.get("chosen_lengths"), lr=kwargs.get("rejected_lengths"), **oracle_kw
    )
    assert_close_f64(loss, exp_loss)
    grads = torch.autograd.grad(loss, (pc, pr, rc, rr), allow_unused=True)
    for got, want in zip(grads, exp_grads):
        if want is None:  # SimPO: no reference, no gradient
            assert got is None or got.abs().max() == 0
        else:
            assert_close_f64(got, want)
    assert set(stats) == set(exp_stats)
    for k, v in exp_stats.items():
        assert not stats[k].requires_grad
        assert_close_f64(stats[k], v)


def test_dpo_closed_form(backend, device):
    pc, pr = torch.tensor([-1.0], device=device), torch.tensor([-2.0], device=device)
    rc, rr = torch.tensor([-1.5], device=device), torch.tensor([-1.5], device=device)  # h = 1
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=1.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    assert stats["rewards/margins"].item() == pytest.approx(1.0)
    assert stats["rewards/accuracies"].item() == 1.0
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")  # (1 - 2)^2
    assert loss.item() == pytest.approx(1.0)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")  # relu(1 - 0.5)
    assert loss.item() == pytest.approx(0.5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge", "simpo"])
def test_dpo_extreme_logps_finite(backend, device, loss_type):
    pc = torch.tensor([1e4, -1e4, 0.0], device=device, requires_grad=True)
    pr = torch.tensor([-1e4, 1e4, 0.0], device=device, requires_grad=True)
    ref = torch.zeros(3, device=device)
    kwargs = {"label_smoothing": 0.1} if loss_type in ("sigmoid", "robust") else {}
    if loss_type == "simpo":
        ones = torch.ones(3, device=device)
        kwargs = {"chosen_lengths": ones, "rejected_lengths": ones}
    loss, stats = dpo_loss(pc, pr, ref, ref, beta=0.1, loss_type=loss_type, **kwargs)
    d_c, d_r = torch.autograd.grad(loss, (pc, pr))
    assert torch.isfinite(loss) and torch.isfinite(d_c).all() and torch.isfinite(d_r).all()
    assert all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta": -0.1}, "beta"),
        ({"beta": 0.0}, "beta"),
        ({"loss_type": "kto"}, "loss_type"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
        ({"label_smoothing": 0.7}, "label_smoothing"),
        ({"simpo_gamma": 0.5}, "simpo_gamma"),
        ({"loss_type": "simpo"}, "simpo"),
        ({"chosen_lengths": torch.ones(4), "rejected_lengths": torch.ones(4)}, "lengths"),
        ({"loss_type": "ipo", "chosen_lengths": torch.ones(4)}, "together"),
        ({"loss_type": "ipo", "chosen_lengths": torch.zeros(4), "rejected_lengths": torch.ones(4)},
         "chosen_lengths"),
    ],
)
def test_dpo_errors(kwargs, match):
    x = torch.zeros(4)
    with pytest.raises(ValueError, match=match):
        dpo_loss(x, x, x, x, **kwargs)


def test_dpo_input_errors():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="pol_rejected"):
        dpo_loss(x, torch.zeros(5), x, x)
    with pytest.raises(ValueError, match="ref_chosen"):
        dpo_loss(x, x, None, x)
    with pytest.raises(ValueError, match="pol_chosen"):
        dpo_loss(torch.tensor([0.0, float("nan"), 0.0, 0.0]), x, x, x)
    with pytest.raises(ValueError, match="pol_chosen"):
        dpo_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0))


def bt_oracle(rc, rr, margin, center):
    x = [t.detach().to(F64).requires_grad_() for t in (rc, rr)]
    m = 0.0 if margin is None else (margin.to(F64) if isinstance(margin, torch.Tensor) else margin)
    loss = -F.logsigmoid(x[0] - x[1] - m).mean()
    if center is not None:
        loss = loss + center * ((x[0] + x[1]) ** 2).mean()
    return loss.detach(), torch.autograd.grad(loss, x)


@pytest.mark.parametrize("margin", [None, 0.5, "tensor"])
@pytest.mark.parametrize("center", [None, 0.01])
def test_bradley_terry_matches_oracle(backend, device, margin, center):
    rc = (2 * torch.randn(41).to(device)).requires_grad_()
    rr = (2 * torch.randn(41).to(device)).requires_grad_()
    if margin == "tensor":
        margin = torch.rand(41).to(device)
    loss, stats = bradley_terry_loss(rc, rr, margin=margin, center_coef=center)
    exp_loss, exp_grads = bt_oracle(rc, rr, margin, center)
    assert_close_f64(loss, exp_loss)
    for got, want in zip(torch.autograd.grad(loss, (rc, rr)), exp_grads):
        assert_close_f64(got, want)
    rc64, rr64 = rc.detach().to(F64), rr.detach().to(F64)
    assert_close_f64(stats["accuracy"], (rc64 > rr64).to(F64).mean())
    assert_close_f64(stats["margin"], (rc64 - rr64).mean())
    assert_close_f64(stats["rewards/chosen"], rc64.mean())
    assert_close_f64(stats["rewards/rejected"], rr64.mean())
    assert_close_f64(stats["loss"], exp_loss)


def test_bradley_terry_closed_form_and_extremes(backend, device):
    loss, stats = bradley_terry_loss(torch.tensor([1.0], device=device), torch.tensor([0.0], device=device))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    assert stats["accuracy"].item() == 1.0
    rc = torch.tensor([1e4, -1e4], device=device, requires_grad=True)
    rr = torch.tensor([-1e4, 1e4], device=device, requires_grad=True)
    loss, _ = bradley_terry_loss(rc, rr, margin=1.0)
    grads = torch.autograd.grad(loss, (rc, rr))
    assert loss.item() == pytest.approx((2e4 + 1) / 2, rel=1e-6)  # softplus(2e4 + 1) / 2
    assert all(torch.isfinite(g).all() for g in grads)


def test_bradley_terry_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="r_rejected"):
        bradley_terry_loss(x, torch.zeros(4))
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(x, x, center_coef=-1.0)
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(x, x, margin=torch.zeros(2))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(x, x, margin="1")
    with pytest.raises(ValueError, match="r_chosen"):
        bradley_terry_loss(torch.tensor([float("inf"), 0.0, 0.0]), x)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge", "simpo"])
def test_dpo_float64_keeps_beta_exact(loss_type):
    """float64 inputs run in float64 end to end: β = 0.1 (not an fp32 number) is not rounded.

    Compared with float64 autograd of the closed form at 1e-14: an fp32 round-trip of β alone
    is a 1.5e-8 relative error."""
    pc = torch.tensor([-1.0, -3.0, 0.5], dtype=F64, requires_grad=True)
    pr = torch.tensor([-2.0, -1.0, 0.25], dtype=F64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.25, 0.0], dtype=F64)
    kwargs = {"label_smoothing": 0.1} if loss_type in ("sigmoid", "robust") else {}
    lengths = {}
    if loss_type == "simpo":
        lengths = {"chosen_lengths": torch.tensor([3, 1, 2]), "rejected_lengths": torch.tensor([2, 2, 5])}
    beta = 0.1
    loss, _ = dpo_loss(pc, pr, ref, ref, beta=beta, loss_type=loss_type, **kwargs, **lengths)
    grads = torch.autograd.grad(loss, (pc, pr))
    x = [t.detach().clone().requires_grad_() for t in (pc, pr)]
    h = (x[0] - ref) - (x[1] - ref)
    if loss_type == "simpo":
        h = x[0] / lengths["chosen_lengths"].to(F64) - x[1] / lengths["rejected_lengths"].to(F64)
    eps = kwargs.get("label_smoothing", 0.0)
    z = beta * h
    expected = {
        "sigmoid": -(1 - eps) * torch.nn.functional.logsigmoid(z) - eps * torch.nn.functional.logsigmoid(-z),
        "robust": (-(1 - eps) * torch.nn.functional.logsigmoid(z) + eps * torch.nn.functional.logsigmoid(-z))
        / (1 - 2 * eps),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": torch.relu(1 - z),
        "simpo": -torch.nn.functional.logsigmoid(z),
    }[loss_type].mean()
    expected_grads = torch.autograd.grad(expected, x)
    assert loss.dtype == F64
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-14, atol=1e-15)
    for g, e in zip(grads, expected_grads):
        assert g.dtype == F64
        torch.testing.assert_close(g, e, rtol=1e-14, atol=1e-15)
