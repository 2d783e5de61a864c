"""linear_token_logprobs on both backends against a float64 oracle (logits materialised).

Tolerance, flash-attention style: on the same fresh inputs our error against the float64
oracle is at most twice the error of plain torch working in the input dtype (logits from one
matmul in that dtype, softmax in fp32), plus a floor of a few fp32 roundings of the values
involved (plain torch can be exact by luck on tiny shapes; the floor keeps the bound honest).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rftengine.kernels import logprobs as kernel
from rftengine.ops.linear_logprobs import linear_token_logprobs, linear_token_logprobs_reference
from rftengine.ops.logprobs import logprob_grads_reference_, logprob_stats_reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def make_inputs(lead, hidden, vocab, dtype, device, *, bias=False, scale=1.0):
    h = (torch.randn(*lead, hidden).to(device) * scale).to(dtype)
    w = (torch.randn(vocab, hidden).to(device) / hidden**0.5 * 3).to(dtype)
    b = torch.randn(vocab).to(device).to(dtype) if bias else None
    t = torch.randint(0, vocab, lead).to(device)
    return h, w, b, t


def run(fn, h, w, b, t, g_logp, g_ent, dtype, **kw):
    """Values and input gradients of sum(g_logp * logp + g_ent * entropy), inputs cast to dtype."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    bias = leaves[2] if b is not None else None
    logp, ent = fn(leaves[0], leaves[1], t, bias=bias, return_entropy=True, **kw)
    loss = (logp.double() * g_logp).sum() + (ent.double() * g_ent).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [logp.detach(), ent.detach(), *(g.detach() for g in grads)]


def plain_torch(h, w, t, *, bias=None, temperature=1.0, mask=None, return_entropy=True):
    """What a user writes without the op: logits in the input dtype, softmax in fp32."""
    logits = h @ w.t()
    if bias is not None:
        logits = logits + bias
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    safe = t if mask is None else torch.where(mask.bool(), t, 0)
    logp = logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    ent = -(logprobs.exp() * logprobs).sum(-1)
    if mask is not None:
        logp, ent = logp * mask, ent * mask
    return logp, ent


def assert_close_to_oracle(ours, oracle, plain, names):
    for name, x, ref, base in zip(names, ours, oracle, plain):
        err = (x.double() - ref).abs().max().item()
        base_err = (base.double() - ref).abs().max().item()
        floor = 64 * 2.0**-24 * (ref.abs().max().item() + 1)
        assert err <= 2 * base_err + floor, f"{name}: error {err:.3g}, plain torch {base_err:.3g}"


NAMES = ("logp", "entropy", "d_hidden", "d_weight", "d_bias")


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize(
    "lead,hidden,vocab,use_bias,temperature,masked,chunk",
    [
        ((3, 7), 13, 37, True, 0.7, True, 4),
        ((11,), 9, 41, False, 1.0, False, None),
        ((2, 5), 16, 101, True, 1.3, False, 3),
        ((2, 9), 7, 29, False, 0.5, True, 1),
    ],
)
def test_matches_float64_oracle(backend, device, dtype, lead, hidden, vocab, use_bias,
                                temperature, masked, chunk):
    h, w, b, t = make_inputs(lead, hidden, vocab, dtype, device, bias=use_bias)
    mask = (torch.rand(lead).to(device) > 0.35) if masked else None
    g_logp = torch.randn(lead, dtype=FP64).to(device)
    g_ent = torch.randn(lead, dtype=FP64).to(device)
    kw = dict(temperature=temperature, mask=mask)
    ours = run(linear_token_logprobs, h, w, b, t, g_logp, g_ent, dtype, chunk_size=chunk, **kw)
    oracle = run(linear_token_logprobs_reference, h, w, b, t, g_logp, g_ent, FP64, **kw)
    plain = run(plain_torch, h, w, b, t, g_logp, g_ent, dtype, **kw)
    assert ours[0].shape == lead and ours[0].dtype == FP32 and ours[1].dtype == FP32
    assert ours[2].dtype == dtype and ours[3].dtype == dtype
    assert_close_to_oracle(ours, oracle, plain, NAMES)
    if masked:
        dropped = ~mask
        assert (ours[0][dropped] == 0).all() and (ours[1][dropped] == 0).all()
        assert (ours[2][dropped] == 0).all()


