"""Trunk/head access, left-padding positions, dropout, the reference, value heads, reward models."""

import pytest
import torch

from rftengine.methods.data import encode_prompt, encode_response, make_sequence_batch
from rftengine.methods.modeling import (
    CausalLMWithValueHead,
    Reference,
    RewardModel,
    disable_dropout,
    final_hidden,
    last_token_index,
    load_causal_lm,
    load_tokenizer,
    output_head,
    response_logprobs,
    reward_model_from_causal_lm,
)


def _batch(tokenizer, prompts=("hello", "hi there"), responses=("abc", "a")):
    return make_sequence_batch(
        [encode_prompt(tokenizer, p) for p in prompts],
        [encode_response(tokenizer, r) for r in responses],
        tokenizer.pad_token_id,
    )


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_padded_batch_hidden_matches_unpadded_hf_forward(tokenizer, family):
    from rftengine.toy import tiny_causal_lm

    model = tiny_causal_lm(len(tokenizer), family, hidden_size=32)
    b = _batch(tokenizer)
    weight, bias = output_head(model)
    assert bias is None and weight is model.get_input_embeddings().weight  # tied
    logits = final_hidden(model, b.input_ids, b.attention_mask) @ weight.T
    for i in range(b.num_rows):
        keep = b.attention_mask[i].bool()
        expected = model(b.input_ids[i][keep].unsqueeze(0)).logits[0]
        torch.testing.assert_close(logits[i][keep], expected, rtol=1e-5, atol=1e-5)


def test_response_logprobs_equal_log_softmax_of_hf_logits(tokenizer, make_lm):
    model = make_lm()
    b = _batch(tokenizer)
    logp = response_logprobs(model, b, temperature=0.7)
    assert logp.shape == b.response_mask.shape and logp.dtype == torch.float32
    for i in range(b.num_rows):
        keep = b.attention_mask[i].bool()
        ids = b.input_ids[i][keep]
        logits = model(ids.unsqueeze(0)).logits[0] / 0.7
        n_resp = int(b.response_mask[i].sum())
        full = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]
        torch.testing.assert_close(logp[i, :n_resp], full[-n_resp:], rtol=1e-5, atol=1e-5)
        assert torch.all(logp[i, n_resp:] == 0)


def test_disable_dropout_makes_train_mode_deterministic(tokenizer):
    from transformers import AutoModelForCausalLM

    from rftengine.toy import tiny_config

    config = tiny_config(len(tokenizer), hidden_size=32)
    config.attention_dropout = 0.5
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(4, 40, (2, 9))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is live before
    disable_dropout(model)
    assert model.config.attention_dropout == 0.0
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_reference_is_a_frozen_copy_unaffected_by_policy_updates(tokenizer, make_lm):
    policy = make_lm()
    ref = Reference(policy)
    assert not ref.shared and ref.model is not policy
    assert all(not p.requires_grad for p in ref.model.parameters())
    b = _batch(tokenizer)
    before = ref.logprobs(b)
    torch.testing.assert_close(before, response_logprobs(policy, b).detach())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1)
    torch.testing.assert_close(ref.logprobs(b), before, rtol=0, atol=0)
    assert not torch.allclose(response_logprobs(policy, b).detach(), before)


def test_reference_of_a_resumed_policy_needs_the_original_model(make_lm):
    policy, original = make_lm(seed=1), make_lm(seed=0)
    with pytest.raises(ValueError, match="resuming needs ref_model"):
        Reference(policy, resumed=True)
    assert Reference(policy, original, resumed=True).model is original
    assert Reference(policy).model is not policy          # a fresh run copies the policy as given


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [3, 2, 0]


@pytest.mark.parametrize("kind", ["value_head", "classification"])
def test_reward_score_read_at_last_non_pad_token(tokenizer, make_lm, kind):
    rm = reward_model_from_causal_lm(make_lm(), kind)
    assert rm.kind == kind
    b = _batch(tokenizer)
    scores = rm(b.input_ids, b.attention_mask)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    for i in range(2):  # each row alone, unpadded, gives the same score
        keep = b.attention_mask[i].bool()
        alone = rm(b.input_ids[i][keep][None], torch.ones(1, int(keep.sum()), dtype=torch.long))
        torch.testing.assert_close(scores[i:i + 1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["value_head", "classification"])
def test_reward_model_save_load_roundtrip(tokenizer, make_lm, tmp_path, kind):
    rm = reward_model_from_causal_lm(make_lm(), kind)
    b = _batch(tokenizer)
    rm.save_pretrained(tmp_path / "rm", tokenizer)
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert loaded.kind == kind
    torch.testing.assert_close(loaded(b.input_ids, b.attention_mask), rm(b.input_ids, b.attention_mask))


def test_value_head_model_values_per_position(tokenizer, make_lm):
    critic = CausalLMWithValueHead(make_lm())
    b = _batch(tokenizer)
    values = critic(b.input_ids, b.attention_mask)
    assert values.shape == b.input_ids.shape
    torch.testing.assert_close(critic.score(b.input_ids, b.attention_mask),
                               values[torch.arange(2), last_token_index(b.attention_mask)])


def test_load_causal_lm_from_directory_and_errors(make_lm, tmp_path):
    model = make_lm()
    model.save_pretrained(tmp_path / "lm")
    loaded = load_causal_lm(tmp_path / "lm")
    torch.testing.assert_close(dict(loaded.named_parameters())["model.embed_tokens.weight"],
                               dict(model.named_parameters())["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="not a directory"):
        load_causal_lm(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "lm" / "config.json").read_text())
    with pytest.raises(ValueError, match="has no weights"):
        load_causal_lm(tmp_path / "empty")


def test_truncated_weights_are_named_by_the_one_model_directory_check(make_lm, tmp_path):
    from rftengine.checkpoint import check_model_dir
    from rftengine.errors import UserError

    make_lm().save_pretrained(tmp_path / "lm")
    weights = tmp_path / "lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # the loaders and the CLI's early check (the same rule, as a UserError) say the same
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or not a safetensors file"):
        load_causal_lm(tmp_path / "lm")
    with pytest.raises(UserError, match=r"model\.safetensors is truncated or not a safetensors file"):
        check_model_dir(tmp_path / "lm")


def test_adapter_directory_without_peft_says_how_to_install_it(make_lm, tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    import sys

    base = make_lm()
    base.save_pretrained(tmp_path / "base")
    adapters = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    adapters.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    adapters.save_pretrained(tmp_path / "adapters")
    monkeypatch.setitem(sys.modules, "peft", None)  # as if the optional extra were not installed
    with pytest.raises(ValueError, match=r"is a PEFT adapter directory: loading it needs peft, which is not "
                                         r"installed: pip install rftengine\[peft\]"):
        load_causal_lm(tmp_path / "adapters")


def test_classifier_needs_one_label(make_lm):
    from transformers import AutoModelForSequenceClassification

    config = make_lm().config
    config.num_labels = 2
    with pytest.raises(ValueError, match="num_labels=1, got 2"):
        RewardModel(AutoModelForSequenceClassification.from_config(config))


def test_load_tokenizer_from_directory_sets_pad_and_left_padding(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded("abc")["input_ids"] == tokenizer("abc")["input_ids"]
    assert loaded.padding_side == "left" and loaded.pad_token_id == tokenizer.pad_token_id
    tokenizer.pad_token = None
    assert load_tokenizer(tokenizer).pad_token_id == tokenizer.eos_token_id
