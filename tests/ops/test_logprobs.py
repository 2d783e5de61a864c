"""token_logprobs on both backends (torch reference, Triton kernels) against a float64 oracle.

Tolerances are derived, not tuned:
- logp and entropy are accumulated in fp32 whatever the logits dtype, so their error is a few
  fp32 roundings of values as large as max|z| + log V (`accumulation_tol`), for bf16 inputs too;
- dlogits is returned in the logits dtype, so each entry may also be off by one rounding to that
  dtype (under one ulp, eps relative: the Triton interpreter truncates fp32 -> bf16 casts where
  the GPU rounds to nearest), plus the fp32 error of p = exp(logp) it is built from;
- flash-attention style: our error is at most twice that of plain torch computing in the same
  dtype (plus the fp32 term above), measured on the same inputs against the same oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from rftengine.kernels import logprobs as kernel_module
from rftengine.ops import logprobs as op_module
from rftengine.ops import token_logprobs

# The interpreter evaluates every lane with numpy, including lanes that tl.where then discards
# (log(0) on masked rows, 0 * -inf beside banned tokens); their numpy warnings are noise.

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@dataclass
class Oracle:
    logp: torch.Tensor  # [..., T]
    entropy: torch.Tensor  # [..., T]
    grad: torch.Tensor | None  # [..., T, V] d(sum(g_logp * logp + g_ent * entropy)) / dlogits
    logp_all: torch.Tensor  # [..., T, V] log_softmax(z)
    probs: torch.Tensor  # [..., T, V]


def oracle(logits, targets, *, temperature=1.0, mask=None, grad_logp=None, grad_entropy=None,
           dtype=FP64) -> Oracle:
    """log_softmax + gather computed in `dtype` (float64: the oracle; else plain torch in that
    dtype), entropy -sum p log p, and the gradient of the weighted sum by autograd."""
    x = logits.detach().to(dtype).requires_grad_()
    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
    logp_all = torch.log_softmax(x / temperature, dim=-1)
    probs = logp_all.exp()
    # where() outside the product: p * where(...) keeps the backward of -inf logits finite
    entropy = -(probs * torch.where(probs > 0, logp_all, 0)).sum(-1)
    entropy = torch.where(keep, entropy, 0)
    safe_targets = torch.where(keep, targets, 0).long()
    logp = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, logp, 0)
    grad = None
    if grad_logp is not None or grad_entropy is not None:
        loss = x.new_zeros(())
        if grad_logp is not None:
            loss = loss + (logp * grad_logp.to(dtype)).sum()
        if grad_entropy is not None:
            loss = loss + (entropy * grad_entropy.to(dtype)).sum()
        (grad,) = torch.autograd.grad(loss, x)
    return Oracle(logp.detach(), entropy.detach(), grad, logp_all.detach(), probs.detach())


def accumulation_tol(z_absmax: float, vocab: int, dtype=FP32) -> float:
    """Absolute error bound of logp / lse / entropy accumulated in fp32 (float64 for float64)."""
    unit = 2.0**-53 if dtype == FP64 else 2.0**-24
    return 16 * unit * (z_absmax + math.log(vocab) + 1)


def grad_tol(ref: Oracle, targets, dtype, acc_tol, temperature, grad_logp=None, grad_entropy=None):
    """Elementwise bound for dlogits: one rounding to `dtype`, a few fp32 roundings of the terms
    it sums, and the fp32 error of p_j.

    d/dz_j = (g (1[j=t] - p_j) - g_H p_j (log p_j + H)) / T; an error e in log p_j moves p_j by p_j e.
    """
    info = torch.finfo(dtype)
    unit = 2.0**-53 if dtype == FP64 else 2.0**-24
    zeros = torch.zeros_like(ref.logp)
    g = (grad_logp.double().abs() if grad_logp is not None else zeros).unsqueeze(-1)
    g_h = (grad_entropy.double().abs() if grad_entropy is not None else zeros).unsqueeze(-1)
    live = ref.probs > 0
    onehot = torch.zeros_like(ref.probs).scatter_(-1, targets.clamp(0, None).long().unsqueeze(-1), 1.0)
    log_term = torch.where(live, ref.logp_all.abs(), 0) + ref.entropy.unsqueeze(-1) + 2
    p_weighted = torch.where(live, ref.probs * (g + g_h * log_term), 0)
    terms = (g * onehot + p_weighted) / temperature
    compute = 4 * acc_tol * p_weighted / temperature + 8 * unit * terms
    rounding = info.eps * ref.grad.abs() + info.tiny * info.eps
    return rounding + compute


def finite_absmax(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return finite.double().abs().max().item() if finite.numel() else 0.0


def assert_close(name, ours, ref, tol, plain=None):
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours.double() - ref).abs()
    tol = torch.as_tensor(tol, dtype=FP64, device=err.device).expand_as(err)
    ratio = (err / tol).max().item() if err.numel() else 0.0
    assert ratio <= 1, f"{name}: max error {err.max().item():.3g} is {ratio:.2f}x its bound"
    if plain is not None and err.numel():
        plain_err = (plain.double() - ref).abs().max().item()
        bound = 2 * plain_err + tol.max().item()
        assert err.max().item() <= bound, (
            f"{name}: error {err.max().item():.3g} above 2x plain torch's {plain_err:.3g}"
        )


def run_op(logits, targets, *, temperature=1.0, mask=None, grad_logp=None, grad_entropy=None):
    """token_logprobs forward with entropy, then backward with the given upstream gradients."""
    x = logits.detach().clone().requires_grad_()
    logp, entropy = token_logprobs(x, targets, temperature=temperature, mask=mask, return_entropy=True)
    loss = logp.new_zeros(())
    if grad_logp is not None:
        loss = loss + (logp * grad_logp).sum()
    if grad_entropy is not None:
        loss = loss + (entropy * grad_entropy).sum()
    loss.backward()
    return logp.detach(), entropy.detach(), x.grad


def random_case(shape, dtype, device, scale=2.0):
    logits = (torch.randn(shape).to(device) * scale).to(dtype)
    targets = torch.randint(0, shape[-1], shape[:-1]).to(device)
    grad_logp = torch.randn(shape[:-1]).to(device)
    grad_entropy = torch.randn(shape[:-1]).to(device)
    return logits, targets, grad_logp, grad_entropy


def check_against_oracle(logits, targets, *, temperature=1.0, mask=None, grad_logp=None,
                         grad_entropy=None, compare_plain=True):
    logp, entropy, grad = run_op(logits, targets, temperature=temperature, mask=mask,
                                 grad_logp=grad_logp, grad_entropy=grad_entropy)
    kw = dict(temperature=temperature, mask=mask, grad_logp=grad_logp, grad_entropy=grad_entropy)
    ref = oracle(logits, targets, **kw)
    plain = oracle(logits, targets, dtype=logits.dtype, **kw) if compare_plain else None
    acc = accumulation_tol(finite_absmax(logits) / temperature, logits.shape[-1], logits.dtype)

    assert logp.dtype == (FP64 if logits.dtype == FP64 else FP32)
    assert logp.shape == entropy.shape == targets.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert_close("logp", logp, ref.logp, acc, plain.logp if plain else None)
    assert_close("entropy", entropy, ref.entropy, acc, plain.entropy if plain else None)
    assert_close("dlogits", grad, ref.grad,
                 grad_tol(ref, targets, logits.dtype, acc, temperature, grad_logp, grad_entropy),
                 plain.grad if plain else None)
    return logp, entropy, grad


SHAPES = [
    ((1, 1, 1271), 1.0),  # T = 1; V not a multiple of any block
    ((2, 3, 1271), 0.7),
    ((5, 4097), 1.3),  # [N, V]; one full 4096 block + 1 column
    ((3, 41), 2.0),
]


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=str)
@pytest.mark.parametrize("shape,temperature", SHAPES, ids=[str(s[0]) for s in SHAPES])
def test_matches_float64(backend, device, shape, temperature, dtype):
    logits, targets, grad_logp, grad_entropy = random_case(shape, dtype, device)
    check_against_oracle(logits, targets, temperature=temperature,
                         grad_logp=grad_logp, grad_entropy=grad_entropy)


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=str)
def test_one_row_vocab_near_150k(backend, device, dtype):
    logits, targets, grad_logp, grad_entropy = random_case((1, 1, 151936), dtype, device, scale=3.0)
    check_against_oracle(logits, targets, temperature=0.9,
                         grad_logp=grad_logp, grad_entropy=grad_entropy)


@pytest.mark.parametrize("upstream", ["logp", "entropy", "both"])
def test_upstream_gradients(backend, device, upstream):
    """Only one output used (the other's gradient is None), and zero / negative upstream values."""
    logits, targets, grad_logp, grad_entropy = random_case((4, 3, 777), BF16, device)
    grad_logp[0, 0] = 0
    grad_entropy[1, 2] = 0
    check_against_oracle(
        logits, targets, temperature=0.8,
        grad_logp=None if upstream == "entropy" else grad_logp,
        grad_entropy=None if upstream == "logp" else grad_entropy,
    )


def test_broadcast_upstream_and_no_entropy(backend, device):
    """logp.sum(): the upstream gradient is an expanded (stride-0) tensor; entropy not requested."""
    logits, targets, _, _ = random_case((2, 5, 300), FP16, device)
    x = logits.clone().requires_grad_()
    out = token_logprobs(x, targets)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    out.sum().backward()
    ones = torch.ones(2, 5, device=device)
    ref = oracle(logits, targets, grad_logp=ones)
    acc = accumulation_tol(logits.double().abs().max().item(), 300)
    assert_close("logp", out.detach(), ref.logp, acc)
    assert_close("dlogits", x.grad, ref.grad, grad_tol(ref, targets, FP16, acc, 1.0, grad_logp=ones))


def test_no_grad_input(backend, device):
    logits, targets, _, _ = random_case((2, 50), FP32, device)
    logp = token_logprobs(logits, targets)
    assert not logp.requires_grad
    assert_close("logp", logp, oracle(logits, targets).logp, accumulation_tol(10.0, 50))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32], ids=str)
