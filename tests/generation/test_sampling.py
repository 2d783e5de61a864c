"""Sampling: truncation sets, the exponential race's distribution, scores of the drawn tokens."""

import math

import pytest
import torch

from rftengine.generation.sampling import SamplerSettings, noise_keys, sample
from rftengine.ops.sampling import exponential_race, log_uniform_noise, truncate_logits

# Tiny models and tensors: intra-op threads only add contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


def kept_set_reference(row: list[float], top_k: int, top_p: float, min_p: float = 0.0) -> set[int]:
    """Indices kept by min-p, top-k then top-p (vLLM's order), as a plain loop in float64."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if min_p > 0:
        # p_i >= min_p * max p, with p = softmax(row)
        weights = [math.exp(row[i] - row[order[0]]) for i in order]
        order = [i for i, w in zip(order, weights) if w >= min_p]
    if 0 < top_k < len(order):
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


@pytest.mark.parametrize(
    "top_k,top_p,min_p",
    [(0, 1.0, 0.0), (1, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.5, 0.0), (0, 0.93, 0.0), (7, 0.8, 0.0),
     (400, 0.3, 0.0), (0, 1.0, 0.05), (0, 1.0, 0.3), (0, 0.6, 0.1), (4, 0.9, 0.2), (0, 1.0, 1.0)],
)
def test_truncation_keeps_the_reference_set(top_k, top_p, min_p):
    z = torch.randn(6, 37) * 2
    out = truncate_logits(z, top_k, top_p, min_p)
    for r in range(z.shape[0]):
        expected = kept_set_reference(z[r].double().tolist(), top_k, top_p, min_p)
        kept = set(torch.nonzero(out[r] > float("-inf")).flatten().tolist())
        assert kept == expected
        assert torch.equal(out[r][list(kept)], z[r][list(kept)])


def keys(n: int, seed: int = 0, step: int = 0, offset: int = 0) -> torch.Tensor:
    return noise_keys(torch.tensor([seed]), torch.arange(offset, offset + n), torch.tensor([step]))


def chi2_sf_even(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-square with an even number of degrees of freedom (closed form)."""
    half = x / 2
    return math.exp(-half) * sum(half**j / math.factorial(j) for j in range(df // 2))


# The sampler is deterministic (fixed seeds), so these tests pass or fail for good; the bound is
# the chi-square quantile whose tail is 1e-9: a correct sampler fails it for fewer than one seed
# in 10^9. chi2_sf_even(50.0, 4) = 3.6e-10, chi2_sf_even(54.0, 6) = 7.4e-10 and chi2_sf_even(63.0, 8) = 6.0e-10.
CHI2_BOUND = {4: 50.0, 6: 54.0, 8: 63.0}


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts.double() - expected) ** 2 / expected).sum())


def test_chi2_bounds_have_a_tiny_false_failure_probability():
    for df, bound in CHI2_BOUND.items():
        assert chi2_sf_even(bound, df) < 1e-9
    assert chi2_sf_even(0.0, 6) == 1.0 and chi2_sf_even(5.348, 6) == pytest.approx(0.5, abs=1e-3)  # the median


