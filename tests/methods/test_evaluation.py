"""Evaluation during training (rftengine.methods.evaluation): which steps evaluate, the values
against the loss code run by hand, training unchanged by evaluating, console lines without bars."""

import random

import numpy as np
import pytest
import torch

from rftengine.methods.loop import metrics_line, train_loop
from rftengine.methods.train_state import TrainState
from rftengine.methods.config_base import LoopFields
from rftengine.methods.data import collate_preferences, encode_preferences
from rftengine.methods.dpo import DPOConfig, dpo_batch_loss, train_dpo
from rftengine.methods.evaluation import eval_chunks, run_evaluation, should_evaluate
from rftengine.methods.reward import RewardConfig, pairwise_accuracy, train_reward_model
from rftengine.methods.sft import SFTConfig, sft_loss, train_sft
from tests.methods.test_dpo import vowel_pairs


def _training_only(history):
    return [{k: v for k, v in row.items() if not k.startswith("eval/")} for row in history]


@pytest.mark.parametrize("every, last, expected", [(0, 5, [5]), (2, 5, [2, 4, 5]), (3, 6, [3, 6]), (1, 2, [1, 2])])
def test_should_evaluate_at_multiples_and_after_the_last_step(every, last, expected):
    config = LoopFields(eval_every=every)
    assert [s for s in range(1, last + 1) if should_evaluate(config, s, last)] == expected


def test_eval_chunks_cover_every_item_once_in_one_process():
    assert eval_chunks(5, 2) == [([0, 1], True), ([2, 3], True), ([4], True)]
    assert eval_chunks(1, 8) == [([0], True)]
    with pytest.raises(ValueError, match="at least one example"):
        eval_chunks(0, 2)


def test_run_evaluation_restores_every_rng_and_prefixes_names():
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)

    def evaluate():
        assert not torch.is_grad_enabled()
        return {"loss": torch.rand(()).item() + random.random() + np.random.rand(), "n": 2}

    out = run_evaluation(evaluate)
    assert set(out) == {"eval/loss", "eval/n"} and out["eval/n"] == 2.0
    got = (torch.rand(2), random.random(), np.random.rand())
    torch.testing.assert_close(got[0], expected[0])
    assert got[1:] == expected[1:]


def test_train_loop_merges_eval_metrics_into_the_step_row():
    config = LoopFields(batch_size=2, eval_every=2, max_steps=3)
    state = TrainState("toy")
    calls = []
    history = train_loop(state, config, 3, 6, lambda idx: {"loss": 1.0}, evaluate=lambda: {"x": len(calls) + 1.0},
                         callback=lambda s, m: calls.append((s, dict(m))))
    assert [sorted(m) for _, m in calls] == [["loss"], ["eval/x", "loss"], ["eval/x", "loss"]]
    assert calls[1][1]["eval/x"] == 2.0 and history == [m for _, m in calls]


def test_logging_lines_when_no_bar_is_drawn(capsys):
    config = LoopFields(batch_size=2, logging_steps=2, max_steps=5)
    metrics = {"loss": 0.5, "rewards/accuracies": 0.75, "learning_rate": 1e-6, "grad_norm": 3.0}
    train_loop(TrainState("toy"), config, 5, 6, lambda idx: dict(metrics), desc="dpo",
               postfix={"loss": "loss", "acc": "rewards/accuracies"}, progress=True)   # output captured: no bar
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines == [f"dpo step {s}/5: loss 0.5, acc 0.75, lr 1e-06" for s in (2, 4, 5)], lines
    assert "\x1b" not in captured.err + captured.out and "\r" not in captured.err
    assert metrics_line("grpo", 1, 2, {"eval/reward": 0.25, "reward": 1.0, "eval/reward_std": 0.5},
                        {"reward": "reward"}) == "grpo step 1/2: reward 1, eval/reward 0.25"
    assert metrics_line("dpo", 3, 3, {"loss": 0.5, "eval/loss": 0.25, "eval/rewards/accuracies": 1.0,
                                      "eval/logps/chosen": -3.0}, {"acc": "rewards/accuracies"}) == \
        "dpo step 3/3: loss 0.5, eval/loss 0.25, eval/rewards/accuracies 1"


