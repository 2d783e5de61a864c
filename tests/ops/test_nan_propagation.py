"""A NaN at a valid token never turns into a finite loss or a zero gradient, on either backend.

GPU min/max (and Triton's tl.minimum/tl.maximum/tl.max by default) return the non-NaN operand,
so a clamp or a max-based reduction silently drops a NaN that torch propagates. Each op gets a
NaN at one valid token; the result must be NaN on both backends, and the gradient at that token
must be NaN exactly where the torch reference's is (never a silent 0 on one backend only).
Inputs the ops validate (advantages, rewards, scores, pair log-probs) raise instead; that is
covered by the ops' own error tests.
"""

from __future__ import annotations

import pytest
import torch

from rftengine.ops import (
    dpo_loss,
    fused_dpo_loss,
    fused_ppo_loss,
    kl_penalty,
    linear_token_logprobs,
    ppo_policy_loss,
    sequence_logprobs,
    token_logprobs,
    value_loss,
)
from rftengine.ops.preference import preference_pair_reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

NAN = float("nan")


def _cpu(*shape, generator=None):
    return torch.randn(*shape, generator=generator)


def _with_nan(t: torch.Tensor, index) -> torch.Tensor:
    t = t.clone()
    t[index] = NAN
    return t


def _loss_and_grad(fn, x):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    loss = out[0] if isinstance(out, tuple) else out
    total = loss.sum()
    (g,) = torch.autograd.grad(total, x)
    return total.detach(), g


def _both_backends(monkeypatch, fn, x):
    results = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("RFTENGINE_BACKEND", name)
        results[name] = _loss_and_grad(fn, x)
    return results


def _assert_nan_agrees(results, index, grad_nan=True):
    """grad_nan=False: the op is linear in that input, its derivative does not see the value."""
    for name, (loss, grad) in results.items():
        assert torch.isnan(loss), f"{name}: loss {loss} swallowed the NaN"
        assert torch.isnan(grad[index]).all() == grad_nan, f"{name}: the NaN token got gradient {grad[index]}"
    nan_t, nan_x = (torch.isnan(results[k][1]) for k in ("torch", "triton"))
    assert torch.equal(nan_t, nan_x), "the backends disagree on which gradients are NaN"


