"""User errors the ops reject with a named ValueError, and empty inputs they accept.

- Scalar coefficients must be finite numbers (one shared check, `_checks.check_number`):
  a NaN passes ``value > 0``-style checks and an inf one poisons the loss silently.
- Masks hold only 0 and 1 (or are bool): ``mask != 0`` would count 2 or -1 as True.
- ``loss_constant=0`` divides by zero.
- Empty inputs (T = 0 tokens, B = 0 sequences): per-token ops return empty outputs of the
  input's shape; per-sequence ones return [B] zeros (a sequence without valid tokens); the
  reduced losses return 0 with zero gradient, as for an all-masked batch (documented in each
  op). The pair losses need at least one pair and say so.
"""

from __future__ import annotations

import math

import pytest
import torch

from rftengine import ops
from rftengine.ops import (
    bradley_terry_loss,
    dpo_loss,
    fused_dpo_loss,
    fused_ppo_loss,
    gae,
    group_advantages,
    kl_penalty,
    linear_token_logprobs,
    ppo_policy_loss,
    sequence_logprobs,
    token_logprobs,
    value_loss,
    whiten,
)

BAD_NUMBERS = [float("nan"), float("inf"), -float("inf")]


def _x(*shape, device="cpu"):
    return torch.randn(*shape).to(device)


def _head(b, t, device, h=4, v=7):
    return _x(b, t, h, device=device), _x(v, h, device=device), torch.randint(0, v, (b, t)).to(device)


# every scalar coefficient of every op, as (argument name, call taking its value)
def _coefficient_calls(device):
    lp, old, adv = _x(2, 5, device=device), _x(2, 5, device=device), _x(2, 5, device=device)
    pair = _x(3, device=device)
    lengths = torch.tensor([2, 3, 4], device=device)
    h, w, t = _head(2, 3, device)
    hd, wd, td = _head(2, 3, device)
    ref2 = _x(2, device=device)
    return {
        "ppo_policy_loss.clip_range": lambda v: ppo_policy_loss(lp, old, adv, mask=None, clip_range=v),
        "ppo_policy_loss.clip_range_high": lambda v: ppo_policy_loss(lp, old, adv, mask=None, clip_range_high=v),
        "ppo_policy_loss.dual_clip": lambda v: ppo_policy_loss(lp, old, adv, mask=None, dual_clip=v),
        "ppo_policy_loss.loss_constant": lambda v: ppo_policy_loss(
            lp, old, adv, mask=None, aggregation="token_sum_norm", loss_constant=v),
        "value_loss.clip_range": lambda v: value_loss(lp, old, adv, mask=None, clip_range=v),
        "value_loss.loss_constant": lambda v: value_loss(
            lp, old, adv, mask=None, aggregation="token_sum_norm", loss_constant=v),
        "kl_penalty.clamp": lambda v: kl_penalty(lp, old, estimator="k3", clamp=v),
        "gae.gamma": lambda v: gae(lp, old, mask=None, gamma=v),
        "gae.lam": lambda v: gae(lp, old, mask=None, lam=v),
        "whiten.eps": lambda v: whiten(lp, mask=None, eps=v),
        "group_advantages.eps": lambda v: group_advantages(lp.reshape(-1), 5, eps=v),
        "token_logprobs.temperature": lambda v: token_logprobs(lp, torch.zeros(2, dtype=torch.long, device=device),
                                                               temperature=v),
        "linear_token_logprobs.temperature": lambda v: linear_token_logprobs(h, w, t, temperature=v),
        "dpo_loss.beta": lambda v: dpo_loss(pair, pair, pair, pair, beta=v),
        "dpo_loss.label_smoothing": lambda v: dpo_loss(pair, pair, pair, pair, label_smoothing=v),
        "dpo_loss.simpo_gamma": lambda v: dpo_loss(pair, pair, None, None, loss_type="simpo", simpo_gamma=v,
                                             chosen_lengths=lengths, rejected_lengths=lengths),
        "bradley_terry_loss.margin": lambda v: bradley_terry_loss(pair, pair, margin=v),
        "bradley_terry_loss.center_coef": lambda v: bradley_terry_loss(pair, pair, center_coef=v),
        "fused_ppo_loss.kl_coef": lambda v: fused_ppo_loss(h, w, t, old[:, :3], adv[:, :3], mask=None,
                                                           ref_logp=old[:, :3], kl_estimator="k3", kl_coef=v),
        "fused_ppo_loss.kl_clamp": lambda v: fused_ppo_loss(h, w, t, old[:, :3], adv[:, :3], mask=None, kl_clamp=v),
        "fused_ppo_loss.entropy_coef": lambda v: fused_ppo_loss(h, w, t, old[:, :3], adv[:, :3], mask=None,
                                                                entropy_coef=v),
        "fused_ppo_loss.temperature": lambda v: fused_ppo_loss(h, w, t, old[:, :3], adv[:, :3], mask=None,
                                                               temperature=v),
        "fused_ppo_loss.clip_range": lambda v: fused_ppo_loss(h, w, t, old[:, :3], adv[:, :3], mask=None, clip_range=v),
        "fused_ppo_loss.clip_range_high": lambda v: fused_ppo_loss(h, w, t, old[:, :3], adv[:, :3], mask=None, clip_range_high=v),
        "fused_ppo_loss.loss_constant": lambda v: fused_ppo_loss(
            h, w, t, old[:, :3], adv[:, :3], mask=None, aggregation="token_sum_norm", loss_constant=v),
        "fused_dpo_loss.beta": lambda v: fused_dpo_loss(hd, wd, td, mask=None, ref_logps=ref2, beta=v),
        "fused_dpo_loss.label_smoothing": lambda v: fused_dpo_loss(hd, wd, td, mask=None, ref_logps=ref2,
                                                                   label_smoothing=v),
        "fused_dpo_loss.temperature": lambda v: fused_dpo_loss(hd, wd, td, mask=None, ref_logps=ref2, temperature=v),
    }


