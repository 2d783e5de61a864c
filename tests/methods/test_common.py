"""Config parsing, the deterministic data order and TrainState round trips."""

import pytest
import torch

from rftengine.methods.common import (
    TrainState,
    batch_indices,
    config_from_dict,
    config_to_dict,
    make_optimizer,
    make_scheduler,
    make_train_state,
    optimizer_step,
    stage_state,
    train_loop,
    unwrap_stage_state,
)
from rftengine.methods.dpo import DPOConfig
from rftengine.methods.ppo import PPOConfig
from rftengine.methods.reward import RewardConfig


@pytest.mark.parametrize("cls", [RewardConfig, PPOConfig, DPOConfig])
def test_unknown_key_suggests_closest(cls):
    with pytest.raises(ValueError, match=r"unknown \w+Config key 'learning_rat'.*did you mean 'learning_rate'"):
        cls.from_dict({"learning_rat": 1e-5})


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ValueError, match="valid keys: .*learning_rate"):
        RewardConfig.from_dict({"zzzzzz": 1})


def test_from_dict_roundtrip_and_validation():
    cfg = PPOConfig.from_dict({"algorithm": "grpo", "group_size": 4, "adam_betas": [0.9, 0.95]})
    assert cfg.kl_estimator == "k3" and cfg.kl_in_loss is True and cfg.adam_betas == (0.9, 0.95)
    assert PPOConfig.from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="RewardConfig.learning_rate must be > 0"):
        config_from_dict(RewardConfig, {"learning_rate": 0})
    with pytest.raises(ValueError, match="lr_scheduler must be one of"):
        RewardConfig(lr_scheduler="step")
    with pytest.raises(ValueError, match="expects a mapping"):
        RewardConfig.from_dict([("learning_rate", 1.0)])


def test_batch_indices_cover_each_epoch_and_resume_anywhere():
    n, bs, seed = 7, 3, 5
    position, seen = 0, []
    for _ in range(7):  # 21 examples = exactly 3 epochs
        seen.extend(batch_indices(n, bs, position, seed))
        position += bs
    for epoch in range(3):
        assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert seen[:n] != seen[n:2 * n]  # a new order each epoch
    assert batch_indices(n, bs, 9, seed) == seen[9:12]  # pure function of the position
    assert batch_indices(n, bs, 0, seed, shuffle=False) == [0, 1, 2]


def test_train_state_roundtrip_restores_optimizer_modules_and_rng():
    torch.manual_seed(0)
    model, head = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    cfg = RewardConfig(learning_rate=0.1, warmup_steps=2)
    opt = make_optimizer(list(model.parameters()) + list(head.parameters()), cfg)
    sched = make_scheduler(opt, cfg, 10)
    state = TrainState("reward", step=3, data_position=12, model=model, optimizer=opt, scheduler=sched,
                       modules={"head": head}, extra={"kl_coef": 0.2})
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    saved = state.state_dict()
    expected_draw = torch.rand(3)

    head2 = torch.nn.Linear(2, 1)
    opt2 = make_optimizer(list(torch.nn.Linear(3, 2).parameters()) + list(head2.parameters()), cfg)
    sched2 = make_scheduler(opt2, cfg, 10)
    fresh = TrainState("reward", optimizer=opt2, scheduler=sched2, modules={"head": head2})
    fresh.load_state_dict(saved)
    assert (fresh.step, fresh.data_position, fresh.extra) == (3, 12, {"kl_coef": 0.2})
    torch.testing.assert_close(head2.weight, head.weight)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored to the save point
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_train_state_rejects_another_method():
    state = TrainState("dpo")
    with pytest.raises(ValueError, match="checkpoint state is from method 'ppo', but this run is 'dpo'"):
        state.load_state_dict(TrainState("ppo").state_dict())


def test_scheduler_warmup_then_linear_decay():
    cfg = RewardConfig(learning_rate=1.0, warmup_steps=1, lr_scheduler="linear")
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched = make_scheduler(opt, cfg, 5)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # transformers' warmup factor is step / warmup_steps (0 at the first step), then linear decay
    assert lrs == pytest.approx([0.0, 1.0, 0.75, 0.5, 0.25])


def test_train_loop_runs_resumable_steps_with_callback_checkpoints_and_bar(capsys, terminal):
    """Batches are drawn at the data position; the step counts once per run_step (also when
    run_step advanced it itself); checkpoints every save_every and at the end."""
    cfg = RewardConfig(batch_size=3, max_steps=4, save_every=3, seed=5)
    state = TrainState("reward")
    seen, calls, saved = [], [], []

    def run_step(idx):
        seen.append(idx)
        state.step += len(seen) % 2          # like ppo.step on odd calls: must not double count
        return {"loss": float(len(seen))}

    history = train_loop(state, cfg, 4, 7, run_step, callback=lambda s, m: calls.append((s, m["loss"])),
                         checkpoint_fn=lambda s: saved.append(s.step), progress=True, desc="toy loop",
                         postfix={"loss": "loss"})
    assert seen == [batch_indices(7, 3, 3 * i, 5) for i in range(4)]
    assert calls == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)] and history == [{"loss": x} for x in (1.0, 2.0, 3.0, 4.0)]
    assert saved == [3, 4] and (state.step, state.data_position) == (4, 12)
    assert "toy loop" in capsys.readouterr().err
    assert train_loop(state, cfg, 4, 7, run_step) == []          # nothing left to run


def test_optimizer_step_and_train_state_from_config():
    cfg = RewardConfig(learning_rate=0.5, max_grad_norm=1.0, warmup_steps=1)
    model = torch.nn.Linear(2, 1, bias=False)
    state = make_train_state("reward", model, cfg, 4)
    assert state.optimizer.param_groups[0]["lr"] == 0.0       # warmup: transformers' step / warmup_steps
    loss = (model(torch.ones(1, 2)) * 10).sum()
    metrics = optimizer_step(loss, {"loss": loss.detach()}, state.optimizer, state.scheduler, cfg.max_grad_norm)
    assert set(metrics) == {"loss", "grad_norm", "learning_rate", "train/skipped_steps"}
    assert metrics["learning_rate"] == pytest.approx(0.5) and metrics["train/skipped_steps"] == 0
    assert metrics["grad_norm"] == pytest.approx(10 * 2 ** 0.5, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())
    resumed = make_train_state("reward", torch.nn.Linear(2, 1, bias=False), cfg, 4, state.state_dict())
    assert resumed.optimizer.state_dict()["state"].keys() == state.optimizer.state_dict()["state"].keys()


def test_stage_state_round_trip():
    sub = TrainState("dpo", step=2, data_position=6, extra={"ref_logps": 1})
    outer = stage_state("cai", sub, offset=5, cai_examples=[])
    assert outer.method == "cai" and outer.step == 7 and outer.extra["stage"] == "dpo"
    inner, offset = unwrap_stage_state("cai", outer.state_dict())
    assert offset == 5 and inner["method"] == "dpo" and inner["step"] == 2
    assert inner["extra"] == {"ref_logps": 1, "cai_examples": []}
    with pytest.raises(ValueError, match="from method 'cai', but this run is 'rlaif'"):
        unwrap_stage_state("rlaif", outer)