@pytest.mark.parametrize("which", ["logp", "old_logp"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
def test_ppo_policy_loss_propagates_nan(monkeypatch, device, which, dual_clip, adv_sign):
    logp, old = _cpu(2, 7).to(device), _cpu(2, 7).to(device)
    adv = (adv_sign * _cpu(2, 7).abs()).to(device)
    mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    mask[1, 5:] = False
    index = (0, 3)
    if which == "old_logp":
        old = _with_nan(old, index)
    else:
        logp = _with_nan(logp, index)
    results = _both_backends(
        monkeypatch, lambda x: ppo_policy_loss(x, old, adv, mask=mask, dual_clip=dual_clip), logp
    )
    _assert_nan_agrees(results, index)
    monkeypatch.setenv("RFTENGINE_BACKEND", "triton")
    _, stats = ppo_policy_loss(logp, old, adv, mask=mask)
    assert torch.isnan(stats["ratio_max"]) and torch.isnan(stats["approx_kl"])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("which", ["logp", "ref_logp"])
def test_kl_penalty_propagates_nan(monkeypatch, device, estimator, which):
    logp, ref = _cpu(3, 5).to(device), _cpu(3, 5).to(device)
    index = (1, 2)
    if which == "ref_logp":
        ref = _with_nan(ref, index)
    else:
        logp = _with_nan(logp, index)
    results = _both_backends(monkeypatch, lambda x: kl_penalty(x, ref, estimator=estimator), logp)
    for name, (loss, grad) in results.items():
        assert torch.isnan(loss), f"{name}: {estimator} swallowed the NaN"
        # k1 = logp - ref has derivative 1 whatever the values; k2/k3 must carry the NaN
        assert torch.isnan(grad[index]) == (estimator != "k1"), f"{name}: gradient {grad[index]}"
    assert torch.equal(*(torch.isnan(r[1]) for r in results.values()))


@pytest.mark.parametrize("which", ["values", "old_values"])
def test_value_loss_propagates_nan(monkeypatch, device, which):
    values, old, ret = (_cpu(2, 6).to(device) for _ in range(3))
    index = (1, 4)
    if which == "old_values":
        old = _with_nan(old, index)
    else:
        values = _with_nan(values, index)
    results = _both_backends(monkeypatch, lambda x: value_loss(x, old, ret, mask=None, clip_range=0.2), values)
    _assert_nan_agrees(results, index)


def test_sequence_and_token_logprobs_propagate_nan(monkeypatch, device):
    x = _with_nan(_cpu(2, 6), (0, 2)).to(device)
    results = _both_backends(monkeypatch, lambda t: sequence_logprobs(t, mask=None), x)
    _assert_nan_agrees(results, (0, 2), grad_nan=False)
    logits = _with_nan(_cpu(3, 11), (1, 4)).to(device)
    targets = torch.tensor([0, 1, 2], device=device)
    results = _both_backends(
        monkeypatch, lambda z: torch.stack(token_logprobs(z, targets, return_entropy=True)), logits
    )
    _assert_nan_agrees(results, (1, 4))


def test_linear_and_fused_ppo_propagate_nan_hidden(monkeypatch, device):
    gen = torch.Generator().manual_seed(1)
    h = _with_nan(_cpu(2, 3, 8, generator=gen), (0, 1, 5)).to(device)
    w = (_cpu(11, 8, generator=gen) / 3).to(device)
    targets = torch.randint(0, 11, (2, 3), generator=gen).to(device)
    old, ref, adv = (_cpu(2, 3, generator=gen).to(device) for _ in range(3))
    results = _both_backends(monkeypatch, lambda x: linear_token_logprobs(x, w, targets), h)
    _assert_nan_agrees(results, (0, 1))
    results = _both_backends(
        monkeypatch,
        lambda x: fused_ppo_loss(x, w, targets, old, adv, mask=None, ref_logp=ref, kl_estimator="k3", kl_coef=0.1),
        h,
    )
    _assert_nan_agrees(results, (0, 1))


@pytest.mark.parametrize("which", ["old_logp", "ref_logp"])
def test_fused_ppo_propagates_nan_constants(monkeypatch, device, which):
    gen = torch.Generator().manual_seed(2)
    h = _cpu(2, 3, 8, generator=gen).to(device)
    w = (_cpu(11, 8, generator=gen) / 3).to(device)
    targets = torch.randint(0, 11, (2, 3), generator=gen).to(device)
    old, ref, adv = (_cpu(2, 3, generator=gen).to(device) for _ in range(3))
    if which == "old_logp":
        old = _with_nan(old, (1, 1))
    else:
        ref = _with_nan(ref, (1, 1))
    results = _both_backends(
        monkeypatch, lambda x: fused_ppo_loss(x, w, targets, old, adv, mask=None, ref_logp=ref, kl_estimator="k3", kl_coef=0.1), h
    )
    _assert_nan_agrees(results, (1, 1))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_preference_pair_closed_forms_propagate_nan(device, loss_type):
    """The pair closed forms (reached unvalidated by the fused DPO head) keep a NaN margin."""
    from rftengine.ops.preference import _DPOPairs

    pc = torch.tensor([NAN, 0.5, -1.0], device=device)
    pr, rc, rr = (torch.zeros(3, device=device) for _ in range(3))
    smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    loss, d_h = preference_pair_reference(pc, 0.5, 0.0, smoothing, loss_type)
    assert torch.isnan(loss[0]) and torch.isnan(d_h[0])
    for triton_path in (False, True):
        x = pc.clone().requires_grad_()
        losses = _DPOPairs.apply(x, pr, rc, rr, None, None, loss_type, 0.5, 0.0, smoothing, triton_path)
        (g,) = torch.autograd.grad(losses.sum(), x)
        assert torch.isnan(losses[0]) and torch.isnan(g[0]), f"triton={triton_path}: {losses}, {g}"
        assert torch.isfinite(losses[1:]).all()


def test_dpo_loss_rejects_nan(backend, device):
    pc = torch.tensor([NAN, 0.0], device=device)
    zeros = torch.zeros(2, device=device)
    with pytest.raises(ValueError, match="pol_chosen must be finite"):
        dpo_loss(pc, zeros, zeros, zeros)


def test_fused_dpo_rejects_nan_hidden(backend, device):
    """A NaN hidden state makes its sequence log-prob NaN, which `dpo_loss` rejects: the same
    error on both backends, never a finite loss."""
    gen = torch.Generator().manual_seed(3)
    h = _with_nan(_cpu(4, 3, 8, generator=gen), (2, 1, 0)).to(device)
    w = (_cpu(11, 8, generator=gen) / 3).to(device)
    targets = torch.randint(0, 11, (4, 3), generator=gen).to(device)
    for loss_type in ("sigmoid", "hinge"):
        with pytest.raises(ValueError, match="must be finite"):
            fused_dpo_loss(h, w, targets, mask=None, ref_logps=torch.zeros(4, device=device), loss_type=loss_type)