# every (coefficient, bad value) pair but +inf for the KL clamps: documented, it disables the clamp
COEFFICIENT_CASES = [
    pytest.param(case, value, id=f"{case}-{value}")
    for case in sorted(_coefficient_calls("cpu")) for value in BAD_NUMBERS
    if not (case.endswith("clamp") and value == math.inf)
]


@pytest.mark.parametrize("case,value", COEFFICIENT_CASES)
def test_scalar_coefficients_must_be_finite(backend, device, case, value):
    name = case.split(".")[1]
    call = _coefficient_calls(device)[case]
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        call(value)


def test_infinite_kl_clamp_disables_it(backend, device):
    logp, ref = torch.tensor([0.0, 0.0], device=device), torch.tensor([100.0, 1.0], device=device)
    kl = kl_penalty(logp, ref, estimator="k3", clamp=math.inf)
    assert torch.isinf(kl[0]) and torch.isfinite(kl[1])  # exp(100) overflows fp32
    assert torch.isfinite(kl_penalty(logp, ref, estimator="k3")).all()


@pytest.mark.parametrize("aggregation_op", ["ppo_policy_loss", "value_loss", "fused_ppo_loss"])
def test_loss_constant_zero_rejected(backend, device, aggregation_op):
    lp, old, adv = _x(2, 3, device=device), _x(2, 3, device=device), _x(2, 3, device=device)
    h, w, t = _head(2, 3, device)
    call = {
        "ppo_policy_loss": lambda: ppo_policy_loss(lp, old, adv, mask=None, aggregation="token_sum_norm", loss_constant=0),
        "value_loss": lambda: value_loss(lp, old, adv, mask=None, aggregation="token_sum_norm", loss_constant=0),
        "fused_ppo_loss": lambda: fused_ppo_loss(h, w, t, old, adv, mask=None, aggregation="token_sum_norm",
                                                 loss_constant=0),
    }[aggregation_op]
    with pytest.raises(ValueError, match=r"^loss_constant must be a number > 0, got 0"):
        call()


# every op that takes a mask, as a call taking the mask ([2, 3])
def _mask_calls(device):
    lp, old, adv = _x(2, 3, device=device), _x(2, 3, device=device), _x(2, 3, device=device)
    h, w, t = _head(2, 3, device)
    return {
        "ppo_policy_loss": lambda m: ppo_policy_loss(lp, old, adv, mask=m),
        "value_loss": lambda m: value_loss(lp, old, adv, mask=m),
        "kl_penalty": lambda m: kl_penalty(lp, old, estimator="k1", mask=m),
        "gae": lambda m: gae(lp, old, mask=m),
        "whiten": lambda m: whiten(lp, mask=m),
        "sequence_logprobs": lambda m: sequence_logprobs(lp, mask=m),
        "token_logprobs": lambda m: token_logprobs(h, t.clamp(max=3), mask=m),
        "linear_token_logprobs": lambda m: linear_token_logprobs(h, w, t, mask=m),
        "fused_ppo_loss": lambda m: fused_ppo_loss(h, w, t, old, adv, mask=m),
        "fused_dpo_loss": lambda m: fused_dpo_loss(h, w, t, mask=m, ref_logps=_x(2, device=device)),
    }


