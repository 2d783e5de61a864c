"""Precision: fp32 master weights and optimizer states with bf16/fp16 compute under autocast,
bf16 weights, dynamic loss scaling for fp16-mixed, the fp16 refusal, and the CLI setting."""

import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rftengine.cli import main
from rftengine.methods.optimization import NonFiniteStepError, clip_and_step
from rftengine.methods.precision import compute_dtype, param_dtype, resolve_precision
from rftengine.methods.train_state import TrainState
from rftengine.methods.dpo import DPOConfig, train_dpo
from rftengine.methods.sft import SFTConfig, train_sft

from ..cli.cli_helpers import save_tiny_model, write_config, write_jsonl

DATA = [{"prompt": "ab> ", "response": "banana"}, {"prompt": "xyz> ", "response": "kiwi"},
        {"prompt": "q> ", "response": "aeiou"}, {"prompt": "r> ", "response": "o"}]
PAIRS = [{"prompt": "p:", "chosen": " aeiou", "rejected": " xyz"}, {"prompt": "q:", "chosen": " oe", "rejected": " k"},
         {"prompt": "r:", "chosen": " a", "rejected": " bcd"}, {"prompt": "s:", "chosen": " ea", "rejected": " zz"}]


def record_layer_dtypes(model):
    """Dtypes of a decoder matmul's output (the first layer's MLP down-projection) in
    training-mode forwards (the residual stream itself stays fp32 under autocast)."""
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, a, out: seen.append(out.dtype) if m.training else None)
    return seen


