"""The LR schedule, the optimizer step and the TrainState built from a config."""

import pytest
import torch

from rftengine.methods.optimization import make_optimizer, make_scheduler, make_train_state, optimizer_step
from rftengine.methods.reward import RewardConfig


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
