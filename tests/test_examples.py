"""Every config in examples/ trains for a few steps through `rftengine train`, as a user runs it
from the repository root after `rftengine toy-model models/sft` (and `--judge` for RLAIF; PPO
reads the reward model that examples/reward.yaml writes to runs/reward/final)."""

import os
from pathlib import Path

import pytest
import yaml

from rftengine.cli import main
from rftengine.metrics import read_metrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
STEPS = 2

# Smaller batches and shorter answers per method, so each example takes a few seconds; the
# example's own settings are used otherwise. An example of a new method gets only max_steps.
TINY = {
    "reward": ["train.batch_size=4"],
    "dpo": ["train.batch_size=4"],
    "ppo": ["train.batch_size=2", "train.max_new_tokens=6", "train.ppo_epochs=1", "train.minibatch_size=2"],
    "grpo": ["train.batch_size=2", "train.group_size=2", "train.max_new_tokens=6"],
    "rloo": ["train.batch_size=2", "train.group_size=2", "train.max_new_tokens=6"],
    "rlaif": ["train.batch_size=2", "train.group_size=2", "train.max_new_tokens=6"],
    # CAI's length is its stages': one SFT step, then one DPO step.
    "cai": ["train.max_new_tokens=6", "train.critique_max_new_tokens=4", "train.sft.max_steps=1",
            "train.sft.batch_size=4", "train.dpo.max_steps=1", "train.dpo.batch_size=4"],
}


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A stand-in for the repository root: examples/ linked in, models/sft and models/judge
    written by the toy-model command (a few SFT steps: the weights need not be good here), and
    runs/reward/final, a reward model as examples/reward.yaml leaves it."""
    from rftengine.methods.modeling import load_causal_lm, load_tokenizer
    from rftengine.methods.reward import as_reward_model

    root = tmp_path_factory.mktemp("repo")
    (root / "examples").symlink_to(EXAMPLES, target_is_directory=True)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["toy-model", "models/sft", "--steps", "3"]) == 0
        assert main(["toy-model", "models/judge", "--judge", "--steps", "3"]) == 0
    finally:
        os.chdir(cwd)
    sft = root / "models" / "sft"
    as_reward_model(load_causal_lm(sft)).save_pretrained(root / "runs" / "reward" / "final", load_tokenizer(sft))
    return root


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_example_trains_from_the_toy_model(config, toy_root, tmp_path, monkeypatch):
    from rftengine.methods.modeling import RewardModel, load_causal_lm

    method = yaml.safe_load(config.read_text())["method"]
    monkeypatch.chdir(toy_root)
    out = tmp_path / config.stem
    steps = [f"train.max_steps={STEPS}"] if method != "cai" else []
    argv = ["train", f"examples/{config.name}", f"output_dir={out}", "progress=false", "plot=false",
            *steps, *TINY.get(method, [])]
    assert main(argv) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, STEPS + 1))
    final = out / "final"
    model = RewardModel.from_pretrained(final) if method == "reward" else load_causal_lm(final)
    assert sum(p.numel() for p in model.parameters()) > 0
