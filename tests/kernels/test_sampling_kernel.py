"""The Triton sampler against the torch reference: the same tokens for the same noise keys, the
same log-probs, the truncated distribution. Runs in Triton's interpreter on CPU (slow: small
vocabularies and few rows), compiled on a GPU (inputs drawn on the CPU, then moved to `device`).

Tokens are compared exactly: both paths race on the same noise with the same fp32 operations
(multiply by float32(1/T), z - log(-log u), z - max >= float32(log min_p)), so they can differ
only where two candidates' race scores, or a kept mass and top_p, agree to the last float bit;
none of these rows comes near that.
"""

import math

import pytest
import torch

from rftengine.ops import sample_tokens
from rftengine.ops.sampling import noise_keys
from tests.generation.test_sampling import chi_square, kept_set_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def keys(n: int, seed: int = 0, step: int = 0) -> torch.Tensor:
    return noise_keys(torch.tensor([seed]), torch.arange(n), torch.tensor([step]))


def both_paths(monkeypatch, device, logits, k, **params):
    """(triton outputs, torch outputs) of sample_tokens with_truncated, on `device`, back on the CPU."""
    out = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("RFTENGINE_BACKEND", backend)
        result = sample_tokens(logits.to(device), k.to(device), with_truncated=True, **params)
        out[backend] = tuple(t.cpu() for t in result)
    return out["triton"], out["torch"]


