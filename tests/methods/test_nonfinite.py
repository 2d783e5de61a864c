"""No silent wrong result at the start or in the middle of a run: non-finite steps are skipped,
counted and stop the run; fp16 trainable weights, a vocabulary smaller than the tokenizer's,
sequences longer than the model's positions and broken reward functions are refused with an
error that names what to change."""

import copy

import pytest
import torch

from rftengine.cli import main
from rftengine.methods.cai import CAIConfig, train_cai
from rftengine.methods.optimization import NonFiniteStepError, optimizer_step
from rftengine.methods.dpo import DPOConfig, train_dpo
from rftengine.methods.judge import Judge
from rftengine.methods.ppo import make_ppo_context, rollout, score, train_ppo
from rftengine.methods.ppo_config import PPOConfig
from rftengine.methods.reward import RewardConfig, train_reward_model
from rftengine.methods.rlaif import RLAIFConfig, train_rlaif
from rftengine.methods.sft import SFTConfig, train_sft
from rftengine.toy import tiny_causal_lm, vowel_fraction_reward

from ..cli.cli_helpers import save_tiny_model, write_config, write_jsonl

DATA = [{"prompt": "ab> ", "response": "banana"}, {"prompt": "xyz> ", "response": "kiwi"}]
PAIRS = [{"prompt": "p:", "chosen": " aeiou", "rejected": " xyz"}, {"prompt": "q:", "chosen": " oe", "rejected": " k"}]


def poison(model, bad_calls):
    """Make the policy's final hidden states NaN on the listed forward calls (0-based) of this
    very module (a deep copy, e.g. a reference, is left alone)."""
    norm = model.model.norm
    calls = {"n": 0}

    def hook(module, args, out):
        if module is not norm:
            return out
        index = calls["n"]
        calls["n"] += 1
        return out * float("nan") if (bad_calls == "all" or index in bad_calls) else out

    norm.register_forward_hook(hook)
    return calls


def test_a_non_finite_step_is_skipped_and_counted(make_lm, tokenizer):
    model = make_lm()
    poison(model, {1})
    snapshots = []
    config = SFTConfig(learning_rate=1e-2, batch_size=2, max_steps=3, max_grad_norm=None)
    result = train_sft(model, tokenizer, DATA, config,
                       callback=lambda s, m: snapshots.append(copy.deepcopy(model.state_dict())))
    skipped = [m["train/skipped_steps"] for m in result.history]
    assert skipped == [0.0, 1.0, 1.0]
    assert all("grad_norm" in m for m in result.history)       # measured even without clipping
    for name, value in snapshots[0].items():                     # step 2 left the weights as they were
        assert torch.equal(value, snapshots[1][name]), name
    assert any(not torch.equal(v, snapshots[2][k]) for k, v in snapshots[1].items())   # step 3 trained
    assert all(torch.isfinite(p).all() for p in model.parameters())
    adam_steps = {int(s["step"]) for s in result.state.optimizer.state.values()}
    assert adam_steps == {2}                                     # AdamW never saw the bad step
    assert result.state.extra["skipped_steps"] == 1
    # the count is part of the resumable state: a resumed run goes on counting from it
    resumed = train_sft(make_lm(), tokenizer, DATA, SFTConfig(learning_rate=1e-2, batch_size=2, max_steps=4),
                        state=result.state.state_dict())
    assert [m["train/skipped_steps"] for m in resumed.history] == [1.0]
    with pytest.raises(ValueError, match="SFTConfig.max_skipped_steps must be >= 1, got 0"):
        SFTConfig(max_skipped_steps=0)


def test_consecutive_non_finite_steps_stop_the_run_without_a_checkpoint(make_lm, tokenizer):
    model = make_lm()
    poison(model, "all")
    saved = []
    config = SFTConfig(learning_rate=1e-2, batch_size=2, max_steps=5, save_every=1, max_skipped_steps=2)
    with pytest.raises(NonFiniteStepError, match=r"non-finite .* 2 optimizer steps in a row .*max_skipped_steps"):
        train_sft(model, tokenizer, DATA, config, checkpoint_fn=lambda s: saved.append(s.step))
    assert saved == [1]                                          # the first skip still had good weights
    assert issubclass(NonFiniteStepError, ValueError)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ppo_skips_non_finite_minibatch_steps(make_lm, tokenizer):
    """Rollouts run on the Generator's own weight path; the training forwards are poisoned."""
    policy = make_lm()
    poison(policy, "all")
    before = copy.deepcopy(policy.state_dict())
    config = PPOConfig(algorithm="grpo", group_size=2, batch_size=2, max_new_tokens=4, max_steps=1, ppo_epochs=2,
                       kl_coef=0.0)
    result = train_ppo(policy, tokenizer, ["ab:", "cd:"], config, reward_fn=vowel_fraction_reward)
    assert result.history[0]["train/skipped_steps"] == 2.0     # both minibatch steps skipped
    for name, value in before.items():
        assert torch.equal(value, policy.state_dict()[name]), name


def test_optimizer_step_without_a_state_still_skips(make_lm):
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    loss = (w * float("inf")).sum()
    metrics = optimizer_step(loss, {}, opt, None, None)
    assert metrics["train/skipped_steps"] == 1.0 and torch.equal(w.detach(), torch.ones(3)) and w.grad is None


