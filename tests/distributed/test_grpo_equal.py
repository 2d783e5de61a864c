"""GRPO under torchrun samples what one process samples: each rank keys its responses' noise by
their global sequence indices (`sample_rollout`'s default offset), so a 2-rank run equals a
1-rank run of the same global batch, rollouts included."""

import pytest
import torch

from rftengine import distributed
from rftengine.generation import Generator
from rftengine.methods.rollout import sample_rollout
from rftengine.metrics import read_metrics

from .test_torchrun_cli import STEPS, assert_same_run, model_dir, run_cli, train_args  # noqa: F401 (fixture)

PROMPTS = ["abc", "hello there", "x", "what is two plus two"]


@pytest.mark.parametrize("world", [2, 4])
def test_rank_share_samples_the_rows_of_one_process(monkeypatch, world):
    """Rank r of N, given its contiguous share of the prompts, samples exactly rows
    ``[r * share * G, (r + 1) * share * G)`` of the one-process rollout of all prompts."""
    from rftengine.toy import char_tokenizer, tiny_causal_lm

    tok = char_tokenizer()
    model = tiny_causal_lm(len(tok), seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
    gen = Generator(model, max_batch_size=8, max_seq_len=48)
    kwargs = dict(num_samples=2, max_new_tokens=8, max_prompt_length=24, temperature=1.0, seed=17)
    whole = sample_rollout(gen, tok, PROMPTS, **kwargs)
    assert len(set(whole.responses)) > 4  # really sampled
    share = len(PROMPTS) // world
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        part = sample_rollout(gen, tok, PROMPTS[r * share:(r + 1) * share], **kwargs)
        rows = slice(r * share * 2, (r + 1) * share * 2)
        assert part.responses == whole.responses[rows], r
        torch.testing.assert_close(part.logprobs, whole.logprobs[rows][:, :part.logprobs.shape[1]],
                                   rtol=0, atol=1e-5)
    # an explicit offset overrides the rank's: every rank sampling the same prompts agrees
    same = sample_rollout(gen, tok, PROMPTS, sequence_offset=0, **kwargs)
    assert same.responses == whole.responses


@pytest.mark.slow
def test_grpo_two_ranks_equal_one_process(tmp_path, model_dir):  # noqa: F811 (the imported fixture)
    """2 ranks x 1 prompt x 2 samples against 1 rank x 2 prompts x 2 samples: the same losses
    and rewards each step (1e-5 relative), each step logged once, the same final weights."""
    run_cli(1, train_args("grpo", model_dir, tmp_path / "one"))
    run_cli(2, train_args("grpo", model_dir, tmp_path / "two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", ("loss", "reward", "grad_norm"))
    rows = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(rows) == STEPS
