"""No op reads a device value on the host while a CUDA graph is being captured.

A host read (``.item()``, ``bool(t)``, ``.tolist()``, ...) during capture is a sync, which
CUDA forbids there: the capture fails, or worse, a value read once is baked into the graph.
Every value check in `rftengine.ops._checks` is skipped under capture (`capturing()`); this
test simulates a capture on the CPU (the stream reports capturing, and every host read
raises) and calls every public op of `rftengine.ops`, forward and backward, so a check added
without the guard fails here rather than on the first GPU run.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from rftengine import ops
from rftengine.ops import _lm_head_chunks as lm_head_chunks

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def simulated_capture(monkeypatch):
    """torch.cuda reports a capture in progress and every host read of a tensor raises."""
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        for name in HOST_READS:
            def forbidden(self, *args, _name=name, **kwargs):
                raise HostRead(f"Tensor.{_name} called during CUDA-graph capture")

            m.setattr(torch.Tensor, name, forbidden)
        m.setattr(torch, "nonzero", lambda *a, **k: (_ for _ in ()).throw(HostRead("torch.nonzero")))
        yield


def _cases(device="cpu"):
    """One call per public op, with valid inputs and an integer mask where the op takes one
    (the 0/1 check of integer masks reads values: it must be skipped too)."""
    gen = torch.Generator().manual_seed(0)
    b, t, h, v = 2, 5, 8, 11
    mask = torch.ones(b, t, dtype=torch.int64)
    mask[1, 3:] = 0
    mask = mask.to(device)
    lengths = torch.tensor([3, 4], device=device)

    def x(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    def ids(*shape):
        return torch.randint(0, v, shape, generator=gen).to(device)

    return {
        "token_logprobs": lambda: ops.token_logprobs(x(b, t, v), ids(b, t), mask=mask, return_entropy=True),
        "linear_token_logprobs": lambda: ops.linear_token_logprobs(
            x(b, t, h), x(v, h), ids(b, t), mask=mask, return_entropy=True),
        "sequence_logprobs": lambda: ops.sequence_logprobs(x(b, t), mask=mask, reduction="mean"),
        "kl_penalty": lambda: ops.kl_penalty(x(b, t), x(b, t), estimator="k3", mask=mask),
        "ppo_policy_loss": lambda: ops.ppo_policy_loss(x(b, t), x(b, t), x(b), mask=mask, dual_clip=3.0),
        "value_loss": lambda: ops.value_loss(x(b, t), x(b, t), x(b, t), mask=mask),
        "gae": lambda: ops.gae(x(b, t), x(b, t), mask=mask),
        "whiten": lambda: ops.whiten(x(b, t), mask=mask),
        "group_advantages": lambda: ops.group_advantages(x(8), 4, scale="batch"),
        "dpo_loss": lambda: ops.dpo_loss(x(b), x(b), None, None, loss_type="simpo",
                                         chosen_lengths=lengths, rejected_lengths=lengths),
        "bradley_terry_loss": lambda: ops.bradley_terry_loss(x(b), x(b), margin=x(b).detach(), center_coef=0.01),
        "fused_ppo_loss": lambda: ops.fused_ppo_loss(
            x(b, t, h), x(v, h), ids(b, t), x(b, t).detach(), x(b, t).detach(), mask=mask,
            ref_logp=x(b, t).detach(), kl_estimator="k3", kl_coef=0.1, entropy_coef=0.01),
        "fused_dpo_loss": lambda: ops.fused_dpo_loss(
            x(b, t, h), x(v, h), ids(b, t), mask=mask, loss_type="simpo"),
        "sample_tokens": lambda: ops.sample_tokens(
            x(b, v).detach(), torch.arange(b, device=device), top_k=4, top_p=0.9, min_p=0.05, with_truncated=True),
    }


# ops whose outputs carry no gradient: called under capture, nothing to backpropagate
NOT_DIFFERENTIABLE = {"sample_tokens"}


def _first_tensor(out):
    if isinstance(out, tuple):
        return out[0]
    return out


def test_every_public_op_has_a_case():
    assert set(_cases()) == set(ops.__all__)


@pytest.mark.parametrize("name", sorted(_cases()))
def test_op_under_capture_makes_no_host_read(backend, device, monkeypatch, name):
    call = _cases(device)[name]
    eager = _first_tensor(call())  # outside capture the same call works (and may sync)
    assert eager.requires_grad != (name in NOT_DIFFERENTIABLE)
    call = _cases(device)[name]
    with simulated_capture(monkeypatch):
        out = _first_tensor(call())
        if name not in NOT_DIFFERENTIABLE:
            out.sum().backward()


def test_simulation_catches_a_host_read(monkeypatch):
    """The harness itself: an unguarded host read does fail."""
    with simulated_capture(monkeypatch), pytest.raises(HostRead):
        bool((torch.ones(2) > 0).all())


def test_dpo_length_check_under_capture(backend, device, monkeypatch):
    """Length-normalised DPO validated its lengths with an unguarded host read."""
    x = torch.zeros(2, device=device, requires_grad=True)
    lengths = torch.tensor([3, 4], device=device)
    with simulated_capture(monkeypatch):
        ops.dpo_loss(x, x, x.detach(), x.detach(), loss_type="ipo",
                     chosen_lengths=lengths, rejected_lengths=lengths)


def test_fp32_out_probe_not_cached_during_capture(monkeypatch):
    """The matmul-capability probe neither runs nor caches its answer inside a capture."""
    monkeypatch.setattr(lm_head_chunks, "_FP32_OUT_PROBED", {})
    probes = []

    def probe_ones(*args, **kwargs):
        probes.append(kwargs.get("device"))
        raise RuntimeError("no CUDA device in this test")

    monkeypatch.setattr(lm_head_chunks.torch, "ones", probe_ones)
    cuda = torch.device("cuda", 0)
    with simulated_capture(monkeypatch):
        assert lm_head_chunks._fp32_out_matmuls(cuda) is False
    assert probes == [] and lm_head_chunks._FP32_OUT_PROBED == {}
    # outside capture the probe runs once and its answer is cached
    assert lm_head_chunks._fp32_out_matmuls(cuda) is False
    assert probes == [cuda] and lm_head_chunks._FP32_OUT_PROBED == {cuda: False}
    lm_head_chunks._fp32_out_matmuls(cuda)
    assert probes == [cuda]
