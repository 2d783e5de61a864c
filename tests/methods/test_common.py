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
    assert lrs == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.25])
