"""PPO / GRPO / RLOO: learning on the toy task, the fused step against a plain HF step, reward
shaping, KL control, resume, config errors."""

import copy
import random

import pytest
import torch

from rftengine.methods.ppo import compute_advantages, evaluate_reward, make_ppo_context, rollout, score, step, train_ppo
from rftengine.methods.ppo_advantages import KLController
from rftengine.methods.ppo_config import PPOConfig
from rftengine.toy import vowel_fraction_reward


def toy_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 5))) + ":" for _ in range(n)]


def _train_and_measure(tokenizer, make_lm, **overrides):
    policy = make_lm()
    prompts, held_out = toy_prompts(64, seed=0), toy_prompts(32, seed=1)
    options = dict(max_new_tokens=8, kl_coef=0.01, learning_rate=3e-3, ppo_epochs=2,
                   minibatch_size=8, max_steps=15, seed=0)
    options.update(overrides)
    config = PPOConfig(**options)
    probe = make_ppo_context(policy, tokenizer, config)
    before = evaluate_reward(probe, held_out, vowel_fraction_reward)
    steps = []
    result = train_ppo(policy, tokenizer, prompts, config, reward_fn=vowel_fraction_reward,
                       callback=lambda s, m: steps.append(s))
    after = evaluate_reward(result.context, held_out, vowel_fraction_reward)
    assert steps == list(range(1, config.max_steps + 1))
    return before, after, result


def test_ppo_raises_mean_reward(tokenizer, make_lm):
    before, after, result = _train_and_measure(tokenizer, make_lm, algorithm="ppo", batch_size=16,
                                               vf_coef=0.5)
    assert after > before + 0.2, (before, after)
    metrics = result.history[-1]
    for name in ("reward", "reward_std", "kl", "clip_ratio/region_mean", "entropy", "value/loss",
                 "completions/mean_length", "loss", "objective/kl_coef", "rewards/vowel_fraction_reward/mean"):
        assert name in metrics, name
    assert metrics["kl"] > 0  # the policy moved away from the reference


def test_grpo_raises_mean_reward(tokenizer, make_lm):
    before, after, result = _train_and_measure(tokenizer, make_lm, algorithm="grpo", group_size=4,
                                               batch_size=4)
    assert after > before + 0.2, (before, after)
    assert "value/loss" not in result.history[-1] and result.context.critic is None


@pytest.mark.parametrize("algorithm,critic", [("rloo", "shared"), ("ppo", "separate")])
def test_other_variants_run_end_to_end(tokenizer, make_lm, algorithm, critic):
    config = PPOConfig(algorithm=algorithm, critic=critic, group_size=2, batch_size=2,
                       max_new_tokens=4, max_steps=2, learning_rate=1e-3, adaptive_kl=algorithm == "ppo")
    result = train_ppo(make_lm(), tokenizer, toy_prompts(4), config, reward_fn=vowel_fraction_reward)
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(list(m.values()))).all()
                                            for m in result.history)