@pytest.mark.parametrize("over", ["sequences", "steps"])
def test_draws_follow_softmax_of_logits_over_temperature(over):
    """Many draws on a 7-token vocabulary: across sequences at one step, and across the steps of
    one sequence; the counts match softmax(logits / T) (chi-square, 6 degrees of freedom)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    params = SamplerSettings(temperature=0.7)
    n = 30000
    if over == "sequences":
        k = keys(n, seed=12345)
    else:
        k = torch.cat([keys(1, seed=12345, step=t, offset=7) for t in range(n)])
    tokens, _, _ = sample(logits.repeat(n, 1), params, k)
    p = torch.softmax(logits.double() / 0.7, -1)
    assert chi_square(torch.bincount(tokens, minlength=7), n * p) < CHI2_BOUND[6]


def test_consecutive_steps_and_sequences_are_independent():
    """Pairs of draws (step t, step t+1 of one sequence; sequences i, i+1 at one step) on a
    3-token vocabulary: the 9 joint counts match p x p (chi-square, 8 degrees of freedom)."""
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    n = 20000
    scores = p.log().float().repeat(n, 1)
    for first, second in [
        (keys(n, seed=3, step=5), keys(n, seed=3, step=6)),
        (keys(n, seed=3, step=5)[0::2], keys(n, seed=3, step=5)[1::2]),
    ]:
        a = exponential_race(scores[: len(first)], first)
        b = exponential_race(scores[: len(second)], second)
        joint = torch.bincount(a * 3 + b, minlength=9)
        assert chi_square(joint, len(a) * torch.outer(p, p).flatten()) < CHI2_BOUND[8]


def test_zero_probability_tokens_are_never_drawn():
    p = torch.tensor([0.0, 0.7, 0.0, 0.3, 0.0])
    draws = exponential_race(p.log().repeat(20000, 1), keys(20000, seed=9))
    assert set(draws.tolist()) == {1, 3}


def test_noise_is_a_pure_function_of_seed_sequence_step_and_column():
    """Row n's uniforms depend on its own key only (not on the batch around it); a different
    seed, sequence or step gives other uniforms, and the uniforms are spread over (0, 1)."""
    batch = log_uniform_noise(keys(64, seed=1, step=3), 1000)
    for i in (0, 17, 63):
        assert torch.equal(log_uniform_noise(keys(1, seed=1, step=3, offset=i), 1000)[0], batch[i])
    assert torch.equal(log_uniform_noise(keys(64, seed=1, step=3), 10), batch[:, :10])  # V-independent too
    for other in (keys(64, seed=2, step=3), keys(64, seed=1, step=4), keys(64, seed=1, step=3, offset=1)):
        differ = log_uniform_noise(other, 1000) != batch
        assert differ.float().mean() > 0.99
    u = batch.exp()
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - (1 / 12) ** 0.5) < 0.01
    assert torch.isfinite(batch).all() and (batch < 0).all()


def test_sampled_row_does_not_depend_on_its_batch_company():
    logits = torch.randn(37, 257) * 2
    params = SamplerSettings(0.9, 50, 0.95)
    k = keys(37, seed=4, step=2, offset=100)
    together = sample(logits, params, k)[0]
    alone = torch.cat([sample(logits[i:i + 1], params, k[i:i + 1])[0] for i in range(37)])
    assert torch.equal(together, alone)
    shuffled = torch.randperm(37)
    assert torch.equal(sample(logits[shuffled], params, k[shuffled])[0], together[shuffled])


def test_greedy_draws_no_noise(monkeypatch):
    import rftengine.ops.sampling as sampling

    def no_noise(*args, **kwargs):
        raise AssertionError("greedy decoding drew noise")

    monkeypatch.setattr(sampling, "log_uniform_noise", no_noise)
    logits = torch.randn(16, 101)
    tokens, _, truncated = sample(logits, SamplerSettings(0.5, 1, 1.0), keys(16), with_truncated=True)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.all(truncated == 0)  # the argmax is the whole kept set


def test_sample_scores_drawn_tokens_in_float64():
    logits = (torch.randn(9, 53) * 3).to(torch.bfloat16)
    params = SamplerSettings(0.7, 10, 0.9)
    tokens, logp, truncated = sample(logits, params, keys(9), with_truncated=True)
    z = logits.double() / 0.7
    full = torch.log_softmax(z, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logp.double(), full, rtol=0, atol=1e-5)
    kept = truncate_logits(z, 10, 0.9)
    assert torch.all(kept.gather(-1, tokens[:, None]) > float("-inf"))
    trunc = torch.log_softmax(kept, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(truncated.double(), trunc, rtol=0, atol=1e-5)
    assert torch.all(truncated >= logp)  # renormalising over fewer tokens raises every kept prob


def test_top_k_one_is_argmax_and_keys_reproduce():
    logits = torch.randn(16, 101)
    tokens, _, _ = sample(logits, SamplerSettings(1.0, 1, 1.0), keys(16, seed=5))
    assert torch.equal(tokens, logits.argmax(-1))
    a = sample(logits, SamplerSettings(), keys(16, seed=11))[0]
    b = sample(logits, SamplerSettings(), keys(16, seed=11))[0]
    c = sample(logits, SamplerSettings(), keys(16, seed=12))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.cuda
def test_noise_is_the_same_on_cuda():
    """The CUDA-graph decode step calls the same torch ops on the device: the same bits."""
    cpu = log_uniform_noise(keys(33, seed=2**62 + 5, step=77, offset=2**40), 50257)
    k = noise_keys(torch.tensor([2**62 + 5], device="cuda"), torch.arange(2**40, 2**40 + 33, device="cuda"),
                   torch.tensor([77], device="cuda"))
    assert torch.equal(log_uniform_noise(k, 50257).cpu(), cpu)


@pytest.mark.parametrize(
    "kwargs,field",
    [({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"), ({"top_k": -1}, "top_k"),
     ({"top_k": 2.5}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
     ({"min_p": -0.1}, "min_p"), ({"min_p": 1.5}, "min_p"), ({"min_p": float("nan")}, "min_p"),
     ({"min_p": "0.1"}, "min_p"), ({"min_p": True}, "min_p")],
)
def test_sampling_params_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplerSettings(**kwargs).validate()


def test_sampling_params_with_min_p_validate_and_hash():
    params = SamplerSettings(0.8, 0, 0.9, 0.05).validate()
    assert params.min_p == 0.05 and params.truncates
    assert SamplerSettings(min_p=0).validate() == SamplerSettings() and not SamplerSettings().truncates
    assert len({params, SamplerSettings(0.8, 0, 0.9, 0.05), SamplerSettings(0.8, 0, 0.9)}) == 2


def test_min_p_draws_follow_the_min_p_distribution():
    """min-p keeps p >= min_p * max p; the draws follow the renormalised kept distribution."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.4, -1.0, -4.0])
    n, min_p = 30000, 0.08
    tokens, _, truncated = sample(logits.repeat(n, 1), SamplerSettings(min_p=min_p), keys(n, seed=77), True)
    p = torch.softmax(logits.double(), -1)
    kept = p >= min_p * p.max()
    assert kept.tolist() == [True, True, True, True, True, False, False]
    expected = torch.where(kept, p, 0) / p[kept].sum()
    counts = torch.bincount(tokens, minlength=7)
    assert counts[~kept].sum() == 0
    assert chi_square(counts[kept], n * expected[kept]) < CHI2_BOUND[4]
    torch.testing.assert_close(truncated.double(), expected.log()[tokens], rtol=0, atol=1e-5)
