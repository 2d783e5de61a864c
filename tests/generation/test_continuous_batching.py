"""Continuous batching: finished rows leave the step, queued sequences fill the freed rows, any
number of sequences per call, per-prompt max_new_tokens, the stop hook and the memory budget."""

import warnings

import pytest
import torch

from rftengine.generation import EagerFallbackWarning, Generator
from rftengine.generation.kv_cache import StaticKVCache
from tests.generation.test_generator import (
    common_prefix_until_near_tie, gpt2, hf_greedy, llama, mistral, qwen2, trainer_logprobs,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# 9 prompts of 1 to 11 tokens with long-tailed max_new_tokens: most end early, a few run long.
PROMPTS = [list(range(3 + p, 3 + p + n)) for p, n in enumerate([4, 11, 1, 6, 3, 9, 2, 5, 7])]
LIMITS = [2, 3, 17, 1, 4, 2, 12, 3, 1]


def per_prompt_reference(model, out, limits, copies=1) -> None:
    """Greedy HF generate to the longest limit, each row cut at its own: what ``out`` must hold."""
    reference = hf_greedy(model, out, max(limits))[:, out.prompt_length:]
    for row, limit in enumerate(limit for limit in limits for _ in range(copies)):
        assert out.response_mask[row].tolist() == [True] * limit + [False] * (out.responses.shape[1] - limit)
        assert out.responses[row, :limit].tolist() == reference[row, :limit].tolist(), row
        assert torch.all(out.responses[row, limit:] == 0) and torch.all(out.logprobs[row, limit:] == 0)


def spy_steps(monkeypatch, gen: Generator) -> list[int]:
    """Rows of every decode step ``gen`` runs."""
    rows = []
    step = gen._decode_step

    def counting(n, live, params):
        rows.append(n)
        return step(n, live, params)

    monkeypatch.setattr(gen, "_decode_step", counting)
    return rows


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_compaction_and_refill_equal_the_eager_model(family, monkeypatch):
    model = {"llama": llama, "mistral": mistral}[family]()
    gen = Generator(model, max_batch_size=4, max_seq_len=32, done_check_interval=2)
    gathers = []
    original = StaticKVCache.move_rows
    monkeypatch.setattr(StaticKVCache, "move_rows", lambda self, *a: gathers.append(a) or original(self, *a))
    rows = spy_steps(monkeypatch, gen)
    out = gen.generate(PROMPTS, num_samples=2, max_new_tokens=LIMITS, top_k=1, eos_token_ids=None)
    assert out.sequences.shape == (18, 11 + 17)  # 18 sequences on 4 rows
    per_prompt_reference(model, out, LIMITS, copies=2)
    assert out.finish_reasons == ("length",) * 18
    torch.testing.assert_close(out.logprobs, trainer_logprobs(model, out, 1.0), rtol=0, atol=1e-5)
    assert gathers and set(rows) == {4}  # compacted and refilled: the step stays full

    # without continuous batching: batches of 4 waiting for their longest, the same tokens
    fixed = Generator(model, max_batch_size=4, max_seq_len=32, done_check_interval=2, continuous=False)
    fixed_rows = spy_steps(monkeypatch, fixed)
    slow = fixed.generate(PROMPTS, num_samples=2, max_new_tokens=LIMITS, top_k=1, eos_token_ids=None)
    assert torch.equal(slow.sequences, out.sequences) and torch.equal(slow.response_mask, out.response_mask)
    # 18 = 4 x 4 + 2 (the last 2 are done at their first token), each batch waits for its longest
    assert set(fixed_rows) == {4} and len(fixed_rows) > 1.5 * len(rows), (len(fixed_rows), len(rows))


@pytest.mark.parametrize("buckets", [False, True])
def test_finished_rows_leave_the_step(buckets, monkeypatch):
    model = qwen2()
    gen = Generator(model, max_batch_size=8, max_seq_len=32, done_check_interval=2)
    gen._bucket_rows = buckets
    rows = spy_steps(monkeypatch, gen)
    out = gen.generate(PROMPTS[:3], num_samples=2, max_new_tokens=[3, 10, 2], top_k=1, eos_token_ids=None)
    per_prompt_reference(model, out, [3, 10, 2], copies=2)
    # 6 rows (the 8-row bucket) for 2 steps, then prompt 1's 2 rows alone
    assert rows == [8 if buckets else 6] * 2 + [2] * 7


def test_eos_and_limits_finish_rows_with_their_reason():
    model = qwen2()
    gen = Generator(model, max_batch_size=3, max_seq_len=32, done_check_interval=3)
    free = gen.generate(PROMPTS, max_new_tokens=LIMITS, top_k=1, eos_token_ids=None)
    eos = int(free.responses[2, 3])  # prompt 2's 4th greedy token ends responses
    out = gen.generate(PROMPTS, max_new_tokens=LIMITS, top_k=1, eos_token_ids=eos)
    for row, limit in enumerate(LIMITS):
        resp = free.responses[row, :limit].tolist()
        end = resp.index(eos) + 1 if eos in resp else limit
        assert out.response_lengths[row] == end and out.responses[row, :end].tolist() == resp[:end]
        assert out.finish_reasons[row] == ("eos" if eos in resp else "length")
    assert out.finish_reasons[2] == "eos" and out.response_lengths[2] == 4
    assert out.responses.shape[1] == int(out.response_lengths.max())  # as wide as the longest


# 7 prompts x 3 samples = 21 sequences
COMPANY_PROMPTS = [list(range(5 + p, 5 + p + n)) for p, n in enumerate([3, 12, 1, 7, 5, 9, 2])]
COMPANY_LIMITS = [4, 14, 2, 9, 1, 6, 11]


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05)])
def test_samples_do_not_depend_on_batch_size_compaction_or_refill(params):
    """The same 21 sequences with max_batch_size 4, 16 and 64, continuous batching on and off,
    rows in CUDA-graph-style buckets: the same tokens, the same log-probs to fp32 rounding."""
    model = qwen2()
    kwargs = dict(num_samples=3, max_new_tokens=COMPANY_LIMITS, eos_token_ids=[3], seed=99, **params)

    def rollout(max_batch_size, continuous):
        gen = Generator(model, max_batch_size=max_batch_size, max_seq_len=32, continuous=continuous,
                        done_check_interval=2)
        gen._bucket_rows = True  # as under CUDA graphs: 3 live rows run as 4, 13 as 16 ...
        return gen.generate(COMPANY_PROMPTS, **kwargs)

    reference = rollout(64, False)
    tokens = [r[m].tolist() for r, m in zip(reference.responses, reference.response_mask)]
    assert len({tuple(t) for t in tokens}) > 15  # really sampled
    assert len({len(t) for t in tokens}) > 5  # and long-tailed
    for max_batch_size in (4, 16, 64):
        for continuous in (True, False):
            out = rollout(max_batch_size, continuous)
            assert torch.equal(out.sequences, reference.sequences), (max_batch_size, continuous)
            assert torch.equal(out.response_mask, reference.response_mask)
            assert out.finish_reasons == reference.finish_reasons
            torch.testing.assert_close(out.logprobs, reference.logprobs, rtol=0, atol=1e-5)