def _hf_logprobs(model, batch, temperature):
    """Plain HF forward + log_softmax: the unfused oracle for the response tokens."""
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos,
                output_hidden_states=True)
    p = batch.prompt_length
    logp_all = torch.log_softmax(out.logits[:, p - 1:-1].float() / temperature, dim=-1)
    logp = logp_all.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy, out.hidden_states[-1][:, p - 1:-1]


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_fused_step_matches_unfused_hf_step(tokenizer, make_lm, assert_same_params, algorithm, backend, device):
    temperature, clip, beta, ent_coef, vf_coef = 0.8, 0.2, 0.3, 0.01, 0.5
    config = PPOConfig(algorithm=algorithm, group_size=1 if algorithm == "ppo" else 2, batch_size=3,
                       max_new_tokens=6, temperature=temperature, clip_range=clip, kl_coef=beta,
                       entropy_coef=ent_coef, vf_coef=vf_coef, ppo_epochs=1, max_grad_norm=None,
                       value_clip=0.05)
    dev = device if backend == "triton" else torch.device("cpu")    # the Triton path needs device tensors
    policy = make_lm().to(dev)
    ctx = make_ppo_context(policy, tokenizer, config)
    with torch.no_grad():  # move the policy off the reference so the KL terms are non-zero
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape).to(dev))     # drawn on the CPU: the same on every device
    ro = rollout(ctx, ["ab:", "cde:", "f:"])
    exp = compute_advantages(ctx, ro, score(ctx, ro, vowel_fraction_reward))
    gen = torch.Generator().manual_seed(1)  # an older policy: some ratios leave the clip range
    exp.old_logprobs = (exp.old_logprobs + 0.3 * torch.randn(exp.old_logprobs.shape, generator=gen).to(dev)) \
        * ro.batch.response_mask
    ref_logp = ctx.reference.logprobs(ro.batch, temperature=temperature)

    ref_policy, ref_critic = copy.deepcopy(policy), copy.deepcopy(ctx.critic)
    ctx.optimizer, ctx.scheduler = torch.optim.SGD(ctx.trainable_parameters(), lr=0.5), None
    metrics = step(ctx, exp)

    mask = ro.batch.response_mask
    n = mask.sum()
    logp, entropy, hidden = _hf_logprobs(ref_policy, ro.batch, temperature)
    adv = exp.advantages if exp.advantages.dim() == 2 else exp.advantages[:, None].expand_as(logp)
    ratio = torch.exp(logp - exp.old_logprobs)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    loss = (pg * mask).sum() / n - ent_coef * (entropy * mask).sum() / n
    if algorithm == "ppo":
        values = ref_critic(hidden)
        clipped = exp.old_values + (values - exp.old_values).clamp(-0.05, 0.05)
        v_loss = 0.5 * torch.maximum((values - exp.returns) ** 2, (clipped - exp.returns) ** 2)
        loss = loss + vf_coef * (v_loss * mask).sum() / n
    else:
        r = ref_logp - logp
        loss = loss + beta * ((torch.exp(r) - r - 1) * mask).sum() / n
    params = list(ref_policy.parameters()) + (list(ref_critic.parameters()) if ref_critic is not None else [])
    sgd = torch.optim.SGD(params, lr=0.5)
    loss.backward()
    sgd.step()

    assert 0 < metrics["clip_ratio/region_mean"] < 1
    assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-4, abs=1e-6)
    assert_same_params(policy, ref_policy, rtol=1e-4, atol=1e-6)
    if ref_critic is not None:
        assert_same_params(ctx.critic, ref_critic, rtol=1e-4, atol=1e-6)


def test_clip_ratio_sides_and_their_rank_extremes(tokenizer, make_lm, monkeypatch):
    """TRL's clip_ratio/low_mean + high_mean = region_mean; low_min / high_max are the rank's own
    low / high mean over its micro-batches, so in one process they equal low_mean / high_mean;
    with other ranks' tokens in the step's normaliser, low_mean is only this rank's share of the
    global mean while low_min stays the rank's mean."""
    from rftengine.methods import ppo

    def one_step(config):
        ctx = make_ppo_context(make_lm(), tokenizer, config)
        ro = rollout(ctx, ["ab:", "cde:", "f:", "ghij:"])
        exp = compute_advantages(ctx, ro, score(ctx, ro, vowel_fraction_reward))
        gen = torch.Generator().manual_seed(1)  # an older policy: ratios leave the clip range on both sides
        exp.old_logprobs = (exp.old_logprobs + 0.5 * torch.randn(exp.old_logprobs.shape, generator=gen)) \
            * ro.batch.response_mask
        return step(ctx, exp)

    config = PPOConfig(algorithm="grpo", group_size=2, batch_size=4, max_new_tokens=6, ppo_epochs=1,
                       minibatch_size=4, micro_batch_size=1, clip_range=0.1, clip_range_high=0.3, seed=0)
    m = one_step(config)
    low, high = m["clip_ratio/low_mean"], m["clip_ratio/high_mean"]
    assert low > 0 and high > 0
    assert low + high == pytest.approx(m["clip_ratio/region_mean"], rel=1e-6)
    assert m["clip_ratio/low_min"] == low and m["clip_ratio/high_max"] == high

    # a second rank with as many tokens: the step's token count doubles, this rank's does not
    monkeypatch.setattr(ppo, "global_count", lambda count: 2 * torch.as_tensor(count, dtype=torch.float32).clamp(min=1))
    m = one_step(config)
    assert m["clip_ratio/low_min"] == pytest.approx(2 * m["clip_ratio/low_mean"], rel=1e-6)
    assert m["clip_ratio/high_max"] == pytest.approx(2 * m["clip_ratio/high_mean"], rel=1e-6)


