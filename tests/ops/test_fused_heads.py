"""Fused heads against their definition: linear_token_logprobs composed with the standalone ops.

Same fresh inputs through both; the loss, every stat and the gradients w.r.t. hidden, weight
and bias must agree to fp32 accumulation error (both sides accumulate in fp32 in a different
order), and to float64 rounding for float64 inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from rftengine.ops import _lm_head_chunks as lm_head_chunks
from rftengine.ops.fused_dpo_head import dpo_composite_loss, fused_dpo_loss
from rftengine.ops.fused_ppo_head import fused_ppo_loss, ppo_composite_loss
from rftengine.ops.linear_logprobs import linear_token_logprobs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

FP32, FP64 = torch.float32, torch.float64


def head(batch, seq, hidden, vocab, dtype, device, bias=True):
    h = torch.randn(batch, seq, hidden).to(device).to(dtype)
    w = (torch.randn(vocab, hidden).to(device) * 2 / hidden**0.5).to(dtype)
    b = torch.randn(vocab).to(device).to(dtype) if bias else None
    t = torch.randint(0, vocab, (batch, seq)).to(device)
    return h, w, b, t


def leaves(h, w, b):
    return [x.detach().clone().requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]


def grads_of(params):
    return [p.grad for p in params]


def assert_same(a, b, rtol, atol, what):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def ppo_inputs(h, w, b, t, mask, per_token_adv, temperature):
    """old/ref log-probs near the current policy, so ratios land on both sides of the clip.

    Token (0, 0) (kept by the caller's mask) is clipped by construction: ratio 5 and A > 0."""
    with torch.no_grad():
        current = linear_token_logprobs(h.double(), w.double(), t, bias=None if b is None else b.double(),
                                        temperature=temperature)
    shape = t.shape
    old = current + 0.3 * torch.randn(shape, dtype=FP64).to(t.device)
    old[0, 0] = current[0, 0] - math.log(5.0)
    old = old.float()
    ref = (current + 0.2 * torch.randn(shape, dtype=FP64).to(t.device)).float()
    adv = torch.randn(shape if per_token_adv else shape[:1])
    first = (0, 0) if per_token_adv else 0
    adv[first] = adv[first].abs() + 0.5
    adv = adv.to(t.device)
    old = torch.where(mask, old, float("-inf")) if mask is not None else old  # padding never read
    return old, ref, adv


PPO_CASES = [
    dict(aggregation="token_mean", per_token_adv=True, ref=True, kl_estimator="k3", kl_coef=0.1,
         entropy_coef=0.01, dual_clip=None, is_weights=False, bias=True, temperature=1.0),
    dict(aggregation="seq_mean_token_mean", per_token_adv=False, ref=True, kl_estimator="k1",
         kl_coef=0.05, entropy_coef=0.0, dual_clip=3.0, is_weights=True, bias=False, temperature=0.7),
    dict(aggregation="token_sum_norm", per_token_adv=True, ref=True, kl_estimator="k2", kl_coef=0.2,
         entropy_coef=0.02, dual_clip=2.0, is_weights=False, bias=True, temperature=1.3),
    dict(aggregation="token_mean", per_token_adv=False, ref=False, kl_estimator="k3", kl_coef=0.0,
         entropy_coef=0.0, dual_clip=None, is_weights=False, bias=False, temperature=1.0),
]


def run_ppo(case, dtype, device, chunk, mask_kind="random"):
    h, w, b, t = head(3, 7, 9, 37, dtype, device, bias=case["bias"])
    mask = {"random": torch.rand(3, 7).to(device) > 0.3, "none": None,
            "empty_row": torch.rand(3, 7).to(device) > 0.3}[mask_kind]
    if mask_kind == "empty_row":
        mask[1] = False
    if mask is not None:
        mask[0, 0] = True  # the token ppo_inputs makes clip
    old, ref, adv = ppo_inputs(h, w, b, t, mask, case["per_token_adv"], case["temperature"])
    is_w = (torch.rand(3, 7).to(device) + 0.5) if case["is_weights"] else None
    opts = dict(
        ref_logp=ref if case["ref"] else None, kl_coef=case["kl_coef"], kl_estimator=case["kl_estimator"],
        kl_clamp=20.0, entropy_coef=case["entropy_coef"], clip_range=0.2, clip_range_high=0.28,
        dual_clip=case["dual_clip"], aggregation=case["aggregation"], loss_constant=None, is_weights=is_w,
    )
    fused_params = leaves(h, w, b)
    fused_bias = fused_params[2] if b is not None else None
    loss, stats = fused_ppo_loss(
        fused_params[0], fused_params[1], t, old, adv, mask=mask, bias=fused_bias,
        temperature=case["temperature"], chunk_size=chunk, **opts,
    )
    loss.backward()
    comp_params = leaves(h, w, b)
    logp, ent = linear_token_logprobs(
        comp_params[0], comp_params[1], t, bias=comp_params[2] if b is not None else None,
        temperature=case["temperature"], mask=mask, return_entropy=True,
    )
    ref_loss, ref_stats = ppo_composite_loss(logp, ent, old, adv, mask, **opts)
    ref_loss.backward()
    return (loss, stats, grads_of(fused_params)), (ref_loss, ref_stats, grads_of(comp_params))


def check_against_composition(fused, comp, rtol, atol):
    (loss, stats, grads), (ref_loss, ref_stats, ref_grads) = fused, comp
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert_same(loss, ref_loss.detach(), rtol, atol, "loss")
    assert set(stats) == set(ref_stats)
    for key in stats:
        assert not stats[key].requires_grad
        assert_same(stats[key], ref_stats[key].to(stats[key].dtype), rtol, atol, key)
    for name, g, ref_g in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g is not None and g.dtype == ref_g.dtype
        assert_same(g, ref_g, rtol, atol, f"d_{name}")


def ppo_id(case):
    return case["aggregation"] + ("_kl" + case["kl_estimator"] if case["ref"] else "")


@pytest.mark.parametrize("case", PPO_CASES, ids=ppo_id)
def test_ppo_matches_composition(backend, device, case):
    fused, comp = run_ppo(case, FP32, device, chunk=4)
    check_against_composition(fused, comp, rtol=1e-4, atol=1e-5)
    assert fused[1]["clipfrac"] > 0  # the clip was exercised


@pytest.mark.parametrize("case", PPO_CASES[:3], ids=lambda c: c["aggregation"])
def test_ppo_matches_composition_in_float64(device, case):
    fused, comp = run_ppo(case, FP64, device, chunk=5, mask_kind="empty_row")
    check_against_composition(fused, comp, rtol=1e-10, atol=1e-12)


def test_ppo_without_mask_and_default_chunks(backend, device):
    fused, comp = run_ppo(PPO_CASES[0], FP32, device, chunk=None, mask_kind="none")
    check_against_composition(fused, comp, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_ppo_clip_sides_match_their_definition(backend, device, dual_clip):
    """clipfrac_low / clipfrac_high of the head against the float64 ratio, with TRL's
    definitions: low = A < 0 and ratio < 1 - ε, high = A > 0 and ratio > 1 + ε_high."""
    h, w, b, t = head(3, 7, 9, 37, FP32, device, bias=False)
    mask = torch.rand(3, 7).to(device) > 0.3
    mask[:2, 0] = True
    old, _, adv = ppo_inputs(h, w, b, t, mask, True, 1.0)
    current = linear_token_logprobs(h.double(), w.double(), t)
    old[1, 0] = current[1, 0] - math.log(0.5)  # token (1, 0): ratio 0.5 and A < 0, clipped low
    adv[1, 0] = -(adv[1, 0].abs() + 0.5)
    _, stats = fused_ppo_loss(h, w, t, old, adv, mask=mask, clip_range=0.2, clip_range_high=0.28,
                              dual_clip=dual_clip, chunk_size=4)
    ratio = torch.exp(current - old.double())
    n = mask.sum()
    low = ((ratio < 0.8) & (adv < 0) & mask).sum() / n
    high = ((ratio > 1.28) & (adv > 0) & mask).sum() / n
    assert low > 0 and high > 0  # tokens (1, 0) and (0, 0) by construction
    assert_same(stats["clipfrac_low"], low.float(), 1e-6, 0, "clipfrac_low")
    assert_same(stats["clipfrac_high"], high.float(), 1e-6, 0, "clipfrac_high")
    assert_same(stats["clipfrac"], (low + high).float(), 1e-6, 0, "clipfrac")


def test_ppo_upstream_gradient_scales_and_no_grad_skips_the_backward(device):
    h, w, b, t = head(2, 5, 6, 19, FP32, device)
    mask = torch.rand(2, 5).to(device) > 0.2
    old, _, adv = ppo_inputs(h, w, b, t, mask, True, 1.0)
    params = leaves(h, w, b)
    loss, _ = fused_ppo_loss(params[0], params[1], t, old, adv, mask=mask, bias=params[2], chunk_size=3)
    (2.5 * loss).backward()
    again = leaves(h, w, b)
    loss1, _ = fused_ppo_loss(again[0], again[1], t, old, adv, mask=mask, bias=again[2], chunk_size=3)
    loss1.backward()
    for g, g1 in zip(grads_of(params), grads_of(again)):
        torch.testing.assert_close(g, 2.5 * g1)
    with torch.no_grad():
        loss2, _ = fused_ppo_loss(h, w, t, old, adv, mask=mask, bias=b, chunk_size=3)
    torch.testing.assert_close(loss2, loss1.detach())


def test_ppo_all_masked_gives_zero_loss_and_zero_gradients(backend, device):
    h, w, b, t = head(2, 4, 5, 11, FP32, device)
    mask = torch.zeros(2, 4, dtype=torch.bool, device=device)
    old = torch.full((2, 4), float("-inf"), device=device)
    params = leaves(h, w, b)
    loss, stats = fused_ppo_loss(params[0], params[1], t, old, torch.randn(2).to(device), mask=mask,
                                 bias=params[2], ref_logp=old, kl_estimator="k3", kl_coef=0.1, entropy_coef=0.1)
    loss.backward()
    assert loss == 0 and all(torch.isfinite(v) for v in stats.values())
    for g in grads_of(params):
        assert (g == 0).all()


def test_ppo_is_one_sweep_and_dpo_two(monkeypatch, device):
    """The fused PPO head computes each chunk's logits once (6NHV); DPO twice (8NHV) when a
    pair (12 tokens here) does not fit in a chunk."""
    h, w, b, t = head(2, 6, 5, 13, FP32, device)  # 12 tokens, chunks of 4: 3 chunks
    old, _, adv = ppo_inputs(h, w, b, t, None, True, 1.0)
    calls = []
    original = lm_head_chunks.chunk_logits
    monkeypatch.setattr(lm_head_chunks, "chunk_logits", lambda *a: calls.append(1) or original(*a))
    params = leaves(h, w, b)
    loss, _ = fused_ppo_loss(params[0], params[1], t, old, adv, mask=None, bias=params[2], chunk_size=4)
    loss.backward()
    assert len(calls) == 3
    calls.clear()
    params = leaves(h, w, b)
    loss, _ = fused_dpo_loss(params[0], params[1], t, mask=None, bias=params[2], chunk_size=4,
                             ref_logps=torch.randn(2).to(device))
    loss.backward()
    assert len(calls) == 6


# --- DPO ----------------------------------------------------------------------------------

DPO_CASES = [
    dict(loss_type="sigmoid", label_smoothing=0.0, simpo_gamma=0.0, length_normalized=None),
    dict(loss_type="sigmoid", label_smoothing=0.1, simpo_gamma=0.0, length_normalized=None),
    dict(loss_type="robust", label_smoothing=0.2, simpo_gamma=0.0, length_normalized=None),
    dict(loss_type="ipo", label_smoothing=0.0, simpo_gamma=0.0, length_normalized=True),
    dict(loss_type="ipo", label_smoothing=0.0, simpo_gamma=0.0, length_normalized=False),
    dict(loss_type="hinge", label_smoothing=0.0, simpo_gamma=0.0, length_normalized=None),
    dict(loss_type="simpo", label_smoothing=0.0, simpo_gamma=0.5, length_normalized=None),
]


def run_dpo(case, dtype, device, chunk, ref_from_hidden=False, mask=None, upstream=1.0):
    pairs, seq, hidden, vocab = 3, 6, 8, 29
    h, w, b, t = head(2 * pairs, seq, hidden, vocab, dtype, device)
    if mask is None:
        mask = torch.rand(2 * pairs, seq).to(device) > 0.3
        mask[:, 0] = True  # every sequence has a response token (lengths > 0 for SimPO)
    ref_h = torch.randn(2 * pairs, seq, 5).to(device).to(dtype)
    ref_w = torch.randn(vocab, 5).to(device).to(dtype)
    with torch.no_grad():
        ref_tokens = linear_token_logprobs(ref_h, ref_w, t, mask=mask)
        ref_logps = (ref_tokens * mask).sum(-1)
    beta = 0.5
    opts = {k: v for k, v in case.items() if k != "length_normalized"}
    normalized = case["length_normalized"] if case["length_normalized"] is not None else case["loss_type"] == "simpo"
    refs = dict(ref_hidden=ref_h, ref_weight=ref_w) if ref_from_hidden else dict(ref_logps=ref_logps)
    fused_params = leaves(h, w, b)
    loss, stats = fused_dpo_loss(
        fused_params[0], fused_params[1], t, mask=mask, bias=fused_params[2], beta=beta,
        length_normalized=case["length_normalized"], chunk_size=chunk, **refs, **opts,
    )
    (upstream * loss).backward()
    comp_params = leaves(h, w, b)
    logp = linear_token_logprobs(comp_params[0], comp_params[1], t, bias=comp_params[2], mask=mask)
    ref_loss, ref_stats = dpo_composite_loss(
        logp, mask, ref_logps, beta=beta, length_normalized=normalized, **opts,
    )
    (upstream * ref_loss).backward()
    return (loss, stats, grads_of(fused_params)), (ref_loss, ref_stats, grads_of(comp_params))


def dpo_id(case):
    return f"{case['loss_type']}-{case['label_smoothing']}-{case['length_normalized']}"


@pytest.mark.parametrize("case", DPO_CASES, ids=dpo_id)
def test_dpo_matches_composition(backend, device, case):
    fused, comp = run_dpo(case, FP32, device, chunk=5)
    check_against_composition(fused, comp, rtol=1e-4, atol=1e-5)


def test_dpo_matches_composition_in_float64_with_reference_model(device):
    fused, comp = run_dpo(DPO_CASES[0], FP64, device, chunk=7, ref_from_hidden=True)
    check_against_composition(fused, comp, rtol=1e-10, atol=1e-12)


def test_dpo_reference_from_hidden_equals_precomputed(backend, device):
    fused, comp = run_dpo(DPO_CASES[1], FP32, device, chunk=4, ref_from_hidden=True)
    check_against_composition(fused, comp, rtol=1e-4, atol=1e-5)


def count_chunk_logits(monkeypatch):
    calls = []
    original = lm_head_chunks.chunk_logits
    monkeypatch.setattr(lm_head_chunks, "chunk_logits", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    return calls


@pytest.mark.parametrize("case", DPO_CASES, ids=dpo_id)
def test_dpo_single_sweep_matches_composition(backend, device, case, monkeypatch):
    """chunk 13 >= any pair (at most 12 kept tokens): one pair-aligned sweep, logits once each."""
    calls = count_chunk_logits(monkeypatch)
    fused, comp = run_dpo(case, FP32, device, chunk=13, upstream=0.7)
    check_against_composition(fused, comp, rtol=1e-4, atol=1e-5)
    # calls: the reference log-probs (one chunk of the n kept tokens), the fused head's chunks,
    # then the composition's forward and backward (n each): the fused chunks cover n once
    n_kept, fused_chunks = calls[0], calls[1:-2]
    assert calls[-2:] == [n_kept, n_kept] and sum(fused_chunks) == n_kept
    assert max(fused_chunks) <= 13


@pytest.mark.parametrize("ref_from_hidden", [False, True])
def test_dpo_single_sweep_in_float64_default_chunks(device, ref_from_hidden):
    for case in (DPO_CASES[0], DPO_CASES[3], DPO_CASES[6]):
        fused, comp = run_dpo(case, FP64, device, chunk=None, ref_from_hidden=ref_from_hidden)
        check_against_composition(fused, comp, rtol=1e-10, atol=1e-12)


def test_dpo_single_sweep_computes_each_chunk_once_and_fallback_twice(monkeypatch, device):
    h, w, b, t = head(4, 3, 5, 13, FP32, device)  # 2 pairs of 6 tokens (no mask)
    refs = torch.randn(4).to(device)
    calls = count_chunk_logits(monkeypatch)
    for chunk, expected in ((8, [6, 6]), (12, [12]), (13, [12]), (5, [5, 5, 2] * 2)):
        calls.clear()
        params = leaves(h, w, b)
        loss, _ = fused_dpo_loss(params[0], params[1], t, mask=None, bias=params[2], chunk_size=chunk, ref_logps=refs)
        loss.backward()
        assert calls == expected, chunk
    # with a mask: kept tokens per pair 4 (rows 0, 2) and 2 (rows 1, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.bool, device=device)
    for chunk, expected in ((6, [6]), (5, [4, 2]), (3, [3, 3] * 2)):
        calls.clear()
        params = leaves(h, w, b)
        loss, _ = fused_dpo_loss(params[0], params[1], t, mask=mask, bias=params[2], chunk_size=chunk, ref_logps=refs)
        loss.backward()
        assert calls == expected, chunk


@pytest.mark.parametrize("case", [DPO_CASES[1], DPO_CASES[4], DPO_CASES[6]], ids=dpo_id)
def test_dpo_fallback_equals_single_sweep(device, case):
    """A chunk smaller than a pair forces the two-sweep path; same loss, stats, gradients."""
    results = []
    for chunk in (None, 2):
        torch.manual_seed(1234)  # the same random inputs for both paths
        results.append(run_dpo(case, FP64, device, chunk=chunk, upstream=1.3)[0])
    (loss_s, stats_s, grads_s), (loss_f, stats_f, grads_f) = results
    assert_same(loss_f, loss_s, 1e-12, 1e-14, "loss")
    for key in stats_s:
        assert_same(stats_f[key], stats_s[key], 1e-12, 1e-14, key)
    for g_f, g_s in zip(grads_f, grads_s):
        assert_same(g_f, g_s, 1e-10, 1e-12, "grad")


@pytest.mark.parametrize("case", [DPO_CASES[0], DPO_CASES[2], DPO_CASES[4], DPO_CASES[5]], ids=dpo_id)
@pytest.mark.parametrize("chunk", [7, 12, 2])
def test_dpo_uneven_pairs_and_all_masked_rows(backend, device, case, chunk):
    """Kept tokens per pair 1+6, 6+1 and 0+4 (an all-masked chosen row): chunk 7 holds one
    pair each, 12 packs pairs 1 and 2 together, 2 falls back to two sweeps."""
    mask = torch.zeros(6, 6, dtype=torch.bool, device=device)
    mask[0, 5] = True          # chosen of pair 0: one token, at the end
    mask[3, :] = True          # rejected of pair 0: six tokens
    mask[1, :] = True          # pair 1 reversed
    mask[4, 2] = True
    mask[5, 1:5] = True        # pair 2: chosen row 2 all masked, rejected four tokens
    fused, comp = run_dpo(case, FP32, device, chunk=chunk, mask=mask)
    check_against_composition(fused, comp, rtol=1e-4, atol=1e-5)


def test_dpo_all_masked_pairs(device):
    """A whole pair without kept tokens, and a batch without any: finite, gradients zero there."""
    mask = torch.zeros(6, 6, dtype=torch.bool, device=device)
    mask[0, :3] = mask[3, 2:] = True  # pair 0 only; pairs 1 and 2 fully masked
    fused, comp = run_dpo(DPO_CASES[0], FP64, device, chunk=6, mask=mask)
    check_against_composition(fused, comp, rtol=1e-10, atol=1e-12)
    assert (fused[2][0][[1, 2, 4, 5]] == 0).all()
    fused, comp = run_dpo(DPO_CASES[0], FP64, device, chunk=4, mask=torch.zeros_like(mask))
    check_against_composition(fused, comp, rtol=1e-10, atol=1e-12)
    assert all((g == 0).all() for g in fused[2])


# --- bad input ------------------------------------------------------------------------------


def _ppo_args():
    t = torch.zeros(2, 3, dtype=torch.long)
    return dict(hidden=torch.zeros(2, 3, 4), weight=torch.zeros(7, 4), targets=t,
                old_logp=torch.zeros(2, 3), advantages=torch.zeros(2), mask=None)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(hidden=torch.zeros(6, 4)), "hidden must be"),
        (dict(old_logp=torch.zeros(2, 4)), "old_logp must have shape"),
        (dict(advantages=torch.zeros(3)), "advantages must have shape"),
        (dict(ref_logp=torch.zeros(3, 3), kl_coef=0.1), "ref_logp must have shape"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(aggregation="mean"), "aggregation"),
        (dict(kl_coef=-1.0), "kl_coef"),
        (dict(entropy_coef=-0.1), "entropy_coef"),
        (dict(weight=torch.zeros(7, 5)), "weight must be"),
    ],
)
def test_ppo_bad_input_raises_value_error(change, match):
    args = _ppo_args()
    kwargs = {}
    for key, value in change.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(ValueError, match=match):
        fused_ppo_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("old_logp"),
                       args.pop("advantages"), mask=args.pop("mask"), **kwargs)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(hidden=torch.zeros(3, 3, 4), targets=torch.zeros(3, 3, dtype=torch.long)), "2B sequences"),
        (dict(), "exactly one of ref_logps or ref_hidden"),
        (dict(ref_logps=torch.zeros(4), ref_hidden=torch.zeros(4, 3, 4), ref_weight=torch.zeros(7, 4)), "both"),
        (dict(ref_hidden=torch.zeros(4, 3, 4)), "ref_weight"),
        (dict(ref_hidden=torch.zeros(4, 3, 5), ref_weight=torch.zeros(7, 4)), "ref_weight must be"),
        (dict(ref_logps=torch.zeros(2)), "ref_logps must have shape"),
        (dict(ref_logps=torch.zeros(4), loss_type="kto"), "loss_type"),
    ],
)
def test_dpo_bad_input_raises_value_error(change, match):
    args = dict(hidden=torch.zeros(4, 3, 4), weight=torch.zeros(7, 4), targets=torch.zeros(4, 3, dtype=torch.long))
    args.update({k: change.pop(k) for k in list(change) if k in args})
    with pytest.raises(ValueError, match=match):
        fused_dpo_loss(args["hidden"], args["weight"], args["targets"], mask=None, **change)