def test_float64_inputs_match_oracle_tightly(backend, device):
    h, w, b, t = make_inputs((4, 5), 11, 23, FP64, device, bias=True)
    g = torch.randn(4, 5, dtype=FP64).to(device)
    ours = run(linear_token_logprobs, h, w, b, t, g, g, FP64, temperature=0.9, chunk_size=3)
    oracle = run(linear_token_logprobs_reference, h, w, b, t, g, g, FP64, temperature=0.9)
    for name, x, ref in zip(NAMES, ours, oracle):
        assert x.dtype == FP64
        torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10, msg=name)


def test_chunking_does_not_change_the_result(backend, device):
    h, w, b, t = make_inputs((19,), 8, 31, FP32, device, bias=True)
    mask = torch.rand(19).to(device) > 0.3
    g = torch.randn(19, dtype=FP64).to(device)
    results = [
        run(linear_token_logprobs, h, w, b, t, g, g, FP32, mask=mask, chunk_size=c)
        for c in (1, 6, None)
    ]
    for other in results[1:]:
        for name, x, ref in zip(NAMES, other, results[0]):
            torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5, msg=name)


def test_all_masked_returns_zeros_and_zero_gradients(backend, device):
    h, w, b, t = make_inputs((2, 3), 6, 17, FP32, device, bias=True)
    t = torch.full_like(t, -100)  # never read at masked positions
    mask = torch.zeros(2, 3, device=device, dtype=torch.bool)
    g = torch.randn(2, 3, dtype=FP64).to(device)
    logp, ent, dh, dw, db = run(linear_token_logprobs, h, w, b, t, g, g, FP32, mask=mask)
    for x in (logp, ent, dh, dw, db):
        assert torch.isfinite(x).all() and (x == 0).all()


def test_float_mask_equals_bool_mask_and_padding_ids_are_ignored(backend, device):
    h, w, _, t = make_inputs((3, 4), 5, 19, FP32, device)
    keep = torch.rand(3, 4).to(device) > 0.5
    t = torch.where(keep, t, -100)
    g = torch.randn(3, 4, dtype=FP64).to(device)
    a = run(linear_token_logprobs, h, w, None, t, g, g, FP32, mask=keep)
    b = run(linear_token_logprobs, h, w, None, t, g, g, FP32, mask=keep.float())
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_entropy_only_and_logp_only_upstream(backend, device):
    h, w, _, t = make_inputs((9,), 6, 21, FP32, device)
    for use_logp in (True, False):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp, ent = linear_token_logprobs(hh, ww, t, return_entropy=True, chunk_size=4)
        (logp if use_logp else ent).sum().backward()
        h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
        lr, er = linear_token_logprobs_reference(h64, w64, t, return_entropy=True)
        (lr if use_logp else er).sum().backward()
        torch.testing.assert_close(hh.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ww.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_no_entropy_output_by_default(backend, device):
    h, w, _, t = make_inputs((2, 3), 4, 9, FP32, device)
    out = linear_token_logprobs(h, w, t)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)