def test_ppo_rewards_are_score_minus_kl_penalty(tokenizer, make_lm):
    """With γ = λ = 1 and no whitening, returns_0 = Σ_t r_t = score − β·Σ_t KL_t (k1)."""
    beta = 0.2
    config = PPOConfig(batch_size=4, max_new_tokens=5, kl_coef=beta, gamma=1.0, lam=1.0,
                       whiten_advantages=False, missing_eos_penalty=0.5)
    policy = make_lm()
    ctx = make_ppo_context(policy, tokenizer, config)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ro = rollout(ctx, toy_prompts(4))
    raw = vowel_fraction_reward(ro.prompts, ro.responses)
    scores = score(ctx, ro, vowel_fraction_reward)
    torch.testing.assert_close(scores, torch.where(ro.eos, raw, raw - 0.5))
    assert not bool(ro.eos.all())  # 5 tokens: some responses are cut, so the penalty is exercised
    exp = compute_advantages(ctx, ro, scores)
    mask = ro.batch.response_mask
    seq_kl = ((ro.logprobs - ctx.reference.logprobs(ro.batch)) * mask).sum(-1)
    assert seq_kl.abs().sum() > 0
    torch.testing.assert_close(exp.returns[:, 0], scores - beta * seq_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exp.advantages, (exp.returns - exp.old_values) * mask, rtol=1e-5, atol=1e-5)
    assert exp.stats["kl"] == pytest.approx(float(seq_kl.mean()), rel=1e-5, abs=1e-6)


def test_group_advantages_are_per_sequence_and_centred(tokenizer, make_lm):
    config = PPOConfig(algorithm="rloo", group_size=3, batch_size=2, max_new_tokens=4)
    ctx = make_ppo_context(make_lm(), tokenizer, config)
    ro = rollout(ctx, ["ab:", "cd:"])
    assert ro.prompts == ["ab:"] * 3 + ["cd:"] * 3
    scores = torch.tensor([0.0, 0.3, 0.9, 0.5, 0.5, 0.2])
    exp = compute_advantages(ctx, ro, scores)
    expected = torch.stack([s - (g.sum() - s) / 2 for g in scores.view(2, 3) for s in g])
    torch.testing.assert_close(exp.advantages, expected)
    assert exp.returns is None and exp.ref_logprobs is not None


def test_adaptive_kl_controller_follows_ziegler_rule():
    kl = KLController(0.1, adaptive=True, target=6.0, horizon=1000)
    assert kl.update(12.0, n=100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at +0.2
    assert kl.update(5.4, n=100) == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))
    assert KLController(0.1).update(100.0, n=100) == 0.1  # fixed


def test_resume_continues_exactly(tokenizer, make_lm, assert_same_params):
    prompts = toy_prompts(6)
    config = PPOConfig(batch_size=2, max_new_tokens=5, max_steps=3, learning_rate=1e-3, ppo_epochs=2,
                       minibatch_size=1, adaptive_kl=True, save_every=2, seed=3)
    full = train_ppo(make_lm(), tokenizer, prompts, config, reward_fn=vowel_fraction_reward)

    saved = {}
    original = make_lm()
    train_ppo(original, tokenizer, prompts, config, reward_fn=vowel_fraction_reward,
              checkpoint_fn=lambda s: saved.setdefault(
                  s.step, copy.deepcopy((s.state_dict(), s.model.state_dict()))))
    state_dict, weights = saved[2]
    policy = make_lm(seed=5)
    policy.load_state_dict(weights)
    resumed = train_ppo(policy, tokenizer, prompts, config, reward_fn=vowel_fraction_reward,
                        ref_model=make_lm(), state=state_dict)
    assert resumed.history == full.history[2:]
    assert_same_params(policy, full.policy, rtol=0, atol=0)


