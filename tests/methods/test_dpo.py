"""DPO: learning the training pairs, every loss variant, reference paths, the fused step against
a plain HF step, resume, config errors."""

import copy
import random

import pytest
import torch

from rftengine.methods.data import collate_preferences, encode_preferences
from rftengine.methods.dpo import (
    DPOConfig,
    dpo_batch_loss,
    dpo_loss_types,
    dpo_step,
    precompute_reference_logps,
    preference_accuracy,
    train_dpo,
)
from rftengine.methods.modeling import Reference
from rftengine.toy import char_tokenizer


def vowel_pairs(n: int, seed: int = 0):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        length = rng.randint(2, 5)
        pairs.append({
            "prompt": "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 4))) + ":",
            "chosen": "".join(rng.choice("aeiou") for _ in range(length)),
            "rejected": "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(length)),
        })
    return pairs


def test_dpo_raises_preference_accuracy_on_training_pairs(tokenizer, make_lm):
    pairs = vowel_pairs(32)
    policy = make_lm()
    reference = copy.deepcopy(policy)
    before = preference_accuracy(policy, tokenizer, pairs)
    seen = []
    config = DPOConfig(beta=0.5, learning_rate=2e-3, batch_size=8, num_epochs=3, seed=0)
    result = train_dpo(policy, tokenizer, pairs, config, callback=lambda s, m: seen.append(m))
    assert len(seen) == 12 and seen[0]["rewards/accuracies"] == 0.0  # policy == reference at step 0
    after = preference_accuracy(policy, tokenizer, pairs)
    implicit = preference_accuracy(policy, tokenizer, pairs, ref_model=reference)
    assert after > before + 0.2 and implicit > 0.9, (before, after, implicit)
    last = result.history[-1]
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "grad_norm"):
        assert name in last, name
    assert last["rewards/margins"] > 0 and last["loss"] < seen[0]["loss"]
    assert tuple(result.state.extra["ref_logps"].shape) == (32, 2)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "simpo"])