@pytest.mark.parametrize("entry", ["sft", "dpo", "reward", "ppo", "rlaif", "cai"])
def test_fp16_training_is_refused(make_lm, tokenizer, entry):
    model = make_lm().half()
    match = r"fp16 weights cannot be trained directly .* set precision: fp16-mixed"
    with pytest.raises(ValueError, match=match):
        if entry == "sft":
            train_sft(model, tokenizer, DATA, SFTConfig(max_steps=1))
        elif entry == "dpo":
            train_dpo(model, tokenizer, PAIRS, DPOConfig(max_steps=1))
        elif entry == "reward":
            train_reward_model(model, tokenizer, PAIRS, RewardConfig(max_steps=1))
        elif entry == "rlaif":
            judge = Judge(make_lm(seed=7), tokenizer, "rate {response} =", choices=("1", "2"),
                          pairwise_template="1: {response_a} 2: {response_b} =")
            train_rlaif(model, tokenizer, ["ab:"], judge, RLAIFConfig(algorithm="dpo", max_steps=1, batch_size=1))
        elif entry == "cai":                       # refused before any generation
            train_cai(model, tokenizer, ["ab:"], CAIConfig(max_new_tokens=2, max_context_length=32))
        else:
            train_ppo(model, tokenizer, ["ab:"], PPOConfig(max_steps=1, batch_size=1, max_new_tokens=2),
                      reward_fn=vowel_fraction_reward)


def test_cli_refuses_fp16_training(capsys, tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = write_config(tmp_path / "run.yaml", method="dpo", model=str(model_dir), data=str(data),
                       output_dir=str(tmp_path / "out"), train={"max_steps": 1, "batch_size": 2})
    code = main(["train", str(cfg), "dtype=float16"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and "fp16 weights cannot be trained directly" in err and "fp16-mixed" in err
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.parametrize("entry", ["sft", "ppo"])
def test_model_vocabulary_smaller_than_the_tokenizer_is_refused(tokenizer, entry):
    model = tiny_causal_lm(len(tokenizer) - 5, hidden_size=32)
    match = rf"vocabulary .*{len(tokenizer) - 5}.* tokenizer .*{len(tokenizer)}"
    with pytest.raises(ValueError, match=match):
        if entry == "sft":
            train_sft(model, tokenizer, DATA, SFTConfig(max_steps=1))
        else:
            train_ppo(model, tokenizer, ["ab:"], PPOConfig(max_steps=1, batch_size=1, max_new_tokens=2),
                      reward_fn=vowel_fraction_reward)


def test_sequences_longer_than_the_model_positions_are_refused(make_lm, tokenizer):
    model = make_lm(max_positions=12)
    with pytest.raises(ValueError, match=r"max_position_embeddings = 12.*16.*max_response_length"):
        train_sft(model, tokenizer, [{"prompt": "abcdef> ", "response": "abcdefg"}], SFTConfig(max_steps=1))
    with pytest.raises(ValueError, match=r"max_position_embeddings = 12.*4 \+ 9 = 13.*max_new_tokens"):
        train_ppo(model, tokenizer, ["abc:"], PPOConfig(max_steps=1, batch_size=1, max_new_tokens=9),
                  reward_fn=vowel_fraction_reward)
    with pytest.raises(ValueError, match=r"max_position_embeddings = 12.*8 \+ 9 = 17.*max_response_length"):
        train_dpo(model, tokenizer, [{"prompt": "abcdefg:", "chosen": "abcdefgh", "rejected": "a"}],
                  DPOConfig(max_steps=1))
    ctx = make_ppo_context(model, tokenizer, PPOConfig(batch_size=1, max_new_tokens=4))
    with pytest.raises(ValueError, match=r"max_position_embeddings = 12.*9 \+ 4 = 13.*max_new_tokens"):
        rollout(ctx, ["abcdefgh:"])                 # the sampling path checks every call
    # within the limit: runs
    train_ppo(model, tokenizer, ["abc:"], PPOConfig(max_steps=1, batch_size=1, max_new_tokens=8, ppo_epochs=1),
              reward_fn=vowel_fraction_reward)


def returns_text(prompts, responses):
    return "0.5"


def one_short(prompts, responses):
    return [0.0] * (len(responses) - 1)


def no_responses(prompts):
    return [0.0] * len(prompts)


@pytest.mark.parametrize("fn, match", [
    (returns_text, r"reward function .*returns_text must return a tensor or a list of numbers.*got str"),
    (one_short, r"reward function .*one_short must return one score per response \(2\), got 1"),
    (no_responses, r"reward function .*no_responses must accept \(prompts, responses\)"),
])
def test_broken_reward_functions_are_named(make_lm, tokenizer, fn, match):
    ctx = make_ppo_context(make_lm(), tokenizer, PPOConfig(batch_size=1, group_size=2, algorithm="grpo",
                                                           max_new_tokens=3))
    ro = rollout(ctx, ["ab:"])
    with pytest.raises(ValueError, match=match):
        score(ctx, ro, fn)
