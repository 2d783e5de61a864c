"""sequence_logprobs on both backends against a float64 oracle.

Sums of up to ~1,500 fp32 log-probs of magnitude <= 10: rtol 1e-5 / atol 1e-4.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from rftengine.ops.sequence import sequence_logprobs
from tests.ops.helpers import assert_close_f64

F64 = torch.float64


def oracle(token_logp, mask, reduction):
    x = token_logp.detach().to(F64).requires_grad_()
    keep = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    total = torch.where(keep, x, 0).sum(-1)
    if reduction == "mean":
        total = total / keep.sum(-1).clamp(min=1)
    g = torch.randn(total.shape, dtype=total.dtype).to(total.device)
    (d_x,) = torch.autograd.grad((total * g).sum(), x)
    return total.detach(), d_x, g


_close = partial(assert_close_f64, atol=1e-4)  # this file's default tolerance


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape,masked", [((5, 37), True), ((3, 1500), True), ((2, 1), False), ((4, 9), False)])
def test_matches_oracle(backend, device, reduction, shape, masked):
    x = (-10 * torch.rand(shape)).to(device).requires_grad_()
    mask = None
    if masked:
        mask = torch.rand(shape).to(device) > 0.3
        mask[0] = False  # an empty row
    out = sequence_logprobs(x, mask=mask, reduction=reduction)
    assert out.shape == shape[:1] and out.dtype == torch.float32
    expected, exp_dx, g = oracle(x, mask, reduction)
    _close(out, expected)
    (d_x,) = torch.autograd.grad((out * g.float()).sum(), x)
    _close(d_x, exp_dx)
    if masked:
        assert out[0].item() == 0 and d_x[0].abs().max() == 0


def test_closed_form_and_padding_not_read(backend, device):
    x = torch.tensor([[-1.0, -2.0, float("-inf")], [float("nan"), -0.5, -1.5]], device=device)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], device=device)
    torch.testing.assert_close(sequence_logprobs(x, mask=mask), torch.tensor([-3.0, -2.0], device=device))
    means = sequence_logprobs(x, mask=mask, reduction="mean")
    torch.testing.assert_close(means, torch.tensor([-1.5, -1.0], device=device))


def test_bf16_input(backend, device):
    x = (-5 * torch.rand(3, 50)).to(device=device, dtype=torch.bfloat16).requires_grad_()
    out = sequence_logprobs(x, mask=None, reduction="mean")
    expected, exp_dx, g = oracle(x, None, "mean")
    _close(out, expected)
    (d_x,) = torch.autograd.grad((out * g.float()).sum(), x)
    assert d_x.dtype == torch.bfloat16
    _close(d_x, exp_dx, rtol=1e-2, atol=1e-3)


def test_errors():
    with pytest.raises(ValueError, match="reduction"):
        sequence_logprobs(torch.zeros(2, 3), mask=None, reduction="max")
    with pytest.raises(ValueError, match="token_logp"):
        sequence_logprobs(torch.zeros(6), mask=None)
    with pytest.raises(ValueError, match="mask"):
        sequence_logprobs(torch.zeros(2, 3), mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="token_logp"):
        sequence_logprobs(torch.zeros(2, 3, dtype=torch.int32), mask=None)
