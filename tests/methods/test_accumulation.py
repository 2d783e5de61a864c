"""Gradient accumulation: one optimizer step over a batch of 8 equals 4 accumulated
micro-batches of 2 (same gradients, same metrics), for every method that trains; and the
micro-batch settings are validated.

The gradients are read through plain SGD with lr=1 and no clipping: the weight change of one
step is exactly minus the gradient. Rows differ in length, so normalising each micro-batch by
its own token/pair count instead of the whole step's would change the gradients.
"""

import pytest
import torch

from rftengine.methods.data import collate_preferences, encode_preferences, make_sequence_batch, pad_token_id
from rftengine.methods.dpo import DPOConfig, dpo_step
from rftengine.methods.modeling import response_logprobs
from rftengine.methods.ppo import PPOBatch, make_ppo_context, step
from rftengine.methods.ppo_config import PPOConfig
from rftengine.methods.reward import RewardConfig, as_reward_model, reward_step
from rftengine.methods.sft import SFTConfig, sft_step

# responses of very different lengths (1 to 14 characters)
PAIRS = [
    {"prompt": f"q{i}:", "chosen": " " + "ae" * (i + 1) + "i" * (i % 3), "rejected": " " + "xz"[i % 2] * (7 - i % 7)}
    for i in range(8)
]