def assert_same(kernel, reference):
    tokens, logp, truncated = kernel
    assert tokens.dtype == torch.int64 and logp.dtype == torch.float32 and truncated.dtype == torch.float32
    assert torch.equal(tokens, reference[0])
    torch.testing.assert_close(logp, reference[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(truncated, reference[2], rtol=0, atol=1e-5)


CHI2_2DF_1E4 = 18.5

PARAMS = [
    dict(temperature=1.0),
    dict(temperature=0.6, top_k=1),
    dict(temperature=1.3, top_k=5),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.9, top_k=40, top_p=0.7, min_p=0.02),
]


@pytest.mark.parametrize("vocab,rows", [(7, 5), (257, 3), (1000, 3)])
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
def test_kernel_draws_the_reference_tokens(monkeypatch, device, vocab, rows, params):
    logits = torch.randn(rows, vocab) * 3
    k = keys(rows, seed=vocab, step=3)
    kernel, reference = both_paths(monkeypatch, device, logits, k, **params)
    assert_same(kernel, reference)


def test_half_precision_strided_logits_with_ties_and_minus_inf(monkeypatch, device):
    """bf16 logits (many exact ties), a row stride wider than V, -inf logits (banned tokens),
    and top-k larger than the number of finite logits in a row."""
    wide = (torch.randn(5, 300) * 2).to(torch.bfloat16).to(device)
    logits = wide[:, :257]
    logits[1, 10:] = float("-inf")
    logits[2, ::2] = float("-inf")
    k = keys(5, seed=1, step=9)
    for params in (dict(top_k=50), dict(top_p=0.95, min_p=0.1), dict(top_k=1), dict(temperature=0.5)):
        kernel, reference = both_paths(monkeypatch, device, logits, k, **params)
        assert_same(kernel, reference)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_many_blocks_per_row(monkeypatch, device, scale):
    """Blocks of 32 columns (the real ones hold up to 2048): the online log-sum-exp, the race's
    best across blocks, the searches' block skipping and, with logits spread wider than the
    race's largest bonus (scale 30), the blocks that cannot win and draw no noise."""
    import triton

    from rftengine.kernels import sampling as kernel

    monkeypatch.setattr(kernel, "block_and_warps", lambda vocab: (min(triton.next_power_of_2(vocab), 32), 4))
    logits = torch.randn(3, 161) * scale
    logits[1, 60:120] = float("-inf")
    k = keys(3, seed=11, step=4)
    for params in (dict(), dict(top_k=1), dict(top_k=7, top_p=0.8), dict(top_p=0.95, min_p=0.001)):
        kernel_out, reference = both_paths(monkeypatch, device, logits, k, **params)
        assert_same(kernel_out, reference)


def test_greedy_takes_the_first_of_tied_maxima(monkeypatch, device):
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0], [5.0, -1.0, 5.0, 2.0, 0.0], [1.0, 2.0, 3.0, 4.0, 9.0]])
    kernel, reference = both_paths(monkeypatch, device, logits, keys(3), top_k=1)
    assert_same(kernel, reference)
    assert kernel[0].tolist() == [1, 0, 4]
    torch.testing.assert_close(kernel[2], -torch.tensor([3.0, 2.0, 1.0]).log(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("min_p,top_k,top_p", [(0.3, 0, 1.0), (0.05, 0, 0.8), (0.15, 3, 1.0)])
def test_min_p_kept_set_matches_a_float64_brute_force(monkeypatch, device, min_p, top_k, top_p):
    """The kernel's truncated log-prob is the float64 renormalised log-prob over the brute-force
    kept set (min-p, top-k, top-p in vLLM's order), and its tokens lie in that set."""
    logits = torch.randn(7, 41) * 2
    kernel, reference = both_paths(monkeypatch, device, logits, keys(7, seed=5), top_k=top_k, top_p=top_p,
                                   min_p=min_p)
    assert_same(kernel, reference)
    tokens, _, truncated = kernel
    for r in range(7):
        row = logits[r].double()
        kept = sorted(kept_set_reference(row.tolist(), top_k, top_p, min_p))
        assert tokens[r].item() in kept
        expected = row[tokens[r]] - torch.logsumexp(row[kept], 0)
        assert truncated[r].item() == pytest.approx(expected.item(), abs=1e-5)


def test_kernel_samples_the_truncated_distribution(monkeypatch, device):
    """Draws with different keys on a 5-token vocabulary where min-p keeps 3 tokens: never a
    dropped token, counts matching the renormalised distribution (chi-square, 2 degrees of
    freedom), the same tokens as the reference. Few draws (the interpreter runs a row in tens
    of ms), so the bound is the 1e-4 tail (18.5): uniform draws over the kept tokens score 25."""
    logits = torch.tensor([1.0, 0.3, -0.2, -3.0, -4.0])
    n, min_p = 96, 0.3
    kernel, reference = both_paths(monkeypatch, device, logits.repeat(n, 1), keys(n, seed=2024, step=1), min_p=min_p)
    assert torch.equal(kernel[0], reference[0])
    tokens = kernel[0]
    p = torch.softmax(logits.double(), -1)
    kept = p >= min_p * p.max()
    assert kept.tolist() == [True, True, True, False, False]
    counts = torch.bincount(tokens, minlength=5)
    assert counts[~kept].sum() == 0
    assert chi_square(counts[kept], n * p[kept] / p[kept].sum()) < CHI2_2DF_1E4


def test_chi_square_bound():
    assert math.exp(-CHI2_2DF_1E4 / 2) < 1e-4  # the chi-square tail with 2 degrees of freedom
    logits = torch.tensor([1.0, 0.3, -0.2])
    p = torch.softmax(logits.double(), -1)
    assert chi_square(torch.full((3,), 32), 96 * p) > CHI2_2DF_1E4  # the test sees uniform draws


@pytest.mark.parametrize(
    "kwargs,field",
    [({"min_p": -0.1}, "min_p"), ({"min_p": 1.01}, "min_p"), ({"min_p": float("inf")}, "min_p"),
     ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"), ({"temperature": 0.0}, "temperature")],
)
def test_bad_sampling_arguments_are_rejected(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sample_tokens(torch.zeros(2, 5), keys(2), **kwargs)


def test_bad_tensors_are_rejected():
    with pytest.raises(ValueError, match="keys"):
        sample_tokens(torch.zeros(2, 5), keys(3))
    with pytest.raises(ValueError, match="keys"):
        sample_tokens(torch.zeros(2, 5), keys(2).int())
    with pytest.raises(ValueError, match="logits"):
        sample_tokens(torch.zeros(2, 3, 5), keys(2))
