"""TrainState round trips (optimizer, modules, RNG), the method check, the stage view."""

import pytest
import torch

from rftengine.methods.optimization import make_optimizer, make_scheduler
from rftengine.methods.reward import RewardConfig
from rftengine.methods.train_state import TrainState, stage_state, unwrap_stage_state


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


def test_stage_state_round_trip():
    sub = TrainState("dpo", step=2, data_position=6, extra={"ref_logps": 1})
    outer = stage_state("cai", sub, offset=5, cai_examples=[])
    assert outer.method == "cai" and outer.step == 7 and outer.extra["stage"] == "dpo"
    inner, offset = unwrap_stage_state("cai", outer.state_dict())
    assert offset == 5 and inner["method"] == "dpo" and inner["step"] == 2
    assert inner["extra"] == {"ref_logps": 1, "cai_examples": []}
    with pytest.raises(ValueError, match="from method 'cai', but this run is 'rlaif'"):
        unwrap_stage_state("rlaif", outer)