@pytest.mark.parametrize("out_tty, err_tty", [(True, True), (True, False), (False, True)])
def test_bars_only_when_stdout_and_stderr_are_terminals(monkeypatch, out_tty, err_tty):
    from rftengine.methods import loop

    class Stream:
        def __init__(self, tty):
            self.isatty = lambda: tty

    monkeypatch.setattr("sys.stdout", Stream(out_tty))
    monkeypatch.setattr("sys.stderr", Stream(err_tty))
    assert loop.interactive_terminal() is (out_tty and err_tty)
    if not (out_tty and err_tty):
        items = [1, 2]
        assert loop.progress_bar(True, total=2, desc="x") is None and loop.track(items, True, desc="x") is items


def test_progress_bar_is_drawn_on_a_terminal(capsys, terminal):
    train_loop(TrainState("toy"), LoopFields(batch_size=2, max_steps=2), 2, 4, lambda idx: {"loss": 1.0},
               desc="toy bar", progress=True)
    captured = capsys.readouterr()
    assert "toy bar" in captured.err and captured.out == ""


def test_dpo_eval_matches_the_loss_on_held_out_pairs_and_leaves_training_unchanged(tokenizer, make_lm):
    pairs, held_out = vowel_pairs(12, seed=0), vowel_pairs(5, seed=1)
    base = make_lm(seed=1)
    config = DPOConfig(beta=0.5, learning_rate=2e-3, batch_size=4, max_steps=3, eval_every=2, eval_batch_size=2)
    plain = train_dpo(make_lm(seed=1), tokenizer, pairs, config, ref_model=base)
    result = train_dpo(make_lm(seed=1), tokenizer, pairs, config, ref_model=base, eval_data=held_out)
    assert _training_only(result.history) == plain.history      # bit for bit: eval changes no training state
    assert [("eval/loss" in row) for row in result.history] == [False, True, True]
    last = result.history[-1]
    for name in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/rewards/chosen"):
        assert name in last, name
    # The same loss code on all five held-out pairs at once, by hand: the chunks of 2 average to it.
    examples = encode_preferences(tokenizer, held_out, max_prompt_length=256, max_response_length=256)
    batch = collate_preferences(examples, tokenizer.pad_token_id)
    ref = result.state.extra["eval_ref_logps"]
    with torch.no_grad():
        _, stats = dpo_batch_loss(result.policy, batch, config, ref_logps=ref)
    for name in ("loss", "rewards/accuracies", "rewards/margins"):
        assert last[f"eval/{name}"] == pytest.approx(float(stats[name]), rel=1e-5, abs=1e-6), name
    assert result.policy.training is False


def test_dpo_eval_resumes_from_the_cached_reference_without_a_ref_model(tokenizer, make_lm):
    pairs, held_out = vowel_pairs(8, seed=0), vowel_pairs(3, seed=2)
    base = make_lm(seed=3)
    config = DPOConfig(learning_rate=2e-3, batch_size=4, max_steps=2, eval_every=1)
    full = train_dpo(make_lm(seed=3), tokenizer, pairs, config, ref_model=base, eval_data=held_out)
    policy = make_lm(seed=3)
    first = train_dpo(policy, tokenizer, pairs, DPOConfig(learning_rate=2e-3, batch_size=4, max_steps=1, eval_every=1),
                      ref_model=base, eval_data=held_out)
    rest = train_dpo(policy, tokenizer, pairs, config, eval_data=held_out, state=first.state.state_dict())
    assert rest.history[-1]["eval/loss"] == pytest.approx(full.history[-1]["eval/loss"], rel=1e-5)
    assert rest.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], rel=1e-5)


def test_reward_model_eval_accuracy_is_the_pair_accuracy(tokenizer, make_lm):
    pairs, held_out = vowel_pairs(12, seed=0), vowel_pairs(6, seed=4)
    config = RewardConfig(learning_rate=1e-3, batch_size=4, max_steps=2, eval_batch_size=4)
    result = train_reward_model(make_lm(seed=5), tokenizer, pairs, config, eval_data=held_out)
    last = result.history[-1]
    assert "eval/loss" in last and "eval/accuracy" not in result.history[0]      # eval_every 0: the last step only
    assert last["eval/accuracy"] == pytest.approx(pairwise_accuracy(result.model, tokenizer, held_out))
    assert result.accuracy == pytest.approx(last["eval/accuracy"])               # the final accuracy: eval_data