# --- GPU ----------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_bf16_ppo_and_dpo_match_composition():
    device = torch.device("cuda")
    h, w, b, t = head(4, 300, 256, 50_257, torch.bfloat16, device)
    mask = torch.rand(4, 300).to(device) > 0.3
    old, ref, adv = ppo_inputs(h, w, b, t, mask, False, 1.0)
    results = []
    for fused in (True, False):
        params = leaves(h, w, b)
        opts = dict(ref_logp=ref, kl_coef=0.05, entropy_coef=0.01)
        if fused:
            loss, _ = fused_ppo_loss(params[0], params[1], t, old, adv, mask=mask, bias=params[2], chunk_size=256, kl_estimator="k3", **opts)
        else:
            logp, ent = linear_token_logprobs(params[0], params[1], t, bias=params[2], mask=mask,
                                              return_entropy=True, chunk_size=256)
            loss, _ = ppo_composite_loss(
                logp, ent, old, adv, mask, kl_estimator="k3", kl_clamp=20.0, clip_range=0.2, clip_range_high=0.2,
                dual_clip=None, aggregation="token_mean", loss_constant=None, is_weights=None, **opts)
        loss.backward()
        results.append((loss.detach(), [p.grad.float() for p in params]))
    (loss_f, grads_f), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_f, loss_c, rtol=1e-4, atol=1e-5)
    for g, gc in zip(grads_f, grads_c):
        # the same bf16 matmuls on both sides; only the final bf16 rounding order may differ
        torch.testing.assert_close(g, gc, rtol=2e-2, atol=1e-3 * gc.abs().max().item())
