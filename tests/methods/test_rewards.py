"""Reward functions as TRL calls them: the calling convention read from the signature, dataset
columns per sample, trainer_state, several weighted functions with None for "does not apply",
per-function metrics, and errors that name the function."""

import math

import pytest

from rftengine.methods.ppo import make_ppo_context, rollout, score, train_ppo
from rftengine.methods.ppo_config import PPOConfig
from rftengine.methods.rewards import (
    NamedReward,
    RewardFunctions,
    RewardState,
    call_reward_fn,
    uses_trl_convention,
)
from rftengine.toy import vowel_fraction_reward

GRPO = dict(algorithm="grpo", group_size=2, batch_size=2, max_new_tokens=3, max_steps=1, shuffle=False)


def test_trl_style_function_gets_completions_and_columns(tokenizer, make_lm):
    """The silent wrong result of issue #12: a TRL-style function got the prompts as
    `completions` and the data's extra columns were dropped."""
    data = [{"prompt": "a:", "answer": "x"}, {"prompt": "b:", "answer": "y"}]
    seen, states = {}, []

    def correct(completions, answer, **kwargs):
        if not seen:
            seen.update(completions=list(completions), answer=list(answer), kwargs=kwargs)
        states.append(kwargs["trainer_state"])
        return [float(a == "x") for a in answer]

    result = train_ppo(make_lm(), tokenizer, data, PPOConfig(**{**GRPO, "max_steps": 2}), reward_fn=correct)
    assert seen["answer"] == ["x", "x", "y", "y"]                    # each sample of a group
    assert seen["kwargs"]["prompts"] == ["a:", "a:", "b:", "b:"]
    assert all(c not in ("a:", "b:") for c in seen["completions"])  # the responses, not the prompts
    assert len(seen["kwargs"]["completion_ids"]) == 4
    assert [(s.global_step, s.max_steps, s.epoch) for s in states] == [(0, 2, 0.0), (1, 2, 1.0)]
    assert result.history[0]["rewards/correct/mean"] == pytest.approx(0.5)


def test_completion_ids_are_the_sampled_tokens(tokenizer, make_lm):
    ctx = make_ppo_context(make_lm(), tokenizer, PPOConfig(**GRPO))
    ro = rollout(ctx, ["ab:"])
    seen = {}

    def fn(prompts, completions, completion_ids, **kwargs):
        seen["ids"] = completion_ids
        return [0.0] * len(completions)

    score(ctx, ro, fn)
    mask = ro.batch.response_mask
    assert seen["ids"] == [ro.batch.response_ids[i][mask[i]].tolist() for i in range(2)]


def test_columns_need_one_value_per_prompt(tokenizer, make_lm):
    ctx = make_ppo_context(make_lm(), tokenizer, PPOConfig(**GRPO))
    with pytest.raises(ValueError, match=r"column 'answer' must have one entry per prompt \(1\), got 2"):
        rollout(ctx, ["ab:"], columns={"answer": ["x", "y"]})