def sgd_gradients(model, run):
    """``run(optimizer)`` one step with SGD(lr=1): returns (metrics, {name: gradient})."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    metrics = run(opt)
    return metrics, {n: before[n] - p.detach() for n, p in model.named_parameters() if n in before}


def assert_same_step(whole, accumulated, *, skip=()):
    (m1, g1), (m2, g2) = whole, accumulated
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert any(g.abs().max() > 0 for g in g1.values())
    for key in m1:
        if key not in skip:
            assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key


def pair_batch(tokenizer):
    examples = encode_preferences(tokenizer, PAIRS)
    return collate_preferences(examples, pad_token_id(tokenizer))


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_dpo_accumulated_micro_batches_equal_one_batch(tokenizer, make_lm, loss_type):
    batch = pair_batch(tokenizer)
    ref_logps = -torch.rand(8, 2, generator=torch.Generator().manual_seed(0)) * 10
    results = []
    for options in ({}, {"micro_batch_size": 2}):
        policy = make_lm()
        config = DPOConfig(loss_type=loss_type, batch_size=8, max_grad_norm=None, **options)
        results.append(sgd_gradients(policy, lambda opt, p=policy, c=config: dpo_step(
            p, opt, batch, c, ref_logps=ref_logps if loss_type == "sigmoid" else None)))
    assert_same_step(*results)


def test_reward_model_accumulated_micro_batches_equal_one_batch(tokenizer, make_lm):
    batch = pair_batch(tokenizer)
    margin = torch.linspace(0, 1, 8)
    results = []
    for options in ({}, {"gradient_accumulation_steps": 4}):
        torch.manual_seed(0)                       # the value head's init
        model = as_reward_model(make_lm())
        config = RewardConfig(batch_size=8, max_grad_norm=None, center_coef=0.1, **options)
        results.append(sgd_gradients(model, lambda opt, m=model, c=config: reward_step(
            m, opt, batch, c, margin=margin)))
    assert_same_step(*results)


def test_sft_accumulated_micro_batches_equal_one_batch(tokenizer, make_lm):
    prompts = [tokenizer.encode(p["prompt"]) for p in PAIRS]
    responses = [tokenizer.encode(p["chosen"]) + [tokenizer.eos_token_id] for p in PAIRS]
    batch = make_sequence_batch(prompts, responses, pad_token_id(tokenizer))
    results = []
    for options in ({}, {"micro_batch_size": 2, "gradient_accumulation_steps": 4}):
        policy = make_lm()
        config = SFTConfig(batch_size=8, max_grad_norm=None, **options)
        results.append(sgd_gradients(policy, lambda opt, p=policy, c=config: sft_step(p, opt, batch, c)))
    assert_same_step(*results)


def grpo_batch(tokenizer, policy, algorithm):
    """A synthetic rollout batch of 8 rows with responses of 1 to 8 tokens."""
    gen = torch.Generator().manual_seed(1)
    prompts = [tokenizer.encode(f"p{i}:") for i in range(8)]
    responses = [[int(t) for t in torch.randint(3, len(tokenizer), (1 + (i * 3) % 8,), generator=gen)] for i in range(8)]
    batch = make_sequence_batch(prompts, responses, pad_token_id(tokenizer))
    with torch.no_grad():
        logp = response_logprobs(policy, batch)
    mask = batch.response_mask
    noise = 0.3 * torch.randn(logp.shape, generator=gen)
    per_token = algorithm == "ppo"
    advantages = torch.randn(logp.shape if per_token else (8,), generator=gen)
    return PPOBatch(
        batch=batch, old_logprobs=(logp + noise) * mask,
        advantages=advantages * mask if per_token else advantages,
        ref_logprobs=(logp - noise) * mask,
        returns=torch.randn(logp.shape, generator=gen) * mask if per_token else None,
        old_values=torch.randn(logp.shape, generator=gen) * mask if per_token else None,
        scores=torch.zeros(8),
    )


def ppo_gradients(tokenizer, policy, config, exp, value_model=None):
    ctx = make_ppo_context(policy, tokenizer, config, value_model=value_model)
    params = ctx.trainable_parameters()
    named = {f"p{i}": p for i, p in enumerate(params)}
    before = {n: p.detach().clone() for n, p in named.items()}
    ctx.optimizer = torch.optim.SGD(params, lr=1.0)
    metrics = step(ctx, exp)
    return metrics, {n: before[n] - p.detach() for n, p in named.items()}


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "token_sum_norm"])
def test_grpo_accumulated_micro_batches_equal_one_batch(tokenizer, make_lm, aggregation):
    exp = grpo_batch(tokenizer, make_lm(), "grpo")
    results = []
    for options in ({}, {"micro_batch_size": 2}):
        config = PPOConfig(algorithm="grpo", batch_size=4, group_size=2, ppo_epochs=1, max_grad_norm=None,
                           aggregation=aggregation, kl_coef=0.1, entropy_coef=0.01, max_new_tokens=8, **options)
        results.append(ppo_gradients(tokenizer, make_lm(), config, exp))
    assert_same_step(*results)


def test_ppo_with_critic_accumulated_micro_batches_equal_one_batch(tokenizer, make_lm):
    exp = grpo_batch(tokenizer, make_lm(), "ppo")
    results = []
    for options in ({}, {"gradient_accumulation_steps": 4}):
        config = PPOConfig(algorithm="ppo", batch_size=8, ppo_epochs=1, max_grad_norm=None, kl_coef=0.0,
                           max_new_tokens=8, critic="separate", **options)
        results.append(ppo_gradients(tokenizer, make_lm(), config, exp))
    assert_same_step(*results)


def test_rollout_micro_batches_give_the_same_experience(tokenizer, make_lm):
    from rftengine.methods.ppo import _rollout_passes
    from rftengine.methods.rollout import Rollout

    exp = grpo_batch(tokenizer, make_lm(), "ppo")
    ro = Rollout(prompts=[""] * 8, responses=[""] * 8, columns=None, batch=exp.batch,
                 logprobs=exp.old_logprobs, eos=torch.ones(8, dtype=torch.bool), group_size=1)
    out = []
    for rows in (None, 3):
        config = PPOConfig(algorithm="ppo", batch_size=8, max_new_tokens=8, kl_coef=0.1, critic="shared",
                           recompute_logprobs=True, rollout_micro_batch_size=rows)
        out.append(_rollout_passes(make_ppo_context(make_lm(), tokenizer, config), ro))
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("options", "match"), [
    ({"batch_size": 8, "micro_batch_size": 3}, r"DPOConfig.batch_size \(8\) must be a multiple of DPOConfig.micro_batch_size, got 3"),
    ({"batch_size": 8, "gradient_accumulation_steps": 3}, r"DPOConfig.batch_size \(8\) must be divisible by DPOConfig.gradient_accumulation_steps \(3\)"),
    ({"batch_size": 8, "micro_batch_size": 2, "gradient_accumulation_steps": 2}, r"micro_batch_size \* gradient_accumulation_steps must equal batch_size \(8\), got 2 \* 2"),
    ({"batch_size": 4, "micro_batch_size": 8}, r"must be a multiple of DPOConfig.micro_batch_size, got 8"),
    ({"gradient_accumulation_steps": 0}, r"DPOConfig.gradient_accumulation_steps must be >= 1, got 0"),
    ({"gradient_checkpointing": "yes"}, r"DPOConfig.gradient_checkpointing must be true or false"),
])
def test_micro_batch_settings_are_validated(options, match):
    with pytest.raises(ValueError, match=match):
        DPOConfig(**options)


def test_ppo_micro_batches_divide_the_minibatch():
    with pytest.raises(ValueError, match=r"PPOConfig.minibatch_size \(4\) must be a multiple of PPOConfig.micro_batch_size, got 3"):
        PPOConfig(batch_size=8, minibatch_size=4, micro_batch_size=3)
    with pytest.raises(ValueError, match=r"PPOConfig.batch_size \* group_size \(8\) must be divisible by"):
        PPOConfig(batch_size=4, group_size=2, algorithm="grpo", gradient_accumulation_steps=3)
    assert PPOConfig(batch_size=4, group_size=2, algorithm="grpo", micro_batch_size=2).micro_batch_size == 2
    with pytest.raises(ValueError, match="PPOConfig.rollout_micro_batch_size must be >= 1"):
        PPOConfig(rollout_micro_batch_size=0)