def test_mask(backend, device, mask_dtype):
    shape = (3, 4, 1000)
    logits, targets, grad_logp, grad_entropy = random_case(shape, BF16, device)
    mask = torch.rand(shape[:-1]).to(device) > 0.3
    mask[1] = False  # a fully masked sequence
    mask[2, 0] = True
    targets = torch.where(mask, targets, -100).to(torch.int32)  # padding ids where masked
    logp, entropy, grad = check_against_oracle(
        logits, targets, temperature=1.5, mask=mask.to(mask_dtype),
        grad_logp=grad_logp, grad_entropy=grad_entropy,
    )
    assert (logp[~mask] == 0).all() and (entropy[~mask] == 0).all()
    assert (grad[~mask] == 0).all(), "masked positions must get exactly zero gradient"
    assert (grad[mask] != 0).any()


def test_all_masked(backend, device):
    logits, _, grad_logp, grad_entropy = random_case((2, 3, 129), FP16, device)
    targets = torch.full((2, 3), -100, device=device)
    mask = torch.zeros(2, 3, device=device, dtype=torch.bool)
    logp, entropy, grad = run_op(logits, targets, mask=mask, grad_logp=grad_logp, grad_entropy=grad_entropy)
    assert (logp == 0).all() and (entropy == 0).all()
    assert (grad == 0).all() and grad.dtype == FP16


