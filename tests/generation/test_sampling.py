"""Sampling: truncation sets, the exponential race's distribution, scores of the drawn tokens."""

import math

import pytest
import torch

from rftengine.generation.sampling import SamplingParams, exponential_race, sample, truncate_logits

# Tiny models and tensors: intra-op threads only add contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


def kept_set_reference(row: list[float], top_k: int, top_p: float) -> set[int]:
    """Indices kept by top-k then top-p, written as a plain loop in float64."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if 0 < top_k < len(row):
        cut = row[order[top_k - 1]]
        order = [i for i in order if row[i] >= cut]
    if top_p < 1:
        m = max(row[i] for i in order)
        weights = [math.exp(row[i] - m) for i in order]
        total = sum(weights)
        kept, mass = [], 0.0
        for i, w in zip(order, weights):
            if mass >= top_p:
                break
            kept.append(i)
            mass += w / total
        cut = min(row[i] for i in kept)
        order = [i for i in order if row[i] >= cut]
    return set(order)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (0, 0.93), (7, 0.8), (400, 0.3)])
def test_truncation_keeps_the_reference_set(top_k, top_p):
    z = torch.randn(6, 37) * 2
    out = truncate_logits(z, top_k, top_p)
    for r in range(z.shape[0]):
        expected = kept_set_reference(z[r].double().tolist(), top_k, top_p)
        kept = set(torch.nonzero(out[r] > float("-inf")).flatten().tolist())
        assert kept == expected
        assert torch.equal(out[r][list(kept)], z[r][list(kept)])


def test_exponential_race_follows_the_distribution():
    p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    n = 40000
    gen = torch.Generator().manual_seed(3)
    draws = exponential_race(p.repeat(n, 1), gen)
    freq = torch.bincount(draws, minlength=5).double() / n
    sigma = torch.sqrt(p.double() * (1 - p.double()) / n)
    assert freq[4] == 0  # a zero-probability token is never drawn
    assert torch.all((freq - p.double()).abs() <= 5 * sigma + 1e-12)


def test_sample_scores_drawn_tokens_in_float64():
    logits = (torch.randn(9, 53) * 3).to(torch.bfloat16)
    params = SamplingParams(0.7, 10, 0.9)
    tokens, logp, truncated = sample(logits, params, torch.Generator().manual_seed(0), with_truncated=True)
    z = logits.double() / 0.7
    full = torch.log_softmax(z, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logp.double(), full, rtol=0, atol=1e-5)
    kept = truncate_logits(z, 10, 0.9)
    assert torch.all(kept.gather(-1, tokens[:, None]) > float("-inf"))
    trunc = torch.log_softmax(kept, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(truncated.double(), trunc, rtol=0, atol=1e-5)
    assert torch.all(truncated >= logp)  # renormalising over fewer tokens raises every kept prob


def test_top_k_one_is_argmax_and_seed_reproduces():
    logits = torch.randn(16, 101)
    tokens, _, _ = sample(logits, SamplingParams(1.0, 1, 1.0), torch.Generator().manual_seed(5))
    assert torch.equal(tokens, logits.argmax(-1))
    a = sample(logits, SamplingParams(), torch.Generator().manual_seed(11))[0]
    b = sample(logits, SamplingParams(), torch.Generator().manual_seed(11))[0]
    c = sample(logits, SamplingParams(), torch.Generator().manual_seed(12))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs,field",
    [({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"), ({"top_k": -1}, "top_k"),
     ({"top_k": 2.5}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")],
)
def test_sampling_params_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs).validate()
