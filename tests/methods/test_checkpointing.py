"""Activation checkpointing (``gradient_checkpointing``): the decoder layers run again in
backward (counted by a forward hook), and the loss and gradients equal those of a run without
it, for a DPO step and a PPO step with a separate critic; rollouts still work."""

import pytest
import torch

from rftengine.methods.dpo import DPOConfig, dpo_step
from rftengine.methods.modeling import enable_gradient_checkpointing
from rftengine.methods.ppo import make_ppo_context, rollout, step
from rftengine.methods.ppo_config import PPOConfig
from rftengine.methods.reward import RewardConfig, train_reward_model

from .test_accumulation import assert_same_step, grpo_batch, pair_batch, sgd_gradients


def count_layer_calls(model):
    """Calls of the first layer's MLP forward, which runs inside the checkpointed layer (module
    hooks do not fire again in the recompute, so the forward itself is wrapped)."""
    calls = []
    mlp = model.model.layers[0].mlp
    forward = mlp.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    mlp.forward = counted
    return calls


def is_checkpointing(model) -> bool:
    return all(layer.gradient_checkpointing for layer in model.model.layers)


def test_dpo_step_with_checkpointing_recomputes_layers_and_matches(tokenizer, make_lm):
    batch = pair_batch(tokenizer)
    ref_logps = -torch.rand(8, 2, generator=torch.Generator().manual_seed(0)) * 10
    results, calls = [], []
    for checkpointing in (False, True):
        policy = make_lm()
        if checkpointing:
            enable_gradient_checkpointing(policy)
        calls.append(count_layer_calls(policy))
        config = DPOConfig(batch_size=8, max_grad_norm=None)
        results.append(sgd_gradients(policy, lambda opt, p=policy: dpo_step(p, opt, batch, config, ref_logps=ref_logps)))
    assert len(calls[0]) == 1 and len(calls[1]) == 2        # forward, and again in backward
    assert_same_step(*results)


def test_ppo_step_with_a_critic_and_checkpointing_matches(tokenizer, make_lm):
    exp = grpo_batch(tokenizer, make_lm(), "ppo")
    results, contexts = [], []
    for checkpointing in (False, True):
        config = PPOConfig(algorithm="ppo", batch_size=8, ppo_epochs=1, max_grad_norm=None, kl_coef=0.0,
                           max_new_tokens=4, critic="separate", gradient_checkpointing=checkpointing)
        ctx = make_ppo_context(make_lm(), tokenizer, config)
        contexts.append(ctx)
        params = ctx.trainable_parameters()
        before = [p.detach().clone() for p in params]
        ctx.optimizer = torch.optim.SGD(params, lr=1.0)
        metrics = step(ctx, exp)
        results.append((metrics, {f"p{i}": b - p.detach() for i, (b, p) in enumerate(zip(before, params))}))
    ctx = contexts[1]
    assert is_checkpointing(ctx.policy) and is_checkpointing(ctx.critic.model)
    assert not is_checkpointing(contexts[0].policy)
    assert_same_step(*results)
    ro = rollout(ctx, ["ab:", "cd:"])                         # the Generator is unaffected
    assert ro.batch.num_rows == 2


def test_reward_model_training_with_checkpointing(tokenizer, make_lm):
    from .test_accumulation import PAIRS

    result = train_reward_model(make_lm(), tokenizer, PAIRS, RewardConfig(max_steps=1, batch_size=4,
                                                                          gradient_checkpointing=True))
    assert is_checkpointing(result.model.backbone)
    assert torch.isfinite(torch.tensor(result.history[-1]["loss"]))


def test_checkpointing_needs_a_hugging_face_model():
    with pytest.raises(ValueError, match="gradient_checkpointing: Linear holds no Hugging Face model"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
