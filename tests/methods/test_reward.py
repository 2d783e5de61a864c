"""Reward-model training (Bradley-Terry), pairwise accuracy, the scorer as a reward_fn, resume."""

import copy
import random

import pytest
import torch

from rftengine.methods.data import collate_preferences, encode_preferences
from rftengine.methods.modeling import reward_model_from_causal_lm
from rftengine.methods.reward import (
    RewardConfig,
    RewardScorer,
    pairwise_accuracy,
    reward_loss,
    train_reward_model,
)


def vowel_pairs(n: int, seed: int):
    """Separable pairs: the chosen response is all vowels, the rejected one all consonants."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = []
    for _ in range(n):
        length = rng.randint(2, 6)
        pairs.append({
            "prompt": "".join(rng.choice(letters) for _ in range(rng.randint(1, 4))) + ":",
            "chosen": "".join(rng.choice("aeiou") for _ in range(length)),
            "rejected": "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(length)),
        })
    return pairs


@pytest.mark.parametrize("kind", ["value_head", "classification"])
def test_reward_model_learns_separable_pairs(tokenizer, make_lm, kind):
    train, held_out = vowel_pairs(48, seed=0), vowel_pairs(32, seed=1)
    rm = reward_model_from_causal_lm(make_lm(), kind)
    before = pairwise_accuracy(rm, tokenizer, held_out)
    seen = []
    config = RewardConfig(learning_rate=3e-3, batch_size=8, num_epochs=4, seed=0)
    result = train_reward_model(rm, tokenizer, train, config, eval_pairs=held_out,
                                callback=lambda step, m: seen.append(step))
    assert seen == list(range(1, 25)) and len(result.history) == 24
    assert {"loss", "accuracy", "rewards/chosen", "rewards/margins"} <= result.history[-1].keys()
    assert before < 0.75 and result.accuracy > 0.9, (before, result.accuracy)
    assert result.accuracy == pairwise_accuracy(result.model, tokenizer, held_out)
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < first

    scorer = RewardScorer(result.model, tokenizer)
    scores = scorer(["ab:", "ab:"], ["aeiou", "bcdfg"], references=None)
    assert scores.shape == (2,) and scores[0] > scores[1]


def test_reward_loss_is_bradley_terry_on_scores(tokenizer, make_lm):
    rm = reward_model_from_causal_lm(make_lm(), "value_head")
    ex = encode_preferences(tokenizer, vowel_pairs(4, seed=2))
    batch = collate_preferences(ex, tokenizer.pad_token_id)
    loss, stats = reward_loss(rm, batch, center_coef=0.1)
    scores = rm(batch.input_ids, batch.attention_mask).detach()
    r_c, r_r = scores[:4], scores[4:]
    expected = -torch.nn.functional.logsigmoid(r_c - r_r).mean() + 0.1 * ((r_c + r_r) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert float(stats["accuracy"]) == float((r_c > r_r).float().mean())


def test_resume_continues_exactly(tokenizer, make_lm, assert_same_params):
    pairs = vowel_pairs(10, seed=3)
    config = RewardConfig(learning_rate=1e-3, batch_size=4, max_steps=4, seed=1)
    full = train_reward_model(reward_model_from_causal_lm(make_lm(), "value_head"), tokenizer, pairs, config)

    saved = {}
    first = train_reward_model(
        reward_model_from_causal_lm(make_lm(), "value_head"), tokenizer, pairs,
        RewardConfig(learning_rate=1e-3, batch_size=4, max_steps=4, seed=1, save_every=2),
        checkpoint_fn=lambda s: saved.setdefault(s.step, copy.deepcopy((s.state_dict(), s.model.state_dict()))),
    )
    assert sorted(saved) == [2, 4] and first.history == full.history
    state_dict, weights = saved[2]
    rm = reward_model_from_causal_lm(make_lm(seed=7), "value_head")
    rm.load_state_dict(weights)
    resumed = train_reward_model(rm, tokenizer, pairs, config, state=state_dict)
    assert resumed.history == full.history[2:]
    assert_same_params(resumed.model, full.model, rtol=0, atol=0)


def test_bad_reward_config_and_inputs(tokenizer, make_lm):
    with pytest.raises(ValueError, match="RewardConfig.batch_size must be >= 1"):
        RewardConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown RewardConfig key 'batch_szie'; did you mean 'batch_size'"):
        RewardConfig.from_dict({"batch_szie": 4})
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="tokenizer has no EOS token"):
        train_reward_model(make_lm(), tokenizer, vowel_pairs(2, 0), RewardConfig())