def test_convention_from_the_signature():
    def positional(prompts, responses):
        return [0.0] * len(responses)

    def trl(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    def only_kwargs(**kwargs):
        return [0.0] * len(kwargs["completions"])

    assert not uses_trl_convention(positional) and not uses_trl_convention(lambda p, r, **kw: 0)
    def ids_only(completion_ids, **kwargs):
        return [0.0] * len(completion_ids)

    def legacy_with_ids(prompts, responses, completion_ids):
        return [0.0] * len(responses)

    assert uses_trl_convention(trl) and uses_trl_convention(only_kwargs) and uses_trl_convention(ids_only)
    assert not uses_trl_convention(legacy_with_ids)
    assert uses_trl_convention(NamedReward(trl, "named"))          # seen through the wrapper
    assert not uses_trl_convention(len)                             # no signature: positional


def test_chat_prompts_get_chat_completions():
    prompt = [{"role": "user", "content": "hi"}]
    seen = {}

    def fn(prompts, completions, **kwargs):
        seen["completions"] = completions
        return [1.0]

    call_reward_fn(fn, [prompt], ["hello"])
    assert seen["completions"] == [[{"role": "assistant", "content": "hello"}]]


def test_positional_form_keeps_working_with_columns():
    calls = []

    def legacy(prompts, responses, references):
        calls.append((prompts, responses, references))
        return [1.0, 2.0]

    out = call_reward_fn(legacy, ["p", "q"], ["r", "s"], columns={"reference": ["x", "y"], "id": [1, 2]})
    assert out.tolist() == [1.0, 2.0] and calls == [(["p", "q"], ["r", "s"], ["x", "y"])]


def test_trainer_state_only_when_asked():
    def strict(prompts, completions):
        return [0.0] * len(completions)

    def asks(completions, trainer_state):
        return [float(trainer_state.global_step)] * len(completions)

    state = RewardState(global_step=3, max_steps=10, epoch=0.5)
    assert call_reward_fn(strict, ["p"], ["r"], trainer_state=state).tolist() == [0.0]
    assert call_reward_fn(asks, ["p"], ["r"], trainer_state=state).tolist() == [3.0]
    with pytest.raises(Exception):
        state.global_step = 4          # read-only


def test_missing_column_is_named():
    def needs(completions, answer):
        return [0.0]

    with pytest.raises(ValueError, match=r"needs\b.*'answer'.*columns: id"):
        call_reward_fn(needs, ["p"], ["r"], columns={"id": [1]})


def test_weighted_sum_ignores_none():
    def first(completions, **kwargs):
        return [1.0, None, None]

    def second(completions, **kwargs):
        return [2.0, 4.0, None]

    rewards = RewardFunctions([first, second], weights=[1.0, 0.5])
    out = rewards(["p"] * 3, ["a", "b", "c"])
    # TRL semantics: the weighted sum over the functions that scored the sample (nansum), 0 when none did
    assert out.scores.tolist() == [2.0, 2.0, 0.0]
    stats = out.stats()
    assert stats["rewards/first/mean"] == pytest.approx(1.0) and stats["rewards/first/std"] == pytest.approx(0.0)
    assert stats["rewards/second/mean"] == pytest.approx(3.0) and stats["rewards/second/std"] == pytest.approx(1.0)
    assert rewards.names == ["first", "second"]


def test_no_score_at_all_gives_nan_metrics():
    out = RewardFunctions(lambda completions, **kw: [None, None])(["p", "p"], ["a", "b"])
    assert out.scores.tolist() == [0.0, 0.0]
    assert math.isnan(out.stats()["rewards/<lambda>/mean"])


def test_names_are_unique_and_weights_checked():
    def f(prompts, responses):
        return [0.0] * len(responses)

    assert RewardFunctions([f, f, NamedReward(f, "judge")]).names == ["f", "f_2", "judge"]
    with pytest.raises(ValueError, match=r"reward_weights must have one weight per reward function \(2\), got 1"):
        RewardFunctions([f, f], weights=[1.0])
    with pytest.raises(ValueError, match=r"reward_weights\[1\] must be a finite number, got 'x'"):
        RewardFunctions([f, f], weights=[1.0, "x"])
    with pytest.raises(ValueError, match="at least one reward function"):
        RewardFunctions([])


@pytest.mark.parametrize("returned, match", [
    ("text", r"reward function .*bad must return a tensor or a list of numbers.*got str"),
    ([1.0], r"reward function .*bad must return one score per response \(2\), got 1"),
    ([1.0, "x"], r"reward function .*bad must return .*holding str"),
    ([1.0, float("nan")], r"reward function .*bad returned NaN or inf .*return None"),
])
def test_bad_returns_are_named(returned, match):
    def bad(completions, **kwargs):
        return returned

    with pytest.raises(ValueError, match=match):
        call_reward_fn(bad, ["p", "q"], ["r", "s"])


def test_several_functions_with_weights_in_train_ppo(tokenizer, make_lm):
    data = [{"prompt": "a:", "answer": "x"}, {"prompt": "b:", "answer": "y"}]

    def exact(completions, answer, **kwargs):
        return [1.0 if a == "x" else None for a in answer]

    result = train_ppo(make_lm(), tokenizer, data, PPOConfig(**GRPO, reward_weights=[2.0, 1.0]),
                       reward_fn=[exact, vowel_fraction_reward])
    row = result.history[0]
    assert row["rewards/exact/mean"] == pytest.approx(1.0)
    assert "rewards/vowel_fraction_reward/std" in row
    assert row["reward"] == pytest.approx((2.0 * 2 + 4 * row["rewards/vowel_fraction_reward/mean"]) / 4, rel=1e-5)
    with pytest.raises(ValueError, match=r"reward_weights must have one weight per reward function \(2\), got 3"):
        train_ppo(make_lm(), tokenizer, data, PPOConfig(**GRPO, reward_weights=[1.0, 1.0, 1.0]),
                  reward_fn=[exact, vowel_fraction_reward])


def test_trl_metric_names(tokenizer, make_lm):
    config = PPOConfig(algorithm="grpo", group_size=2, batch_size=2, max_new_tokens=4, max_steps=1)
    result = train_ppo(make_lm(), tokenizer, ["ab:", "cd:"], config, reward_fn=vowel_fraction_reward)
    row = result.history[0]
    for name in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "completions/mean_length",
                 "completions/min_length", "completions/max_length", "completions/clipped_ratio",
                 "clip_ratio/region_mean", "rewards/vowel_fraction_reward/mean"):
        assert name in row, name
    for old in ("reward/mean", "reward/std", "response_length", "clipfrac", "eos_fraction"):
        assert old not in row, old
    assert row["completions/min_length"] <= row["completions/mean_length"] <= row["completions/max_length"] <= 4
    assert row["reward"] == pytest.approx(row["rewards/vowel_fraction_reward/mean"], rel=1e-6)


def test_prompt_rows_split_into_columns():
    from rftengine.methods.data import split_prompt_columns

    chat = [{"role": "user", "content": "hi"}]
    prompts, columns = split_prompt_columns([{"prompt": "a", "answer": 1, "note": None}, "b",
                                             {"prompt": chat, "answer": 2}])
    assert prompts == ["a", "b", chat]
    assert columns == {"answer": [1, None, 2]}            # a column None throughout is left out