def optimizer_state_dtypes(optimizer):
    return {t.dtype for s in optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")}


def test_defaults_and_dtypes():
    assert resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision(None, torch.device("cuda", 1)) == "bf16-mixed"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert compute_dtype("bf16-mixed") is torch.bfloat16 and param_dtype("bf16-mixed") is torch.float32
    assert compute_dtype("fp16-mixed") is torch.float16 and param_dtype("fp16-mixed") is torch.float32
    assert compute_dtype("bf16") is param_dtype("bf16") is torch.bfloat16


@pytest.mark.parametrize("precompute_ref", [True, False])
def test_bf16_mixed_keeps_fp32_master_weights_and_computes_in_bf16(make_lm, tokenizer, tmp_path, precompute_ref):
    policy = make_lm().to(torch.bfloat16)               # loaded in bf16: upcast to fp32 master weights
    seen = record_layer_dtypes(policy)
    result = train_dpo(policy, tokenizer, PAIRS, DPOConfig(
        precision="bf16-mixed", max_steps=3, batch_size=4, learning_rate=1e-3, precompute_ref=precompute_ref))
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert optimizer_state_dtypes(result.state.optimizer) == {torch.float32}
    assert seen and set(seen) == {torch.bfloat16}
    assert all(math.isfinite(v) for row in result.history for v in row.values())
    assert result.history[-1]["train/skipped_steps"] == 0
    policy.save_pretrained(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_fp16_mixed_trains_fp16_weights_with_loss_scaling(make_lm, tokenizer):
    policy = make_lm().half()                           # refused under fp32, upcast under fp16-mixed
    seen = record_layer_dtypes(policy)
    result = train_sft(policy, tokenizer, DATA, SFTConfig(precision="fp16-mixed", max_steps=2, batch_size=2,
                                                          learning_rate=1e-3))
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert optimizer_state_dtypes(result.state.optimizer) == {torch.float32}
    assert set(seen) == {torch.float16}
    assert all(math.isfinite(v) for row in result.history for v in row.values())
    assert result.history[-1]["train/loss_scale"] > 0
    saved = result.state.state_dict()["scaler"]
    assert saved["scale"] == result.history[-1]["train/loss_scale"]


def test_bf16_keeps_bf16_weights_and_fp32_upcasts(make_lm, tokenizer):
    policy = make_lm()
    result = train_sft(policy, tokenizer, DATA, SFTConfig(precision="bf16", max_steps=1, batch_size=2))
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    assert optimizer_state_dtypes(result.state.optimizer) == {torch.bfloat16}
    policy = make_lm().to(torch.bfloat16)
    train_sft(policy, tokenizer, DATA, SFTConfig(precision="fp32", max_steps=1, batch_size=2))
    assert {p.dtype for p in policy.parameters()} == {torch.float32}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fp16_weights_are_refused_outside_fp16_mixed(make_lm, tokenizer, precision):
    with pytest.raises(ValueError, match="set precision: fp16-mixed"):
        train_sft(make_lm().half(), tokenizer, DATA, SFTConfig(precision=precision, max_steps=1))


def test_invalid_precision_names_the_field():
    with pytest.raises(ValueError, match=r"SFTConfig.precision must be one of 'fp32', 'bf16-mixed', 'bf16', "
                                         r"'fp16-mixed', got 'fp8'"):
        SFTConfig(precision="fp8")


def overflowing_step(w, optimizer, scaler, state, max_skipped_steps):
    """A step whose loss is finite but whose gradient overflows (inf), as fp16 backward does."""
    x = w * 1.0
    x.register_hook(lambda g: g * float("inf"))
    scaler.scale(x.sum()).backward()
    loss = x.sum().detach()
    return clip_and_step([w], optimizer, None, None, loss=loss, state=state, scaler=scaler,
                         max_skipped_steps=max_skipped_steps)


def test_loss_scaler_overflows_count_toward_the_limit_only_below_scale_one():
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    state = TrainState("test")
    for expected_scale, consecutive in ((2.0, 0), (1.0, 0), (0.5, 1)):   # skips at scale 4, 2 are the scaler's
        overflowing_step(w, optimizer, scaler, state, max_skipped_steps=2)
        assert scaler.get_scale() == expected_scale
        assert state.extra.get("consecutive_skipped_steps", 0) == consecutive
    assert state.extra["skipped_steps"] == 3 and torch.equal(w.detach(), torch.ones(3))
    with pytest.raises(NonFiniteStepError, match="max_skipped_steps=2"):
        overflowing_step(w, optimizer, scaler, state, max_skipped_steps=2)
    # a finite step is applied with unscaled gradients and resets the run of skips
    scaler.scale((w * 2.0).sum()).backward()
    clip_and_step([w], optimizer, None, None, loss=torch.tensor(1.0), state=state, scaler=scaler)
    assert state.extra["consecutive_skipped_steps"] == 0 and not torch.equal(w.detach(), torch.ones(3))
    assert w.grad is None


def test_scaler_state_round_trips_through_the_train_state():
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    saved = TrainState("test", scaler=scaler).state_dict()
    other = TrainState("test", scaler=torch.amp.GradScaler("cpu"))
    other.load_state_dict(saved)
    assert other.scaler.get_scale() == 8.0


def test_cli_precision_is_accepted_recorded_and_checked(capsys, tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = write_config(tmp_path / "run.yaml", method="dpo", model=str(model_dir), data=str(data),
                       output_dir=str(tmp_path / "out"), plot=False, tensorboard=False, progress=False,
                       train={"max_steps": 1, "batch_size": 2})
    assert main(["train", str(cfg), "train.precision=bf16-mixed", "train.micro_batch_size=1"]) == 0
    recorded = yaml.safe_load((tmp_path / "out" / "run_config.yaml").read_text())
    assert recorded["train"]["precision"] == "bf16-mixed" and recorded["train"]["micro_batch_size"] == 1
    capsys.readouterr()
    cfg = write_config(tmp_path / "run2.yaml", method="dpo", model=str(model_dir), data=str(data),
                       output_dir=str(tmp_path / "out2"), train={"max_steps": 1, "batch_size": 2})
    assert main(["train", str(cfg), "train.precision=fp8"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "precision" in err and "'fp8'" in err


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_grpo_mixed_rolls_out_in_the_compute_dtype_and_trains_fp32_masters(make_lm, tokenizer, precision):
    from rftengine.methods.ppo import train_ppo
    from rftengine.methods.ppo_config import PPOConfig
    from rftengine.toy import vowel_fraction_reward

    policy = make_lm()
    result = train_ppo(policy, tokenizer, ["ab:", "cd:"], PPOConfig(
        algorithm="grpo", precision=precision, batch_size=2, group_size=2, max_new_tokens=3, max_steps=2,
        ppo_epochs=1, micro_batch_size=2, rollout_micro_batch_size=1, kl_coef=0.1), reward_fn=vowel_fraction_reward)
    ctx = result.context
    assert ctx.generator.dtype is compute_dtype(precision)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert {p.dtype for p in ctx.reference.model.parameters()} == {compute_dtype(precision)}
    assert all(math.isfinite(v) for v in result.history[-1].values())
    assert ("train/loss_scale" in result.history[-1]) == (precision == "fp16-mixed")


def test_bf16_mixed_resume_with_the_initial_reference_is_exact(make_lm, tokenizer):
    import copy

    config = DPOConfig(precision="bf16-mixed", max_steps=2, batch_size=2, learning_rate=1e-3,
                       precompute_ref=False, shuffle=False)
    full = train_dpo(make_lm(), tokenizer, PAIRS, config)
    first = train_dpo(make_lm(), tokenizer, PAIRS, DPOConfig(**{**vars(config), "max_steps": 1}))
    resumed_policy = copy.deepcopy(first.policy)
    # the resumed run gets the initial model in fp32, as the CLI loads it; the fresh run's
    # reference was a bf16 copy, and the resumed one must compute the same
    rest = train_dpo(resumed_policy, tokenizer, PAIRS, config, ref_model=make_lm(),
                     state=first.state.state_dict())
    assert rest.history[-1]["loss"] == full.history[-1]["loss"]