def test_masked_rows_with_huge_logits(backend, device):
    """A masked row's log-sum-exp is never formed, so logits far past exp's range there are harmless."""
    logits, targets, grad_logp, grad_entropy = random_case((3, 200), FP32, device)
    logits[1] = 1e4
    logits[1, ::2] = -1e4
    mask = torch.tensor([True, False, True], device=device)
    logp, entropy, grad = check_against_oracle(
        logits, targets, mask=mask, grad_logp=grad_logp, grad_entropy=grad_entropy, compare_plain=False
    )
    assert (grad[1] == 0).all()


STRIDED_VOCAB = 1271
# layout: (shape of the leaf tensor, view of it handed to the op)
STRIDED_VIEWS = {
    "vocab_slice": ((6, STRIDED_VOCAB + 29), lambda t: t[:, :STRIDED_VOCAB]),  # strided rows, no copy
    "row_step": ((12, STRIDED_VOCAB), lambda t: t[::2]),
    "transposed": ((STRIDED_VOCAB, 6), lambda t: t.t()),  # strided vocab dim: copied
    "batch_transposed": ((2, 3, STRIDED_VOCAB), lambda t: t.transpose(0, 1)),
}


@pytest.mark.parametrize("layout", list(STRIDED_VIEWS))
def test_non_contiguous_logits(backend, device, layout):
    """The gradient must land on the right entries of the underlying leaf tensor."""
    vocab = STRIDED_VOCAB
    shape, view = STRIDED_VIEWS[layout]
    base = torch.randn(shape).to(device)
    base = base.to(BF16).requires_grad_()
    logits = view(base)
    assert not logits.is_contiguous()
    targets = torch.randint(0, vocab, logits.shape[:-1]).to(device)
    grad_logp = torch.randn(logits.shape[:-1]).to(device)
    grad_entropy = torch.randn(logits.shape[:-1]).to(device)
    logp, entropy = token_logprobs(logits, targets, temperature=0.7, return_entropy=True)
    ((logp * grad_logp).sum() + (entropy * grad_entropy).sum()).backward()

    dense = logits.detach().contiguous()
    ref = oracle(dense, targets, temperature=0.7, grad_logp=grad_logp, grad_entropy=grad_entropy)
    acc = accumulation_tol(dense.double().abs().max().item() / 0.7, vocab)
    assert_close("logp", logp.detach(), ref.logp, acc)
    assert_close("entropy", entropy.detach(), ref.entropy, acc)
    assert_close("dlogits", view(base.grad), ref.grad,
                 grad_tol(ref, targets, BF16, acc, 0.7, grad_logp, grad_entropy))
    untouched = torch.ones_like(base, dtype=torch.bool)
    view(untouched).fill_(False)
    assert (base.grad[untouched] == 0).all()


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=str)
def test_extreme_logits(backend, device, dtype):
    logits, targets, grad_logp, grad_entropy = random_case((4, 333), FP32, device)
    logits[:, ::7] = 1e4
    logits[:, 3::11] = -1e4
    logits[2] = -1e4
    logits[2, 5] = 1e4
    targets[0] = 7  # a +1e4 logit
    targets[1] = 3  # a -1e4 logit: logp near -2e4
    logp, entropy, grad = check_against_oracle(
        logits.to(dtype), targets, temperature=0.9, grad_logp=grad_logp, grad_entropy=grad_entropy,
        compare_plain=False,
    )
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=str)
def test_neg_inf_logits(backend, device, dtype):
    """-inf logits (banned tokens) get probability 0 and gradient 0; logp at finite targets is
    finite, including when whole vocabulary blocks (the first one too) are -inf."""
    vocab = 5000
    logits, targets, grad_logp, grad_entropy = random_case((3, vocab), dtype, device)
    logits[0, :4500] = float("-inf")
    logits[1, ::3] = float("-inf")
    logits[2, 1:] = float("-inf")  # one finite logit: logp 0, entropy 0
    targets[0] = 4700
    targets[1] = 4
    targets[2] = 0
    logp, entropy, grad = check_against_oracle(
        logits, targets, temperature=1.1, grad_logp=grad_logp, grad_entropy=grad_entropy,
        compare_plain=False,
    )
    assert (grad[torch.isinf(logits)] == 0).all()
    assert logp[2].abs().item() == 0 and entropy[2].abs().item() == 0


