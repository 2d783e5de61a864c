"""Every op takes strided (non-contiguous) inputs and gives what it gives on contiguous copies.

Triton kernels index their inputs flat, so a launcher that forgets to make a strided view
contiguous reads the wrong elements; views such as ``x[:, 0]`` or ``x.t()`` catch that.
"""

import pytest
import torch

from rftengine.ops import (
    gae,
    group_advantages,
    kl_penalty,
    ppo_policy_loss,
    sequence_logprobs,
    token_logprobs,
    value_loss,
    whiten,
)


def strided(shape, device, *, dtype=torch.float32, low=None, high=None):
    """A tensor of `shape` on `device` whose memory is not contiguous: every other column of a
    wider one (drawn on the CPU, so the values do not depend on the device's RNG)."""
    wide = list(shape[:-1]) + [shape[-1] * 2] if shape else [2]
    if low is not None:
        base = torch.randint(low, high, wide)
    else:
        base = torch.randn(wide, dtype=dtype)
    view = base.to(device)[..., ::2]
    assert not view.is_contiguous()
    return view


def same(a, b):
    if isinstance(a, tuple):
        for x, y in zip(a, b):
            same(x, y)
    elif isinstance(a, dict):
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


CASES = {
    "kl_penalty": lambda x, y, m: kl_penalty(x, y, estimator="k3", mask=m),
    "ppo_policy_loss": lambda x, y, m: ppo_policy_loss(x, y, x - y, mask=m),
    "value_loss": lambda x, y, m: value_loss(x, y, x + y, mask=m),
    "gae": lambda x, y, m: gae(x, y, mask=m, gamma=0.9, lam=0.8),
    "whiten": lambda x, y, m: whiten(x, mask=m),
    "sequence_logprobs": lambda x, y, m: sequence_logprobs(x, mask=m, reduction="mean"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_token_ops_on_strided_views(backend, device, name):
    x, y = strided((3, 11), device), strided((3, 11), device)
    m = strided((3, 11), device, low=0, high=2) != 0
    m[:, 0] = True
    op = CASES[name]
    same(op(x, y, m), op(x.contiguous(), y.contiguous(), m.contiguous()))


def test_one_dimensional_column_views(backend, device):
    """`logp[:, 0]`-style views: 1-D but with a stride > 1."""
    logp, ref = torch.randn(7, 5).to(device), torch.randn(7, 5).to(device)
    a, b = logp[:, 0], ref[:, 0]
    same(kl_penalty(a, b, estimator="k2"), kl_penalty(a.contiguous(), b.contiguous(), estimator="k2"))
    keep = torch.ones(7, dtype=torch.bool, device=device)
    same(whiten(a, mask=keep), whiten(a.contiguous(), mask=keep))
    scores = torch.randn(8, 3).to(device)[:, 1]
    same(group_advantages(scores, 4), group_advantages(scores.contiguous(), 4))


def test_token_logprobs_on_transposed_logits(backend, device):
    logits = torch.randn(13, 2, 37).to(device).transpose(0, 1)  # [2, 13, 37], rows strided
    targets = torch.randint(0, 37, (13, 2)).to(device).t()
    same(token_logprobs(logits, targets), token_logprobs(logits.contiguous(), targets.contiguous()))