def test_tied_embedding_gradient_accumulates(backend, device):
    vocab, hidden = 23, 10
    emb = (torch.randn(vocab, hidden).to(device) * 0.5).requires_grad_()
    ids = torch.randint(0, vocab, (3, 6)).to(device)
    proj = torch.randn(hidden, hidden).to(device) / hidden**0.5
    targets, mask = ids.roll(-1, dims=1), torch.ones(3, 6, dtype=torch.bool, device=device)
    mask[:, -1] = False
    g = torch.randn(3, 6).to(device)

    def loss(fn, weight):
        h = torch.tanh(weight[ids] @ proj.to(weight.dtype))
        return (fn(h, weight, targets, mask=mask) * g.to(weight.dtype)).sum()

    loss(lambda *a, **k: linear_token_logprobs(*a, chunk_size=5, **k), emb).backward()
    emb64 = emb.detach().double().requires_grad_()
    loss(linear_token_logprobs_reference, emb64).backward()
    torch.testing.assert_close(emb.grad.double(), emb64.grad, rtol=1e-4, atol=1e-5)


def test_fp32_weight_grad_matches(backend, device):
    h, w, b, t = make_inputs((13,), 8, 27, BF16, device, bias=True)
    g = torch.randn(13, dtype=FP64).to(device)
    a = run(linear_token_logprobs, h, w, b, t, g, g, BF16, chunk_size=3, fp32_weight_grad=True)
    oracle = run(linear_token_logprobs_reference, h, w, b, t, g, g, FP64)
    plain = run(plain_torch, h, w, b, t, g, g, BF16)
    assert a[3].dtype == BF16
    assert_close_to_oracle(a, oracle, plain, NAMES)


def test_hidden_without_grad_and_weight_without_grad(backend, device):
    h, w, _, t = make_inputs((7,), 5, 13, FP32, device)
    ww = w.clone().requires_grad_()
    linear_token_logprobs(h, ww, t).sum().backward()
    hh = h.clone().requires_grad_()
    linear_token_logprobs(hh, w, t).sum().backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    linear_token_logprobs_reference(h64, w64, t).sum().backward()
    torch.testing.assert_close(ww.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hh.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(hidden=torch.zeros(3, 4, dtype=torch.int64)), "hidden"),
        (dict(hidden=torch.zeros(2, 3, 4, 4)), "hidden must be"),
        (dict(weight=torch.zeros(11, 5)), "weight must be"),
        (dict(weight=torch.zeros(11, 4, dtype=FP64)), "weight must have the dtype"),
        (dict(targets=torch.zeros(3, 4, dtype=torch.long)), "targets must have shape"),
        (dict(targets=torch.zeros(3, dtype=torch.float32)), "targets must be an integer"),
        (dict(targets=torch.full((3,), 11)), r"targets must lie in \[0, 11\)"),
        (dict(bias=torch.zeros(10)), "bias must have shape"),
        (dict(temperature=0.0), "temperature"),
        (dict(mask=torch.ones(4, dtype=torch.bool)), "mask must have shape"),
        (dict(mask=torch.full((3,), 0.5)), "mask must hold only 0/1"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=2.5), "chunk_size"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(change, match):
    args = dict(hidden=torch.zeros(3, 4), weight=torch.zeros(11, 4), targets=torch.zeros(3, dtype=torch.long))
    kwargs = {}
    for key, value in change.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(ValueError, match=match):
        linear_token_logprobs(args["hidden"], args["weight"], args["targets"], **kwargs)


def test_out_of_range_targets_at_masked_positions_are_fine():
    h, w = torch.randn(3, 4), torch.randn(11, 4)
    t = torch.tensor([1, 99, 2])
    logp = linear_token_logprobs(h, w, t, mask=torch.tensor([True, False, True]))
    assert logp[1] == 0 and torch.isfinite(logp).all()


# --- the Triton passes on their own, under the interpreter on CPU -----------------------


def _chunk_case(device, rows=5, vocab=45, bias=True, keep=True):
    logits = torch.randn(rows, vocab).to(device) * 4
    b = torch.randn(vocab).to(device) if bias else None
    t = torch.randint(0, vocab, (rows,)).to(device)
    k = torch.tensor([True, False, True, True, False], device=device)[:rows] if keep else None
    return logits, b, t, k


