"""kl_penalty on both backends against a float64 oracle written from the formulas in
`docs/conventions.md` ("KL estimators").

Inputs are fp32 (bf16 in one test); the ops compute in fp32, so each output is a handful of
fp32 roundings of O(1) values: rtol 1e-5 with atol 1e-6 (k3 = exp(r) - r - 1 cancels for
small r, an absolute error of a few fp32 ulps of 1).
"""

from __future__ import annotations

import math

import pytest
import torch

from rftengine.ops.kl import kl_penalty
from tests.ops.helpers import assert_close_f64

F64 = torch.float64


def oracle(logp, ref_logp, estimator, mask=None, clamp=20.0):
    """(kl, d sum(g*kl)/d logp, d/d ref_logp) in float64 by autograd."""
    lp = logp.detach().to(F64).requires_grad_()
    rf = ref_logp.detach().to(F64).requires_grad_()
    keep = torch.ones_like(lp, dtype=torch.bool) if mask is None else mask.bool()
    r = torch.where(keep, rf, 0) - torch.where(keep, lp, 0)
    if estimator == "k1":
        kl = -r
    elif estimator == "k2":
        kl = r * r / 2
    else:
        rc = torch.clamp(r, -clamp, clamp)
        kl = torch.exp(rc) - rc - 1
    kl = torch.where(keep, kl, 0)
    g = torch.randn(kl.shape, dtype=kl.dtype).to(kl.device)
    d_lp, d_rf = torch.autograd.grad((kl * g).sum(), (lp, rf))
    return kl.detach(), d_lp, d_rf, g


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize(
    "shape,masked", [((3, 37), True), ((2, 3, 41), False), ((5, 1), True), ((3, 701), True)]
)
def test_matches_oracle(backend, device, estimator, shape, masked):
    logp = (-3 * torch.rand(shape)).to(device).requires_grad_()
    ref = (logp.detach() + torch.randn(shape).to(device)).requires_grad_()
    mask = (torch.rand(shape).to(device) > 0.3) if masked else None
    kl = kl_penalty(logp, ref, estimator=estimator, mask=mask)
    assert kl.dtype == torch.float32 and kl.shape == logp.shape
    exp_kl, exp_dlp, exp_drf, g = oracle(logp, ref, estimator, mask)
    assert_close_f64(kl, exp_kl)
    d_lp, d_rf = torch.autograd.grad((kl * g.float()).sum(), (logp, ref))
    assert_close_f64(d_lp, exp_dlp)
    assert_close_f64(d_rf, exp_drf)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_bf16_inputs_fp32_output(backend, device, estimator):
    logp = (-3 * torch.rand(4, 29)).to(device=device, dtype=torch.bfloat16).requires_grad_()
    ref = (logp.detach().float() + 0.5 * torch.randn(4, 29).to(device)).to(torch.bfloat16)
    kl = kl_penalty(logp, ref, estimator=estimator)
    exp_kl, exp_dlp, _, g = oracle(logp, ref, estimator)
    assert_close_f64(kl, exp_kl)
    (d_lp,) = torch.autograd.grad((kl * g.float()).sum(), logp)
    assert d_lp.dtype == torch.bfloat16
    assert_close_f64(d_lp, exp_dlp, rtol=1e-2, atol=1e-2)  # one rounding to bf16 (8 bits)


def test_closed_form(backend, device):
    logp = torch.tensor([[-1.0, -2.0]], device=device)
    ref = torch.tensor([[-1.5, -1.0]], device=device)  # r = [-0.5, 1]
    expected = {
        "k1": [0.5, -1.0],
        "k2": [0.125, 0.5],
        "k3": [math.exp(-0.5) - 0.5, math.e - 2.0],
    }
    for estimator, values in expected.items():
        kl = kl_penalty(logp, ref, estimator=estimator)
        assert_close_f64(kl, torch.tensor([values], dtype=F64, device=device))


def test_k3_clamp_keeps_extremes_finite(backend, device):
    logp = torch.tensor([[-1e4, 0.0, -5.0]], device=device, requires_grad=True)
    ref = torch.tensor([[0.0, -1e4, -5.0]], device=device)  # r = [1e4, -1e4, 0]
    for estimator in ("k1", "k2", "k3"):
        kl = kl_penalty(logp, ref, estimator=estimator, clamp=20.0)
        (grad,) = torch.autograd.grad(kl.sum(), logp)
        assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    kl = kl_penalty(logp, ref, estimator="k3", clamp=20.0)
    assert_close_f64(kl, torch.tensor([[math.exp(20) - 21, math.exp(-20) + 19, 0.0]], dtype=F64, device=device), rtol=1e-6)
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    assert grad[0, :2].abs().max() == 0  # clamped: no gradient


def test_masked_positions_not_read_and_empty_mask(backend, device):
    logp = torch.full((2, 5), float("-inf"), device=device, requires_grad=True)
    ref = torch.full((2, 5), float("nan"), device=device)
    mask = torch.zeros(2, 5, dtype=torch.bool, device=device)
    for estimator in ("k1", "k2", "k3"):
        kl = kl_penalty(logp, ref, estimator=estimator, mask=mask)
        (grad,) = torch.autograd.grad(kl.sum(), logp)
        assert kl.abs().max() == 0 and grad.abs().max() == 0


def test_float_mask_matches_bool_mask(backend, device):
    logp = -torch.rand(3, 11).to(device)
    ref = -torch.rand(3, 11).to(device)
    mask = torch.rand(3, 11).to(device) > 0.5
    a = kl_penalty(logp, ref, estimator="k3", mask=mask)
    b = kl_penalty(logp, ref, estimator="k3", mask=mask.float())
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"estimator": "k4"}, "estimator"),
        ({"clamp": 0.0}, "clamp"),
        ({"mask": torch.ones(2, 3)}, "mask"),
        ({"ref_logp": torch.zeros(2, 5)}, "ref_logp"),
        ({"logp": torch.zeros(2, 4, dtype=torch.long)}, "logp"),
    ],
)
def test_errors(kwargs, match):
    args = {"logp": torch.zeros(2, 4), "ref_logp": torch.zeros(2, 4)}
    args.update({k: kwargs.pop(k) for k in ("logp", "ref_logp") if k in kwargs})
    with pytest.raises(ValueError, match=match):
        kl_penalty(args["logp"], args["ref_logp"], **{"estimator": "k1", **kwargs})