def test_every_loss_type_trains(tokenizer, make_lm, loss_type):
    assert loss_type in dpo_loss_types()
    smoothing = 0.1 if loss_type in ("sigmoid", "robust", "simpo") else 0.0
    config = DPOConfig(loss_type=loss_type, label_smoothing=smoothing, learning_rate=1e-3, batch_size=4,
                       max_steps=3)
    result = train_dpo(make_lm(), tokenizer, vowel_pairs(8), config)
    losses = [m["loss"] for m in result.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert ("ref_logps" in result.state.extra) == (loss_type != "simpo")


def test_on_the_fly_reference_equals_precomputed(tokenizer, make_lm):
    pairs = vowel_pairs(8)
    kwargs = dict(beta=0.3, learning_rate=1e-3, batch_size=4, max_steps=3, seed=2)
    cached = train_dpo(make_lm(), tokenizer, pairs, DPOConfig(precompute_ref=True, **kwargs))
    live = train_dpo(make_lm(), tokenizer, pairs, DPOConfig(precompute_ref=False, **kwargs))
    assert "ref_logps" not in live.state.extra
    for a, b in zip(cached.history, live.history):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def _hf_sequence_logps(model, batch):
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
    p = batch.prompt_length
    logp = torch.log_softmax(logits[:, p - 1:-1].float(), -1).gather(-1, batch.response_ids[..., None])[..., 0]
    return (logp * batch.response_mask).sum(-1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_fused_step_matches_unfused_hf_step(tokenizer, make_lm, assert_same_params, loss_type, backend, device):
    beta, eps, gamma = 0.7, 0.1, 0.3
    config = DPOConfig(beta=beta, loss_type=loss_type, label_smoothing=eps, simpo_gamma=gamma,
                       max_grad_norm=None)
    dev = device if backend == "triton" else torch.device("cpu")    # the Triton path needs device tensors
    policy = make_lm().to(dev)
    ex = encode_preferences(tokenizer, vowel_pairs(5, seed=4))
    batch = collate_preferences(ex, tokenizer.pad_token_id).to(dev)
    ref_logps = precompute_reference_logps(Reference(policy, make_lm(seed=9).to(dev)), ex,
                                           tokenizer.pad_token_id).to(dev)
    oracle = copy.deepcopy(policy)

    sgd = torch.optim.SGD(policy.parameters(), lr=0.5)
    metrics = dpo_step(policy, sgd, batch, config, ref_logps=ref_logps)

    seq = _hf_sequence_logps(oracle, batch)
    b = len(ex)
    if loss_type == "sigmoid":
        h = beta * ((seq[:b] - ref_logps[:, 0]) - (seq[b:] - ref_logps[:, 1]))
    else:
        n = batch.response_mask.sum(-1)
        h = beta * (seq[:b] / n[:b] - seq[b:] / n[b:]) - gamma
    logsig = torch.nn.functional.logsigmoid
    loss = (-(1 - eps) * logsig(h) - eps * logsig(-h)).mean()
    loss.backward()
    torch.optim.SGD(oracle.parameters(), lr=0.5).step()

    assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert_same_params(policy, oracle, rtol=1e-4, atol=1e-6)


def test_resume_continues_exactly_without_the_reference(tokenizer, make_lm, assert_same_params):
    pairs = vowel_pairs(10)
    config = DPOConfig(beta=0.2, learning_rate=1e-3, batch_size=4, max_steps=4, save_every=2, seed=1)
    saved = {}
    full = train_dpo(make_lm(), tokenizer, pairs, config, checkpoint_fn=lambda s: saved.setdefault(
        s.step, copy.deepcopy((s.state_dict(), s.model.state_dict()))))
    state_dict, weights = saved[2]
    policy = make_lm(seed=11)
    policy.load_state_dict(weights)
    # ref_model=None would mean "copy the policy": the cached log-probs must be used instead
    resumed = train_dpo(policy, tokenizer, pairs, config, state=state_dict)
    assert resumed.history == full.history[2:]
    assert_same_params(policy, full.policy, rtol=0, atol=0)
    with pytest.raises(ValueError, match="caches reference log-probs for 10 pairs, but 9 pairs were given"):
        train_dpo(make_lm(), tokenizer, pairs[:9], config, state=state_dict)


@pytest.mark.parametrize("precompute_ref", [False, True])
def test_resume_without_reference_or_cache_is_refused(tokenizer, make_lm, precompute_ref):
    config = DPOConfig(batch_size=4, max_steps=2, precompute_ref=precompute_ref)
    state = {"method": "dpo", "step": 1, "data_position": 4, "extra": {}}      # no cached ref_logps
    with pytest.raises(ValueError, match="resuming needs ref_model"):
        train_dpo(make_lm(), char_tokenizer(), vowel_pairs(8), config, state=state)


def test_batch_loss_needs_a_reference(tokenizer, make_lm):
    batch = collate_preferences(encode_preferences(tokenizer, vowel_pairs(2)), tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="needs ref_logps or a reference model"):
        dpo_batch_loss(make_lm(), batch, DPOConfig())


def test_bad_configs_and_data_get_clear_errors(tokenizer, make_lm):
    with pytest.raises(ValueError, match="DPOConfig.beta must be > 0.0, got -0.1"):
        DPOConfig(beta=-0.1)
    with pytest.raises(ValueError, match="DPOConfig.loss_type must be one of 'sigmoid', 'ipo'"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing must be 0 for loss_type='hinge'"):
        DPOConfig(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="did you mean 'beta'"):
        DPOConfig.from_dict({"betaa": 0.1})
    chat = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}]
    with pytest.raises(ValueError, match="has no chat template"):
        train_dpo(make_lm(), char_tokenizer(chat_template=False), chat, DPOConfig())
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="tokenizer has no EOS token"):
        train_dpo(make_lm(), tokenizer, vowel_pairs(2), DPOConfig())


@pytest.mark.cuda
def test_bf16_training_on_cuda(tokenizer, make_lm):
    policy = make_lm().to("cuda", torch.bfloat16)
    config = DPOConfig(beta=0.5, learning_rate=1e-3, batch_size=8, max_steps=6)
    result = train_dpo(policy, tokenizer, vowel_pairs(16), config)
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