def test_more_sequences_than_rows_and_offsets_over_calls():
    """A call of 21 sequences on 4 rows samples what calls of one prompt each do."""
    model = llama()
    gen = Generator(model, max_batch_size=4, max_seq_len=32)
    kwargs = dict(eos_token_ids=None, seed=5, temperature=1.2)
    whole = gen.generate(COMPANY_PROMPTS, num_samples=3, max_new_tokens=COMPANY_LIMITS, **kwargs)
    for p in (1, 4, 6):
        alone = gen.generate([COMPANY_PROMPTS[p]], num_samples=3, max_new_tokens=COMPANY_LIMITS[p],
                             sequence_offset=3 * p, **kwargs)
        width = alone.responses.shape[1]
        assert torch.equal(alone.responses, whole.responses[3 * p:3 * p + 3, :width])
        torch.testing.assert_close(alone.logprobs, whole.logprobs[3 * p:3 * p + 3, :width], rtol=0, atol=1e-5)


def test_stop_checker_cuts_with_reason_stop():
    model = qwen2()
    calls = []

    def stop_after_three_on_odd(ids, responses):
        calls.append(list(ids))
        return [3 if i % 2 and len(r) >= 3 else None for i, r in zip(ids, responses)]

    kwargs = dict(num_samples=2, max_new_tokens=COMPANY_LIMITS, eos_token_ids=None, seed=1)
    for continuous in (True, False):
        calls.clear()
        gen = Generator(model, max_batch_size=5, max_seq_len=32, continuous=continuous, done_check_interval=2)
        free = gen.generate(COMPANY_PROMPTS, sequence_offset=10, **kwargs)
        out = gen.generate(COMPANY_PROMPTS, stop_checker=stop_after_three_on_odd, sequence_offset=10, **kwargs)
        for row in range(14):
            limit = COMPANY_LIMITS[row // 2]
            cut = 3 if row % 2 and limit > 3 else limit  # sequence 10 + row: odd rows are cut
            assert out.response_lengths[row] == cut, (continuous, row)
            assert out.responses[row, :cut].tolist() == free.responses[row, :cut].tolist()
            assert torch.all(out.responses[row, cut:] == 0) and torch.all(out.logprobs[row, cut:] == 0)
            assert out.finish_reasons[row] == ("stop" if row % 2 and limit >= 3 else "length"), (continuous, row)
        # called with global ids of live sequences only: a finished one is never asked again
        assert all(10 <= i < 24 for ids in calls for i in ids)
        assert all(len(set(ids)) == len(ids) for ids in calls)

    gen = Generator(model, max_batch_size=5, max_seq_len=32)
    with pytest.raises(ValueError, match=r"stop_checker must return one entry per sequence \(5\), got 0"):
        gen.generate(COMPANY_PROMPTS, stop_checker=lambda ids, r: [], **kwargs)
    with pytest.raises(ValueError, match=r"stop_checker must return None or a response length in \[0, \d+\] "
                                         r"for sequence 0, got -1"):
        gen.generate(COMPANY_PROMPTS, stop_checker=lambda ids, r: [-1] * len(ids), **kwargs)


def test_eager_fallback_takes_any_number_of_sequences():
    model = gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerFallbackWarning)
        gen = Generator(model, max_batch_size=3, max_seq_len=40, done_check_interval=2)
    assert not gen.continuous
    # batches of 3 rows split prompts' samples: prompt 1's first sample beside prompt 0's two
    out = gen.generate(PROMPTS, num_samples=2, max_new_tokens=LIMITS, top_k=1, eos_token_ids=None)
    per_prompt_reference(model, out, LIMITS, copies=2)
    calls = []
    cut = gen.generate(PROMPTS, max_new_tokens=LIMITS, top_k=1, eos_token_ids=None,
                       stop_checker=lambda ids, r: calls.append(ids) or [1 if len(x) > 1 else None for x in r])
    assert cut.response_lengths.tolist() == [1] * 9 and calls
    assert [reason for reason, limit in zip(cut.finish_reasons, LIMITS) if limit > 1] == ["stop"] * 7


