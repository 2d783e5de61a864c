"""--resume continues exactly: the same next batches, the same losses, the same final weights as an
uninterrupted run, after a crash between checkpoints."""

import pytest
import torch
from .cli_helpers import EXAMPLES
from safetensors.torch import load_file

import rftengine.cli
from rftengine.cli import main
from rftengine.methods import common
from rftengine.metrics import read_metrics

STEPS, CRASH_AT = 4, 3  # checkpoints after step 2 (and 4); the crash loses step 3

FAST = {
    "dpo": ["train.batch_size=3", "train.max_prompt_length=32", "train.max_response_length=16",
            "train.learning_rate=1e-3"],
    "ppo": ["train.batch_size=2", "train.max_new_tokens=4", "train.ppo_epochs=1", "train.minibatch_size=1",
            "train.learning_rate=1e-3", "train.adaptive_kl=true", "train.lr_scheduler=linear",
            "reward=rftengine.toy:vowel_fraction_reward"],
    "reward": ["train.batch_size=3", "train.max_prompt_length=32", "train.max_response_length=16",
               "train.learning_rate=1e-3"],
    "cai": ["train.max_new_tokens=4", "train.critique_max_new_tokens=4", "train.max_prompt_length=24",
            "train.max_context_length=48", "train.sft.max_steps=1", "train.sft.batch_size=4",
            "train.dpo.max_steps=3", "train.dpo.batch_size=3", "train.dpo.learning_rate=1e-3", "train.dpo.save_every=1"],
    "rlaif": ["train.batch_size=2", "train.num_samples=2", "train.max_new_tokens=4", "train.dpo.learning_rate=1e-3",
              "judge_options.choices=[a,b]"],
}


class Crash(RuntimeError):
    pass


def run(method, model_dir, out, *, crash_at=None, resume=False):
    """Train, recording every batch's example indices; optionally crash when step `crash_at` ends."""
    batches = []
    original = common.batch_indices
    log = rftengine.cli.Run.callback

    def spy(*args, **kwargs):
        batches.append(original(*args, **kwargs))
        return batches[-1]

    def callback(self, step, metrics):
        if step == crash_at:
            raise Crash(f"simulated crash after step {step}")
        log(self, step, metrics)

    argv = ["train", str(EXAMPLES / f"{method}.yaml"), f"model={model_dir}", f"output_dir={out}",
            "progress=false", *FAST[method]]
    if method != "cai":  # cai: 1 SFT step then 3 DPO steps, a checkpoint after each
        argv += [f"train.max_steps={STEPS}", "train.save_every=2"]
    if method == "rlaif":
        argv.append(f"judge={model_dir}")
    if resume:
        argv.append("--resume")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "batch_indices", spy)  # the one place every trainer draws batches
        mp.setattr(rftengine.cli.Run, "callback", callback)
        if crash_at is not None:
            with pytest.raises(Crash):
                main(argv)
        else:
            assert main(argv) == 0
    return batches


@pytest.mark.parametrize("method", ["dpo", "ppo", "reward", "rlaif", "cai"])
def test_resume_is_exact(method, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    full = run(method, tiny_model_dir, tmp_path / "full")
    crashed = run(method, tiny_model_dir, tmp_path / "resumed", crash_at=CRASH_AT)
    assert crashed == full[:CRASH_AT]
    resumed = run(method, tiny_model_dir, tmp_path / "resumed", resume=True)
    assert resumed == full[2:]  # the same next batches

    rows_full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    rows_resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in rows_resumed] == [1, 2, 3, 4]
    assert rows_resumed == rows_full  # every metric, the losses included, bit for bit

    files = sorted(p.name for p in (tmp_path / "full" / "final").glob("*.safetensors"))
    assert "model.safetensors" in files  # plus value_head.safetensors for the reward model
    for name in files:
        a = load_file(tmp_path / "full" / "final" / name)
        b = load_file(tmp_path / "resumed" / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert rows_full[2]["loss"] != rows_full[3]["loss"]  # training moved: the comparison means something