def test_sft_eval_loss_is_the_token_mean_nll(tokenizer, make_lm):
    from rftengine.methods.data import make_sequence_batch
    from rftengine.methods.sft import encode_sft_examples

    data = [{"prompt": "ab> ", "response": "banana"}, {"prompt": "xyz> ", "response": "kiwi"}]
    held_out = [{"prompt": "q> ", "response": "apple pie"}, {"prompt": "r> ", "response": "fig"},
                {"prompt": "s> ", "response": "melon"}]
    config = SFTConfig(learning_rate=1e-3, batch_size=2, max_steps=2, eval_every=1, eval_batch_size=2)
    result = train_sft(make_lm(seed=6), tokenizer, data, config, eval_data=held_out)
    examples = encode_sft_examples(tokenizer, held_out, max_prompt_length=256, max_response_length=256)
    batch = make_sequence_batch([e[0] for e in examples], [e[1] for e in examples], tokenizer.pad_token_id)
    with torch.no_grad():
        loss, _ = sft_loss(result.policy, batch)
    assert result.history[-1]["eval/loss"] == pytest.approx(float(loss), rel=1e-5)
    assert "eval/loss" in result.history[0]


def test_grpo_eval_scores_held_out_prompts_without_changing_training(tokenizer, make_lm):
    import dataclasses

    from rftengine.methods.evaluation import rollout_evaluator
    from rftengine.methods.ppo import score, train_ppo
    from rftengine.methods.ppo_config import PPOConfig
    from rftengine.toy import vowel_fraction_reward

    prompts, held_out = ["ab:", "cde:", "fg:", "hij:"], ["ka:", "lmn:", "op:"]
    config = PPOConfig(algorithm="grpo", batch_size=2, group_size=2, max_new_tokens=4, max_steps=2,
                       learning_rate=1e-3, eval_every=1, eval_batch_size=2)
    plain = train_ppo(make_lm(seed=7), tokenizer, prompts, config, reward_fn=vowel_fraction_reward)
    result = train_ppo(make_lm(seed=7), tokenizer, prompts, config, reward_fn=vowel_fraction_reward,
                       eval_data=held_out)
    assert _training_only(result.history) == plain.history
    last = result.history[-1]
    assert all("eval/reward" in row for row in result.history)
    assert 0.0 <= last["eval/reward"] <= 1.0 and last["eval/reward_std"] >= 0.0
    assert 1.0 <= last["eval/completions/mean_length"] <= 4.0
    # The same responses whatever the chunking: each keeps its sampling noise (seed, sequence index).
    ctx = result.context
    for size in (1, 3):
        chunked = dataclasses.replace(config, eval_batch_size=size)
        evaluate = rollout_evaluator(ctx.generator, tokenizer, held_out, chunked,
                                     lambda ro: score(ctx, ro, vowel_fraction_reward), num_samples=2)
        again = run_evaluation(evaluate)
        for name in ("eval/reward", "eval/reward_std", "eval/completions/mean_length"):
            assert again[name] == pytest.approx(last[name], abs=1e-6), (size, name)


@pytest.mark.parametrize("algorithm, judge_mode", [("dpo", "pointwise"), ("grpo", "pairwise")])
def test_rlaif_eval_judges_held_out_prompts_without_changing_training(make_lm, tokenizer, algorithm, judge_mode):
    from rftengine.methods.judge import Judge
    from rftengine.methods.rlaif import RLAIFConfig, train_rlaif

    judge = Judge(make_lm(seed=9), tokenizer, "rate {response} =", pairwise_template="1: {response_a} 2: {response_b} =",
                  choices=("1", "2"), batch_size=16)
    prompts, held_out = ["ab> ", "cd> ", "efg> ", "h> "], ["ijk> ", "lm> ", "n> "]
    config = RLAIFConfig(algorithm=algorithm, judge_mode=judge_mode, group_size=2, batch_size=2, max_steps=2,
                         max_new_tokens=4, eval_every=2)
    plain = train_rlaif(make_lm(seed=8), tokenizer, prompts, judge, config, ref_model=make_lm(seed=8))
    result = train_rlaif(make_lm(seed=8), tokenizer, prompts, judge, config, ref_model=make_lm(seed=8),
                         eval_data=held_out)
    assert _training_only(result.history) == plain.history
    assert "eval/reward" not in result.history[0]
    last = result.history[-1]
    low, high = (0.0, 1.0) if judge_mode == "pairwise" else (1.0, 5.0)       # the ratings are 1..5
    assert low <= last["eval/reward"] <= high and 1.0 <= last["eval/completions/mean_length"] <= 4.0
    if judge_mode == "pairwise":          # a group's pairwise strengths average to 1/2
        assert last["eval/reward"] == pytest.approx(0.5, abs=1e-5)