MASK_OPS = sorted(_mask_calls("cpu"))


@pytest.mark.parametrize("op", MASK_OPS)
@pytest.mark.parametrize("bad,dtype", [(2, torch.int64), (-1, torch.int32), (2, torch.uint8), (0.5, torch.float32)])
def test_masks_hold_only_zero_and_one(backend, device, op, bad, dtype):
    call = _mask_calls(device)[op]
    mask = torch.ones(2, 3, dtype=dtype, device=device)
    call(mask)  # 0/1 of this dtype is fine
    mask[1, 2] = bad
    with pytest.raises(ValueError, match=r"^mask must hold only 0/1 \(or bool\) values"):
        call(mask)


def test_every_masked_op_is_covered():
    import inspect

    takes_mask = {name for name in ops.__all__ if "mask" in inspect.signature(getattr(ops, name)).parameters}
    assert takes_mask == set(MASK_OPS)


# ---------------------------------------------------------------- empty inputs


@pytest.mark.parametrize("b,t", [(2, 0), (0, 3), (0, 0)])
def test_empty_token_ops(backend, device, b, t):
    x = _x(b, t, device=device).requires_grad_()
    y = _x(b, t, device=device)
    adv, ret = gae(x, y, mask=None)
    assert adv.shape == ret.shape == (b, t)
    assert kl_penalty(x, y, estimator="k3").shape == (b, t)
    assert whiten(x, mask=None).shape == (b, t)
    seq = sequence_logprobs(x, mask=None, reduction="mean")
    assert seq.shape == (b,) and (seq == 0).all()  # sequences without valid tokens give 0
    h, w, tg = _head(b, t, device)
    assert token_logprobs(_x(b, t, 5, device=device), tg.clamp(max=4)).shape == (b, t)
    logp, ent = linear_token_logprobs(h, w, tg, return_entropy=True)
    assert logp.shape == ent.shape == (b, t)


@pytest.mark.parametrize("b,t", [(2, 0), (0, 3), (0, 0)])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "token_sum_norm"])
def test_empty_reduced_losses_are_zero(backend, device, b, t, aggregation):
    """No valid token: loss 0 and zero gradient, every stat 0 (never NaN), as an all-masked batch."""
    logp = _x(b, t, device=device).requires_grad_()
    other = _x(b, t, device=device)
    results = [
        ppo_policy_loss(logp, other, other, mask=None, aggregation=aggregation),
        ppo_policy_loss(logp, other, _x(b, device=device), mask=None, aggregation=aggregation),
        value_loss(logp, other, other, mask=None, aggregation=aggregation),
    ]
    h, w, tg = _head(b, t, device)
    h.requires_grad_()
    results.append(fused_ppo_loss(h, w, tg, other, other, mask=None, ref_logp=other, kl_estimator="k3", kl_coef=0.1,
                                  entropy_coef=0.01, aggregation=aggregation))
    for loss, stats in results:
        assert loss.item() == 0 and all(v.item() == 0 for v in stats.values())
    (g,) = torch.autograd.grad(results[0][0], logp)
    assert g.shape == (b, t)
    (gh,) = torch.autograd.grad(results[-1][0], h)
    assert gh.shape == h.shape and not gh.any()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_fused_dpo_zero_length_pairs(backend, device, loss_type):
    """T = 0: every pair has no tokens, as an all-masked pair (sequence log-probs 0)."""
    h, w, tg = _head(4, 0, device)
    ref = _x(4, device=device)
    loss, _ = fused_dpo_loss(h.requires_grad_(), w, tg, mask=None, ref_logps=ref, loss_type=loss_type)
    expected, _ = dpo_loss(torch.zeros(2, device=device), torch.zeros(2, device=device), ref[:2], ref[2:],
                           loss_type=loss_type)
    torch.testing.assert_close(loss, expected)


def test_empty_pair_batches_are_rejected(backend, device):
    empty = torch.zeros(0, device=device)
    with pytest.raises(ValueError, match="pol_chosen must hold at least one pair"):
        dpo_loss(empty, empty, empty, empty)
    with pytest.raises(ValueError, match="r_chosen must hold at least one pair"):
        bradley_terry_loss(empty, empty)
    h, w, tg = _head(0, 3, device)
    with pytest.raises(ValueError, match=r"^hidden must hold at least one pair"):
        fused_dpo_loss(h, w, tg, mask=None, ref_logps=empty)
    assert group_advantages(empty, 4).shape == (0,)
