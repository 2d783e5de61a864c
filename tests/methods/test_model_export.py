"""Reward models and PPO critics exported as transformers sequence classifiers: loaded by
AutoModelForSequenceClassification with the trained score head, giving rftengine's scores."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rftengine import checkpoint as ckpt
from rftengine.methods.modeling import CausalLMWithValueHead, RewardModel, ValueHead, reward_model_from_causal_lm

TEXTS = ["hello there", "a", "the reward of this text"]


def _trained_head(head: ValueHead) -> ValueHead:
    """A head unlike its init (the export must carry the trained weight, not a fresh one)."""
    with torch.no_grad():
        head.linear.weight.mul_(-3.0).add_(0.05)
    return head


def _inputs(tokenizer, side):
    tokenizer.padding_side = side
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


def _hf_scores(path, enc):
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_value_head_reward_model_exports_its_trained_score_head(tokenizer, make_lm, tmp_path, side):
    rm = reward_model_from_causal_lm(make_lm(), "value_head").eval()
    assert rm.model.v_head.linear.bias is None  # what makes the export exact
    _trained_head(rm.model.v_head)
    out = ckpt.export_model(rm, tokenizer, tmp_path / "final")
    enc = _inputs(tokenizer, side)
    with torch.no_grad():
        expected = rm(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(_hf_scores(out, enc), expected, rtol=1e-5, atol=1e-5)
    assert "AutoModelForSequenceClassification" in (out / "README.md").read_text()
    # and rftengine reads the export back as a (classification) reward model with the same scores
    loaded = RewardModel.from_pretrained(out)
    assert loaded.kind == "classification"
    torch.testing.assert_close(loaded(enc["input_ids"], enc["attention_mask"]), expected, rtol=1e-5, atol=1e-5)


def test_classification_reward_model_export_sets_pad_token(tokenizer, make_lm, tmp_path):
    rm = reward_model_from_causal_lm(make_lm(), "classification").eval()
    rm.model.config.pad_token_id = None
    out = ckpt.export_model(rm, tokenizer, tmp_path / "final")
    enc = _inputs(tokenizer, "left")
    with torch.no_grad():
        expected = rm(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(_hf_scores(out, enc), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("critic_kind", ["shared", "separate"])
def test_ppo_critic_exported_beside_the_policy(tokenizer, make_lm, tmp_path, critic_kind):
    policy = make_lm()
    if critic_kind == "shared":
        critic = _trained_head(ValueHead(32, seed=0))
        trunk = CausalLMWithValueHead(policy, critic)
    else:
        critic = trunk = CausalLMWithValueHead(make_lm(seed=1), _trained_head(ValueHead(32, seed=1)))
    with torch.no_grad():
        trunk.v_head.linear.bias.fill_(0.25)  # a critic's head has a bias: the score layer cannot hold it
    out = ckpt.export_model(policy, tokenizer, tmp_path / "final", critic=critic)
    enc = _inputs(tokenizer, "right")
    with torch.no_grad():
        values = trunk.score(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(_hf_scores(out / ckpt.CRITIC_DIR, enc), values - 0.25, rtol=1e-5, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "/critic" in card and "minus the value head's bias 0.25" in card
    ckpt.check_model_dir(out)  # the policy itself is unchanged at the top


def test_biased_reward_head_export_warns(tokenizer, make_lm, tmp_path):
    rm = RewardModel(CausalLMWithValueHead(make_lm(), ValueHead(32, seed=0)))
    with torch.no_grad():
        rm.model.v_head.linear.bias.fill_(0.5)
    with pytest.warns(UserWarning, match="value-head bias 0.5"):
        ckpt.export_model(rm, tokenizer, tmp_path / "final")


def test_to_sequence_classifier_in_python(tokenizer, make_lm, tmp_path):
    rm = reward_model_from_causal_lm(make_lm(), "value_head").eval()
    _trained_head(rm.model.v_head)
    rm.to_sequence_classifier(tokenizer.pad_token_id).save_pretrained(tmp_path / "rm")
    enc = _inputs(tokenizer, "right")
    with torch.no_grad():
        expected = rm(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(_hf_scores(tmp_path / "rm", enc), expected, rtol=1e-5, atol=1e-5)
