"""Old call forms of the public ops (positional mask, renamed keywords, the KL estimator
default) still give the same result for one release, with a DeprecationWarning that points at
the caller."""

from __future__ import annotations

import warnings

import pytest
import torch

from rftengine.ops import (
    dpo_loss,
    fused_dpo_loss,
    fused_ppo_loss,
    gae,
    kl_penalty,
    ppo_policy_loss,
    sequence_logprobs,
    value_loss,
    whiten,
)


def _tokens(b=2, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, generator=g)


def _head(b=2, t=5, h=4, v=7):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, t, h, generator=g), torch.randn(v, h, generator=g),
            torch.randint(0, v, (b, t), generator=g))


MASK = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def _same(a, b):
    a, b = _first(a), _first(b)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _warns_from_here(pattern, fn):
    """fn() under a recorder: exactly the deprecation matching `pattern`, blamed on this file."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    ours = [w for w in caught if issubclass(w.category, DeprecationWarning) and pattern in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert ours[0].filename == __file__
    return result


def _positional_calls():
    lp, old, adv = _tokens(seed=0), _tokens(seed=1), _tokens(seed=2)
    h, w, t = _head()
    pairs_h, pairs_t = h, t  # 2 rows = 1 pair
    return {
        "ppo_policy_loss": (lambda: ppo_policy_loss(lp, old, adv, MASK),
                            lambda: ppo_policy_loss(lp, old, adv, mask=MASK)),
        "value_loss": (lambda: value_loss(lp, old, adv, MASK), lambda: value_loss(lp, old, adv, mask=MASK)),
        "gae": (lambda: gae(lp, old, MASK, gamma=0.9), lambda: gae(lp, old, mask=MASK, gamma=0.9)),
        "whiten": (lambda: whiten(lp, MASK), lambda: whiten(lp, mask=MASK)),
        "sequence_logprobs": (lambda: sequence_logprobs(lp, MASK), lambda: sequence_logprobs(lp, mask=MASK)),
        "fused_ppo_loss": (lambda: fused_ppo_loss(h, w, t, old, adv, MASK),
                           lambda: fused_ppo_loss(h, w, t, old, adv, mask=MASK)),
        "fused_dpo_loss": (
            lambda: fused_dpo_loss(pairs_h, w, pairs_t, MASK, ref_logps=torch.zeros(2)),
            lambda: fused_dpo_loss(pairs_h, w, pairs_t, mask=MASK, ref_logps=torch.zeros(2)),
        ),
    }


@pytest.mark.parametrize("op", sorted(_positional_calls()))
def test_positional_mask_warns_and_matches_keyword(op):
    old_form, new_form = _positional_calls()[op]
    expected = new_form()
    _same(_warns_from_here("passing mask positionally", old_form), expected)


def test_extra_positional_arguments_are_still_a_type_error():
    lp = _tokens()
    with pytest.raises(TypeError, match="at most 2 positional"):
        whiten(lp, MASK, True)
    with pytest.raises(TypeError, match="multiple values for argument 'mask'"):
        whiten(lp, MASK, mask=MASK)


def test_clip_keywords_renamed_to_config_spelling():
    lp, old, adv = _tokens(seed=0) * 3, _tokens(seed=1), _tokens(seed=2)
    new = ppo_policy_loss(lp, old, adv, mask=MASK, clip_range=0.1, clip_range_high=0.3)
    _same(_warns_from_here("'clip_low' is renamed 'clip_range'",
                           lambda: ppo_policy_loss(lp, old, adv, mask=MASK, clip_low=0.1, clip_high=0.3)), new)
    # clip_high used to default to 0.2 whatever clip_low was; the old form keeps that
    old_default = ppo_policy_loss(lp, old, adv, mask=MASK, clip_range=0.1, clip_range_high=0.2)
    symmetric = ppo_policy_loss(lp, old, adv, mask=MASK, clip_range=0.1)
    assert not torch.equal(old_default[0], symmetric[0])  # the inputs do hit the upper clip
    _same(_warns_from_here("'clip_low' is renamed", lambda: ppo_policy_loss(lp, old, adv, mask=MASK, clip_low=0.1)),
          old_default)
    with pytest.raises(TypeError, match="both 'clip_low' .* and 'clip_range'"):
        ppo_policy_loss(lp, old, adv, clip_low=0.1, clip_range=0.1)


def test_fused_ppo_clip_keywords_renamed():
    h, w, t = _head()
    old, adv = _tokens(seed=1), _tokens(seed=2)
    new = fused_ppo_loss(h, w, t, old, adv, mask=MASK, clip_range=0.1, clip_range_high=0.2)
    _same(_warns_from_here("'clip_low' is renamed", lambda: fused_ppo_loss(h, w, t, old, adv, mask=MASK, clip_low=0.1)),
          new)


def test_value_loss_clip_renamed():
    v, old, ret = _tokens(seed=0), _tokens(seed=1), _tokens(seed=2)
    new = value_loss(v, old, ret, mask=MASK, clip_range=0.05)
    _same(_warns_from_here("'clip' is renamed 'clip_range'", lambda: value_loss(v, old, ret, mask=MASK, clip=0.05)), new)


def test_simpo_margin_renamed():
    pc, pr = -torch.rand(3) * 10, -torch.rand(3) * 10
    lengths = torch.tensor([3, 4, 5])
    kw = dict(loss_type="simpo", beta=2.0, chosen_lengths=lengths, rejected_lengths=lengths)
    new = dpo_loss(pc, pr, None, None, simpo_gamma=0.5, **kw)
    assert not torch.equal(new[0], dpo_loss(pc, pr, None, None, **kw)[0])
    _same(_warns_from_here("'gamma' is renamed 'simpo_gamma'", lambda: dpo_loss(pc, pr, None, None, gamma=0.5, **kw)),
          new)
    h, w, t = _head()
    fused = fused_dpo_loss(h, w, t, mask=MASK, loss_type="simpo", simpo_gamma=0.5)
    _same(_warns_from_here("'gamma' is renamed", lambda: fused_dpo_loss(h, w, t, mask=MASK, loss_type="simpo", gamma=0.5)),
          fused)


def test_kl_estimator_left_out_keeps_each_ops_old_default_with_a_warning():
    lp, ref = _tokens(seed=0), _tokens(seed=1)
    _same(_warns_from_here("estimator will be required", lambda: kl_penalty(lp, ref, mask=MASK)),
          kl_penalty(lp, ref, estimator="k1", mask=MASK))
    h, w, t = _head()
    old, adv = _tokens(seed=2), _tokens(seed=3)
    kw = dict(mask=MASK, ref_logp=ref, kl_coef=0.1)
    _same(_warns_from_here("kl_estimator will be required", lambda: fused_ppo_loss(h, w, t, old, adv, **kw)),
          fused_ppo_loss(h, w, t, old, adv, kl_estimator="k3", **kw))


def test_no_warning_for_current_call_forms():
    lp, ref = _tokens(seed=0), _tokens(seed=1)
    h, w, t = _head()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        kl_penalty(lp, ref, estimator="k3", mask=MASK)
        # without a reference the estimator is not used, so it is not required
        fused_ppo_loss(h, w, t, lp, ref, mask=MASK, clip_range=0.2)
        ppo_policy_loss(lp, lp, ref, mask=MASK, clip_range=0.2, clip_range_high=None)
