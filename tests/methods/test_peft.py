"""PEFT LoRA policies: only the adapters train, and the reference is the same model with its
adapters disabled (no second copy). Runs where peft is installed (the `test` extra has it)."""

import warnings

import pytest
import torch

from rftengine.generation import EagerFallbackWarning
from rftengine.methods import DPOConfig, PPOConfig, Reference, make_sequence_batch, train_dpo, train_ppo
from rftengine.methods.modeling import response_logprobs
from rftengine.toy import vowel_fraction_reward

peft = pytest.importorskip("peft", reason="peft is an optional extra; install rftengine[test] or [peft]")


def lora_policy(make_lm):
    base = make_lm(seed=3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    # LoRA starts as the identity (B = 0); give it weight so the policy differs from its base
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def probe_batch(tokenizer):
    prompts = [tokenizer.encode(p) for p in ("say:", "name a fruit:")]
    responses = [tokenizer.encode(r) + [tokenizer.eos_token_id] for r in (" aeiou", " xkcd")]
    return make_sequence_batch(prompts, responses, tokenizer.pad_token_id)


def test_reference_is_the_base_with_adapters_disabled(make_lm, tokenizer):
    policy = lora_policy(make_lm)
    batch = probe_batch(tokenizer)
    ref = Reference(policy)
    assert ref.shared and ref.model is policy  # no deep copy of the weights
    assert Reference(policy, resumed=True).shared  # adapters off is the base, resumed or not
    with policy.disable_adapter():
        base_logp = response_logprobs(policy, batch)
    policy_logp = response_logprobs(policy, batch)
    torch.testing.assert_close(ref.logprobs(batch), base_logp)
    assert (policy_logp - base_logp).abs().max() > 1e-3  # the adapters are really on by default


def test_dpo_trains_only_the_adapters(make_lm, tokenizer):
    policy = lora_policy(make_lm)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    batch = probe_batch(tokenizer)
    with policy.disable_adapter():
        base_before = response_logprobs(policy, batch)

    pairs = [{"prompt": "say:", "chosen": " aeiou", "rejected": " xkcd"}] * 8
    train_dpo(policy, tokenizer, pairs, DPOConfig(beta=0.1, batch_size=4, learning_rate=1e-2, precompute_ref=False))

    for name, before in frozen.items():
        torch.testing.assert_close(dict(policy.named_parameters())[name], before, rtol=0, atol=0)
    assert any(
        (dict(policy.named_parameters())[n] - before).abs().max() > 0 for n, before in adapters.items()
    )
    with policy.disable_adapter():
        torch.testing.assert_close(response_logprobs(policy, batch), base_before)


def test_grpo_runs_on_a_lora_policy(make_lm, tokenizer):
    policy = lora_policy(make_lm)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    config = PPOConfig(algorithm="grpo", group_size=2, batch_size=2, max_new_tokens=6, max_steps=2,
                       kl_coef=0.1)
    with warnings.catch_warnings():  # LoRA rolls out on the static runner: no eager fallback
        warnings.simplefilter("error", EagerFallbackWarning)
        result = train_ppo(policy, tokenizer, ["say:", "pick:"], config, reward_fn=vowel_fraction_reward)
    assert len(result.history) == 2
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in result.history)
    # step 1 samples from the policy before any update: its KL to the adapter-free reference
    # is > 0 because the adapters are on, which a deep-copied reference would report as 0
    assert result.history[0]["kl"] > 0
    for name, before in frozen.items():
        torch.testing.assert_close(dict(policy.named_parameters())[name], before, rtol=0, atol=0)