def test_reference_chunks_rows(device, monkeypatch):
    """The torch reference holds at most one chunk of fp32 logits: force many chunks (the last
    one partial) and check every log-sum-exp / exp sees at most the chunk's rows."""
    monkeypatch.setenv("RFTENGINE_BACKEND", "torch")
    vocab, n_rows = 257, 10
    monkeypatch.setattr(op_module, "_REFERENCE_CHUNK_ELEMENTS", 3 * vocab + 5)
    assert op_module.reference_rows_per_chunk(vocab) == 3
    seen = []
    for name in ("logsumexp", "exp"):
        original = getattr(torch, name)

        def spy(t, *args, _original=original, **kwargs):
            if t.dim() == 2 and t.shape[-1] == vocab:
                seen.append(t.shape[0])
            return _original(t, *args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    logits, targets, grad_logp, grad_entropy = random_case((n_rows, vocab), BF16, device)
    mask = torch.ones(n_rows, dtype=torch.bool, device=device)
    mask[4] = False
    logp, entropy, grad = run_op(logits, targets, mask=mask, grad_logp=grad_logp, grad_entropy=grad_entropy)
    monkeypatch.undo()

    assert seen and max(seen) == 3 and sum(seen) >= 3 * n_rows  # fwd lse, fwd exp, bwd exp
    ref = oracle(logits, targets, mask=mask, grad_logp=grad_logp, grad_entropy=grad_entropy)
    acc = accumulation_tol(logits.double().abs().max().item(), vocab)
    assert_close("logp", logp, ref.logp, acc)
    assert_close("entropy", entropy, ref.entropy, acc)
    assert_close("dlogits", grad, ref.grad, grad_tol(ref, targets, BF16, acc, 1.0, grad_logp, grad_entropy))


def test_default_reference_chunk_bounds_memory():
    assert op_module.reference_rows_per_chunk(151936) * 151936 <= op_module._REFERENCE_CHUNK_ELEMENTS
    assert op_module.reference_rows_per_chunk(1 << 30) == 1  # a row never splits


def test_float64_logits_use_float64(backend, device):
    """float64 logits (test oracles) stay float64 end to end; the Triton path hands them to torch."""
    logits, targets, grad_logp, grad_entropy = random_case((3, 2, 257), FP64, device)
    check_against_oracle(logits, targets, temperature=0.6, grad_logp=grad_logp,
                         grad_entropy=grad_entropy, compare_plain=False)


@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 7)])
def test_empty(backend, device, shape):
    logits = torch.randn(shape, dtype=BF16).to(device).requires_grad_()
    targets = torch.zeros(shape[:-1], device=device, dtype=torch.long)
    logp, entropy = token_logprobs(logits, targets, return_entropy=True)
    assert logp.shape == entropy.shape == shape[:-1]
    (logp.sum() + entropy.sum()).backward()
    assert logits.grad.shape == shape


