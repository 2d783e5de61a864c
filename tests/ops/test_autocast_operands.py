"""The lm-head ops under torch.autocast (mixed-precision training): fp32 hidden states and fp32
master weights reach the op as bf16 operands, the op keeps its fp32 accumulation (autocast
does not lower its internal matmuls), and the gradients flow back to the fp32 weights.

Expected values: the same op called without autocast on explicitly cast bf16 operands.
"""

from __future__ import annotations

import pytest
import torch

from rftengine.ops import fused_dpo_loss, fused_ppo_loss, linear_token_logprobs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

BF16 = torch.bfloat16


def inputs(rows=4, seq=7, hidden=24, vocab=41, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, seq, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5
    b = torch.randn(vocab, generator=gen) * 0.1
    targets = torch.randint(0, vocab, (rows, seq), generator=gen)
    mask = torch.rand(rows, seq, generator=gen) > 0.3
    return h, w, b, targets, mask


def leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


def run_both(fn):
    """``fn(h, w, b)`` under bf16 autocast on fp32 leaves, and without autocast on bf16 casts of
    the same leaves; returns both outputs and both gradient triples (w.r.t. the fp32 leaves)."""
    h, w, b, *_ = inputs()
    out = []
    for mixed in (True, False):
        lh, lw, lb = leaves(h, w, b)
        if mixed:
            with torch.autocast("cpu", dtype=BF16):
                value = fn(lh, lw, lb)
        else:
            value = fn(lh.to(BF16), lw.to(BF16), lb.to(BF16))
        value.sum().backward()
        out.append((value.detach(), [lh.grad, lw.grad, lb.grad]))
    return out


def test_linear_token_logprobs_under_autocast_reads_bf16_operands():
    _, _, _, targets, mask = inputs()
    (mixed, g_mixed), (plain, g_plain) = run_both(
        lambda h, w, b: linear_token_logprobs(h, w, targets, bias=b, mask=mask))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)
    for a, b in zip(g_mixed, g_plain):
        assert a.dtype == torch.float32          # the fp32 master weight gets an fp32 gradient
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_ppo_loss_under_autocast_reads_bf16_operands():
    _, _, _, targets, mask = inputs()
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(targets.shape, generator=gen) * 3
    adv = torch.randn(targets.shape[0], generator=gen)
    (mixed, g_mixed), (plain, g_plain) = run_both(
        lambda h, w, b: fused_ppo_loss(h, w, targets, old, adv, mask=mask, bias=b, entropy_coef=0.01)[0])
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)
    for a, b in zip(g_mixed, g_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_dpo_loss_under_autocast_casts_the_reference_too():
    h, w, b, targets, mask = inputs()
    ref_h = torch.randn(h.shape, generator=torch.Generator().manual_seed(5))

    def loss(h, w, b, ref):
        return fused_dpo_loss(h, w, targets, mask=mask, bias=b, ref_hidden=ref, ref_weight=w.detach(),
                              ref_bias=b.detach())[0]

    (mixed, g_mixed), (plain, g_plain) = run_both(
        lambda h, w, b: loss(h, w, b, ref_h if h.dtype == torch.float32 else ref_h.to(BF16)))
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)
    for a, b in zip(g_mixed, g_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float64_is_never_cast():
    h, w, b, targets, mask = (t.double() if t.is_floating_point() else t for t in inputs())
    with torch.autocast("cpu", dtype=BF16):
        out = linear_token_logprobs(h, w, targets, bias=b, mask=mask)
    assert out.dtype == torch.float64