def test_resume_without_ref_model_is_refused(tokenizer, make_lm):
    """The reference is the policy at the start of training: never a copy of a resumed policy."""
    config = PPOConfig(algorithm="grpo", group_size=2, batch_size=2, max_new_tokens=4, max_steps=2)
    state = {"method": "grpo", "step": 1, "data_position": 2, "modules": {}, "extra": {"kl_coef": 0.05}}
    with pytest.raises(ValueError, match="resuming needs ref_model"):
        train_ppo(make_lm(), tokenizer, toy_prompts(4), config, reward_fn=vowel_fraction_reward, state=state)
    no_kl = PPOConfig(algorithm="grpo", group_size=2, batch_size=2, max_new_tokens=4, max_steps=2, kl_coef=0.0)
    result = train_ppo(make_lm(), tokenizer, toy_prompts(4), no_kl, reward_fn=vowel_fraction_reward, state=state)
    assert result.context.reference is None and result.state.step == 2


def test_bad_configs_get_clear_errors(tokenizer, make_lm):
    with pytest.raises(ValueError, match=r"PPOConfig.kl_coef must be >= 0.0, got -0.1"):
        PPOConfig(kl_coef=-0.1)
    with pytest.raises(ValueError, match=r"PPOConfig.group_size must be >= 2 for algorithm='grpo'"):
        PPOConfig(algorithm="grpo", group_size=1)
    with pytest.raises(ValueError, match="PPOConfig.algorithm must be one of 'ppo', 'grpo', 'rloo'"):
        PPOConfig(algorithm="trpo")
    with pytest.raises(ValueError, match="did you mean 'kl_coef'"):
        PPOConfig.from_dict({"kl_coeff": 0.1})
    with pytest.raises(ValueError, match="adaptive_kl .* needs kl_in_loss=False"):
        PPOConfig(adaptive_kl=True, kl_in_loss=True)
    with pytest.raises(ValueError, match="minibatch_size must be <= batch_size"):
        PPOConfig(batch_size=2, minibatch_size=3)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        PPOConfig(aggregation="mean")
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="tokenizer has no EOS token"):
        make_ppo_context(make_lm(), tokenizer, PPOConfig())


def test_reward_fn_errors_are_clear(tokenizer, make_lm):
    ctx = make_ppo_context(make_lm(), tokenizer, PPOConfig(batch_size=2, max_new_tokens=3))
    ro = rollout(ctx, ["a:", "b:"])
    with pytest.raises(ValueError, match="one score per response \\(2\\), got 3"):
        score(ctx, ro, lambda p, r: [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="NaN or inf"):
        score(ctx, ro, lambda p, r: [0.0, float("nan")])


@pytest.mark.cuda
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_bf16_training_on_cuda(tokenizer, make_lm, algorithm):
    """CUDA-graph rollouts + Triton fused heads in bf16: the first minibatch sees the rollout
    policy itself, so its mean ratio is ~1 (rollout/trainer log-prob mismatch)."""
    policy = make_lm().to("cuda", torch.bfloat16)
    config = PPOConfig(algorithm=algorithm, group_size=1 if algorithm == "ppo" else 4, batch_size=8,
                       max_new_tokens=8, max_steps=3, learning_rate=1e-4, ppo_epochs=1)
    result = train_ppo(policy, tokenizer, toy_prompts(16), config, reward_fn=vowel_fraction_reward)
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in result.history)
    assert result.history[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=2e-2)


def test_references_reach_the_reward_fn(tokenizer, make_lm):
    data = [{"prompt": "a:", "reference": "x"}, {"prompt": "b:", "reference": "y"}]
    seen = []

    def reward_fn(prompts, responses, references):
        seen.append((list(prompts), list(references)))
        return [float(p == "a:") for p in prompts]

    config = PPOConfig(algorithm="grpo", group_size=2, batch_size=2, max_new_tokens=3, max_steps=1,
                       shuffle=False)
    train_ppo(make_lm(), tokenizer, data, config, reward_fn=reward_fn)
    assert seen == [(["a:", "a:", "b:", "b:"], ["x", "x", "y", "y"])]
    with pytest.raises(ValueError, match="does not accept a references= keyword"):
        train_ppo(make_lm(), tokenizer, data, config, reward_fn=vowel_fraction_reward)