def test_memory_budget_sizes_the_rows():
    model = qwen2()
    per_row = Generator(model, max_batch_size=8, max_seq_len=32).bytes_per_row
    # 2 layers x (keys + values) x 128 columns x 2 kv heads x 12 dims x 4 bytes + valid + outputs
    assert per_row == 2 * 2 * 128 * 2 * 12 * 4 + 128 + 33 * 17
    gen = Generator(model, max_batch_size=8, max_seq_len=32, kv_cache_memory=3 * per_row + per_row // 2)
    assert gen.max_rows == gen.capacity == 3
    assert Generator(model, max_batch_size=8, max_seq_len=32, kv_cache_memory=10**9).capacity == 8
    out = gen.generate(PROMPTS, max_new_tokens=LIMITS, top_k=1, eos_token_ids=None)
    per_prompt_reference(model, out, LIMITS)
    assert gen._cache.rows == 3 and gen._state.rows == 3
    with pytest.raises(ValueError, match=rf"kv_cache_memory \(1000 bytes\) .* needs {per_row} bytes"):
        Generator(model, max_batch_size=8, max_seq_len=32, kv_cache_memory=1000)
    with pytest.raises(ValueError, match="kv_cache_memory as a fraction needs a CUDA device"):
        Generator(model, max_batch_size=8, max_seq_len=32, kv_cache_memory=0.5)
    for bad in (1.5, 0.0, "1GB", True):
        with pytest.raises(ValueError, match="kv_cache_memory"):
            Generator(model, max_batch_size=8, max_seq_len=32, kv_cache_memory=bad)


def test_rows_filled_mid_rollout_keep_their_own_columns():
    """A short prompt admitted beside long ones, into a row whose previous sequence was longer:
    the new row attends to its own keys only (stale valid columns would change its tokens)."""
    model = mistral()  # sliding window 6: the window mask uses each row's own column
    prompts = [list(range(10, 30)), [7], list(range(40, 52)), [8, 9]]
    gen = Generator(model, max_batch_size=2, max_seq_len=48, done_check_interval=1)
    out = gen.generate(prompts, max_new_tokens=[3, 20, 2, 9], top_k=1, eos_token_ids=None)
    per_prompt_reference(model, out, [3, 20, 2, 9])


class WarmupGraphs:
    """DecodeGraphs on CPU: capture runs the step once (the warm-up, with its side effects) and
    keeps it; replay runs it again, as a captured graph would."""

    def __init__(self):
        self.graphs = {}

    def __contains__(self, key):
        return key in self.graphs

    def __len__(self):
        return len(self.graphs)

    def capture(self, key, step):
        step()
        self.graphs[key] = step

    def replay(self, key):
        self.graphs[key]()

    def clear(self):
        self.graphs.clear()


def test_graphs_captured_mid_rollout_change_nothing(monkeypatch):
    """The CUDA path on CPU: a graph per (bucket, live length) captured when first needed, in the
    middle of a rollout; its warm-up step must leave the rows as they were."""
    import rftengine.generation.generator as generator_module

    monkeypatch.setattr(generator_module, "DecodeGraphs", WarmupGraphs)
    model = qwen2()
    kwargs = dict(num_samples=3, max_new_tokens=COMPANY_LIMITS, eos_token_ids=[3], seed=7, temperature=0.9)
    graphs = Generator(model, max_batch_size=16, max_seq_len=32, done_check_interval=2)
    graphs.uses_cuda_graphs = graphs._bucket_rows = True
    out = graphs.generate(COMPANY_PROMPTS, **kwargs)
    assert graphs.num_graphs >= 3  # the bucket shrinks as rows leave
    eager = Generator(model, max_batch_size=5, max_seq_len=32).generate(COMPANY_PROMPTS, **kwargs)
    assert torch.equal(out.sequences, eager.sequences) and out.finish_reasons == eager.finish_reasons
    torch.testing.assert_close(out.logprobs, eager.logprobs, rtol=0, atol=1e-5)


# -- CUDA: graphs with compaction and refill ---------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("attention", ["sdpa", "auto"])
def test_cuda_graphs_with_compaction_equal_eager(attention):
    torch.manual_seed(0)
    model = qwen2().to("cuda")
    kwargs = dict(num_samples=3, max_new_tokens=[40, 3, 150, 7, 1, 20, 90, 2, 5], top_k=1, eos_token_ids=None)
    graphs = Generator(model, max_batch_size=8, max_seq_len=170, attention=attention, done_check_interval=4)
    eager = Generator(model, max_batch_size=8, max_seq_len=170, cuda_graphs=False, attention="sdpa",
                      continuous=False)
    a, b = graphs.generate(PROMPTS, **kwargs), eager.generate(PROMPTS, **kwargs)
    assert graphs.num_graphs >= 3  # buckets shrink as rows leave; live lengths 128 and 256
    assert torch.equal(a.response_mask, b.response_mask)
    same = common_prefix_until_near_tie(model, b, a.responses)
    torch.testing.assert_close(a.logprobs[same], b.logprobs[same], rtol=0, atol=1e-4)
    sampled = dict(kwargs, top_k=0, temperature=0.9, seed=3, eos_token_ids=[5])
    c, d = graphs.generate(PROMPTS, **sampled), graphs.generate(PROMPTS, **sampled)
    assert torch.equal(c.sequences, d.sequences)  # graphs captured mid-rollout replay the same
    torch.testing.assert_close(c.logprobs, trainer_logprobs(model, c, 0.9), rtol=0, atol=1e-4)