def test_backend_selects_implementation(backend, device, monkeypatch):
    calls = []

    def wrap(module, name):
        original = getattr(module, name)

        def spy(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    wrap(kernel_module, "token_logprobs_forward")
    wrap(kernel_module, "token_logprobs_backward")
    wrap(op_module, "token_logprobs_forward_reference")
    wrap(op_module, "token_logprobs_backward_reference")
    logits = torch.randn(2, 33).to(device).requires_grad_()
    token_logprobs(logits, torch.tensor([1, 2], device=device)).sum().backward()
    if backend == "triton":
        assert calls == ["token_logprobs_forward", "token_logprobs_backward"]
    else:
        assert calls == ["token_logprobs_forward_reference", "token_logprobs_backward_reference"]


def test_invalid_backend_variable(monkeypatch):
    monkeypatch.setenv("RFTENGINE_BACKEND", "cuda")
    with pytest.raises(ValueError) as info:
        token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]))
    assert all(s in str(info.value) for s in ("RFTENGINE_BACKEND", "triton", "torch", "'cuda'"))


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("RFTENGINE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]))


V = 50


def _bad_inputs():
    logits = torch.randn(2, 3, V)
    targets = torch.randint(0, V, (2, 3))
    keep = torch.ones(2, 3, dtype=torch.bool)
    t_high, t_low, t_pad = targets.clone(), targets.clone(), targets.clone()
    t_high[0, 1] = V
    t_low[1, 2] = -1
    t_pad[1, 0] = -100
    meta = torch.device("meta")
    # (id, args, kwargs, fragments the message must contain: argument, expected, given)
    return [
        ("targets_too_high", (logits, t_high), {}, ["targets", f"[0, {V})", f"[{V}, {V}]"]),
        ("targets_negative", (logits, t_low), {}, ["targets", f"[0, {V})", "[-1, -1]"]),
        ("pad_id_unmasked", (logits, t_pad), {"mask": keep}, ["targets", f"[0, {V})", "-100"]),
        ("targets_shape", (logits, targets[:, :2]), {}, ["targets", "(2, 3)", "(2, 2)"]),
        ("targets_float", (logits, targets.float()), {}, ["targets", "integer", "torch.float32"]),
        ("targets_list", (logits, [[0, 1, 2]] * 2), {}, ["targets", "torch.Tensor", "list"]),
        ("logits_int", (logits.long(), targets), {}, ["logits", "floating", "torch.int64"]),
        ("logits_bool", (logits > 0, targets), {}, ["logits", "floating", "torch.bool"]),
        ("logits_scalar", (torch.tensor(1.0), targets), {}, ["logits", "[..., T, V]", "()"]),
        ("empty_vocab", (torch.randn(2, 0), torch.zeros(2, dtype=torch.long)), {},
         ["logits", "V > 0", "(2, 0)"]),
        ("targets_device", (logits, targets.to(meta)), {}, ["targets", "same device", "cpu", "meta"]),
        ("mask_device", (logits, targets), {"mask": keep.to(meta)}, ["mask", "same device", "cpu", "meta"]),
        ("temperature_zero", (logits, targets), {"temperature": 0.0}, ["temperature", "> 0", "0.0"]),
        ("temperature_negative", (logits, targets), {"temperature": -1}, ["temperature", "> 0", "-1"]),
        ("temperature_nan", (logits, targets), {"temperature": float("nan")}, ["temperature", "> 0", "nan"]),
        ("temperature_bool", (logits, targets), {"temperature": True}, ["temperature", "> 0", "True"]),
        ("temperature_str", (logits, targets), {"temperature": "1"}, ["temperature", "> 0", "'1'"]),
        ("mask_shape", (logits, targets), {"mask": keep[:, :2]}, ["mask", "(2, 3)", "(2, 2)"]),
        ("mask_values", (logits, targets), {"mask": torch.full((2, 3), 0.5)}, ["mask", "0/1"]),
        ("mask_list", (logits, targets), {"mask": [[1, 1, 1]] * 2}, ["mask", "torch.Tensor", "list"]),
    ]


@pytest.mark.parametrize("args,kwargs,fragments", [c[1:] for c in _bad_inputs()],
                         ids=[c[0] for c in _bad_inputs()])
def test_bad_input_raises(args, kwargs, fragments):
    with pytest.raises(ValueError) as info:
        token_logprobs(*args, **kwargs)
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message {message!r} lacks {missing}"


def test_masked_pad_ids_accepted():
    logits = torch.randn(2, 3, V)
    targets = torch.randint(0, V, (2, 3))
    mask = torch.ones(2, 3, dtype=torch.bool)
    targets[1, 0], mask[1, 0] = -100, False
    targets[0, 2], mask[0, 2] = V + 7, False
    logp = token_logprobs(logits, targets, mask=mask)
    assert logp[1, 0] == 0 and logp[0, 2] == 0