@pytest.mark.parametrize("bias,keep", [(True, True), (False, False)])
def test_stats_kernel_matches_reference(device, bias, keep):
    logits, b, t, k = _chunk_case(device, bias=bias, keep=keep)
    ours = kernel.chunk_stats(logits, b, t, k, 0.8, True)
    ref = logprob_stats_reference(
        logits.double(), b.double() if bias else None, t, k, 0.8, True
    )
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad_dtype", [FP32, BF16])
def test_grads_kernel_in_place_matches_reference(device, grad_dtype):
    """grad_dtype bf16 over fp32 logits is the CUDA layout: gradient rows written over the
    first half of each logits row's own bytes."""
    logits, b, t, k = _chunk_case(device)
    _, lse, ent = logprob_stats_reference(logits, b, t, k, 0.8, True)
    g, g_ent = torch.randn(5).to(device), torch.randn(5).to(device)
    expected = logprob_grads_reference_(logits.clone(), b, t, k, 0.8, lse, ent, g, g_ent, FP32)
    buf = logits.clone()
    out = kernel.chunk_grads_(buf, b, t, k, 0.8, lse, ent, g, g_ent, grad_dtype)
    assert out.dtype == grad_dtype and out.shape == logits.shape
    assert out.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    torch.testing.assert_close(out.float(), expected.to(grad_dtype).float(), rtol=1e-2, atol=1e-5)
    assert (out[~k] == 0).all()


# --- memory -----------------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent(
    """
    import os, resource, sys, torch
    os.environ["RFTENGINE_BACKEND"] = "torch"
    from rftengine.ops.linear_logprobs import linear_token_logprobs
    n, vocab, hidden = int(sys.argv[1]), 50_000, 64
    torch.manual_seed(0)
    h = torch.randn(n, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.1).requires_grad_()
    t = torch.randint(0, vocab, (n,))
    g = torch.randn(n)
    linear_token_logprobs(h[:8], w, t[:8]).sum().backward()  # warm up allocator and kernels
    w.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (linear_token_logprobs(h, w, t) * g).sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


def _peak_growth_bytes(n: int) -> int:
    # A fixed mmap threshold makes glibc hand every large block back on free, so the peak RSS
    # measures what the op holds, not what the allocator keeps cached in its heap.
    env = dict(os.environ, RFTENGINE_BACKEND="torch", OMP_NUM_THREADS="2",
               MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(n)], capture_output=True, text=True, env=env,
        check=True, timeout=300,
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_cpu_reference_memory_does_not_grow_with_tokens():
    """N=4096, V=50,000: full fp32 logits would take 780 MiB; the op holds one chunk (~32 MiB
    plus a few same-size temporaries), so its peak is far below that and the same at N=1024."""
    full_logits = 4096 * 50_000 * 4
    small, large = _peak_growth_bytes(1024), _peak_growth_bytes(4096)
    assert large < full_logits / 3, f"peak grew by {large / 2**20:.0f} MiB"
    assert large - small < 64 * 2**20, f"{small / 2**20:.0f} MiB at N=1024, {large / 2**20:.0f} MiB at 4096"


# --- GPU ----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_cuda_matches_float64_oracle_at_a_real_vocabulary(dtype):
    device = torch.device("cuda")
    h, w, b, t = make_inputs((3, 341), 256, 50_257, dtype, device, bias=True)
    mask = torch.rand(3, 341).to(device) > 0.2
    g = torch.randn(3, 341, dtype=FP64).to(device)
    kw = dict(temperature=0.8, mask=mask)
    ours = run(linear_token_logprobs, h, w, b, t, g, g, dtype, chunk_size=256, **kw)
    oracle = run(linear_token_logprobs_reference, h, w, b, t, g, g, FP64, **kw)
    plain = run(plain_torch, h, w, b, t, g, g, dtype, **kw)
    assert_close_to_oracle(ours, oracle, plain, NAMES)