KL_MODES = [("ppo", False, False), ("ppo", True, False), ("ppo", False, True), ("grpo", False, False),
            ("grpo", True, False), ("grpo", False, True), ("rloo", False, False), ("rloo", True, False),
            ("rloo", False, True)]


@pytest.mark.parametrize("algorithm, kl_in_loss, adaptive_kl", KL_MODES)
def test_kl_coef_changes_the_update_in_every_mode(tokenizer, make_lm, algorithm, kl_in_loss, adaptive_kl):
    """Two one-step runs differing only in kl_coef, with a reference that differs from the
    policy (so the KL is non-zero), must end with different weights."""

    def run(kl_coef):
        config = PPOConfig(algorithm=algorithm, group_size=1 if algorithm == "ppo" else 2, batch_size=2,
                           max_new_tokens=4, max_steps=1, ppo_epochs=1, learning_rate=1e-2, kl_coef=kl_coef,
                           kl_in_loss=kl_in_loss, adaptive_kl=adaptive_kl, shuffle=False)
        policy = make_lm()
        train_ppo(policy, tokenizer, ["ab:", "cd:"], config, reward_fn=vowel_fraction_reward,
                  ref_model=make_lm(seed=3))
        return policy

    a, b = run(0.5), run(0.05)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_group_scores_carry_the_sequence_kl_when_it_is_not_in_the_loss(tokenizer, make_lm):
    beta = 0.3
    config = PPOConfig(algorithm="rloo", group_size=2, batch_size=2, max_new_tokens=4, kl_coef=beta,
                       kl_in_loss=False, kl_estimator="k1")
    ctx = make_ppo_context(make_lm(), tokenizer, config, ref_model=make_lm(seed=3))
    ro = rollout(ctx, ["ab:", "cd:"])
    scores = torch.tensor([0.1, 0.7, 0.4, 0.4])
    exp = compute_advantages(ctx, ro, scores)
    seq_kl = ((ro.logprobs - ctx.reference.logprobs(ro.batch)) * ro.batch.response_mask).sum(-1)
    shaped = (scores - beta * seq_kl).view(2, 2)
    expected = (shaped - shaped.flip(-1)).reshape(-1)       # RLOO, G = 2: s_i - s_other
    torch.testing.assert_close(exp.advantages, expected, rtol=1e-5, atol=1e-6)
    assert exp.ref_logprobs is None


@pytest.mark.parametrize("loss_constant, expected", [(None, 6.0), (11.0, 11.0)])
def test_token_sum_norm_divides_by_a_fixed_constant(tokenizer, make_lm, monkeypatch, loss_constant, expected):
    """Dr. GRPO: the divisor is loss_constant (default max_new_tokens), not the batch's longest
    response."""
    from rftengine import ops

    seen, original = [], ops.fused_ppo_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["loss_constant"])
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "fused_ppo_loss", spy)
    config = PPOConfig(algorithm="grpo", group_size=2, batch_size=2, max_new_tokens=6, max_steps=1, ppo_epochs=1,
                       aggregation="token_sum_norm", loss_constant=loss_constant)
    train_ppo(make_lm(), tokenizer, ["ab:", "cd:"], config, reward_fn=vowel_fraction_reward)
    assert seen == [expected]
    with pytest.raises(ValueError, match="loss_constant is only used with aggregation='token_sum_norm'"):
        PPOConfig(loss_constant=4.0)
    with pytest.raises(ValueError, match=r"PPOConfig.loss_constant must be > 0.0, got 0"):
        PPOConfig(aggregation="token_sum_norm", loss_constant=0)


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_value_head_init_follows_config_seed(tokenizer, make_lm, critic):
    heads = []
    for global_seed, config_seed in ((1, 4), (2, 4), (1, 5)):
        torch.manual_seed(global_seed)
        ctx = make_ppo_context(make_lm(), tokenizer, PPOConfig(critic=critic, seed=config_seed, kl_coef=0.0))
        head = ctx.critic if critic == "shared" else ctx.critic.v_head
        heads.append(head.linear.weight.detach().clone())
        assert head.linear.bias is None  # as the score layer it exports to (hf_export): exact
    assert torch.equal(heads[0], heads[1])           # same config.seed, different global RNG
    assert not torch.equal(heads[0], heads[2])       # another config.seed
