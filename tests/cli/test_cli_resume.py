"""--resume continues exactly: the same next batches, the same losses, the same final weights as an
uninterrupted run, after a crash between checkpoints."""

import dataclasses

import pytest
import torch
import yaml
from .cli_helpers import EXAMPLES
from safetensors.torch import load_file

import rftengine.cli.run
from rftengine import checkpoint as ckpt
from rftengine.cli import main
from rftengine.methods import loop
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
    "rlaif": ["train.batch_size=2", "train.group_size=2", "train.max_new_tokens=4", "train.dpo.learning_rate=1e-3",
              "judge_options.choices=[a,b]"],
}


class Crash(RuntimeError):
    pass


def run(method, model_dir, out, *, crash_at=None, resume=False):
    """Train, recording every batch's example indices; optionally crash when step `crash_at` ends."""
    batches = []
    original = loop.batch_indices
    log = rftengine.cli.run.Run.callback

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
        mp.setattr(loop, "batch_indices", spy)  # the one place every trainer draws batches
        mp.setattr(rftengine.cli.run.Run, "callback", callback)
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


# --- issue 10 items 12 and 13: branching from an older checkpoint, settings changed on resume ---


def dpo_argv(model_dir, out, *extra):
    return ["train", str(EXAMPLES / "dpo.yaml"), f"model={model_dir}", f"output_dir={out}", "progress=false",
            "plot=false", "export=false", "tensorboard=false", "keep_last=10", "train.save_every=1",
            "train.lr_scheduler=constant", *FAST["dpo"], *extra]


def crash_after(step):
    log = rftengine.cli.run.Run.callback

    def callback(self, at, metrics):
        if at == step:
            raise Crash(f"simulated crash after step {at}")
        log(self, at, metrics)

    return callback


def test_resume_from_an_older_checkpoint_starts_a_branch(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(EXAMPLES.parent)
    out = tmp_path / "out"
    assert main(dpo_argv(tiny_model_dir, out, "train.max_steps=4")) == 0
    (out / "checkpoint-3" / "sentinel").write_text("the abandoned run's")
    capsys.readouterr()

    # The branch from checkpoint-2 crashes after its step 3, before writing its own checkpoint-3.
    with monkeypatch.context() as mp, pytest.raises(Crash):
        mp.setattr(rftengine.cli.run.Run, "callback", crash_after(3))
        main(dpo_argv(tiny_model_dir, out, "train.max_steps=4", "train.learning_rate=1e-4",
                      "--resume", str(out / "checkpoint-2")))
    console = capsys.readouterr().out
    assert "checkpoint-3, checkpoint-4 are newer than checkpoint-2" in console and "abandoned" in console
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    (moved,) = (out / "abandoned").iterdir()
    assert (moved / "checkpoint-3" / "sentinel").is_file() and (moved / "checkpoint-4" / ckpt.MARKER).is_file()
    assert [r["step"] for r in read_metrics(moved / "metrics.jsonl")] == [1, 2, 3, 4]  # the abandoned curves

    # The next plain --resume continues the new branch, never the abandoned run's checkpoint-4.
    assert main(dpo_argv(tiny_model_dir, out, "train.max_steps=4", "train.learning_rate=1e-4", "--resume")) == 0
    assert f"resuming from {out / 'checkpoint-2'} (step 2)" in capsys.readouterr().out
    assert not (out / "checkpoint-3" / "sentinel").exists()


def test_resume_applies_a_new_learning_rate_and_records_it(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(EXAMPLES.parent)
    out = tmp_path / "out"
    assert main(dpo_argv(tiny_model_dir, out, "train.max_steps=2", "train.learning_rate=1e-3")) == 0
    capsys.readouterr()
    assert main(dpo_argv(tiny_model_dir, out, "train.max_steps=3", "train.learning_rate=0.5", "--resume")) == 0
    console = capsys.readouterr().out
    assert "train.learning_rate: 0.001 -> 0.5" in console and "train.max_steps: 2 -> 3" in console
    assert [r["learning_rate"] for r in read_metrics(out / "metrics.jsonl")] == [1e-3, 1e-3, 0.5]
    for path in (out / "run_config.yaml", out / "checkpoint-3" / "run_config.yaml"):
        assert yaml.safe_load(path.read_text())["train"]["learning_rate"] == 0.5, path


def test_resume_refuses_a_change_of_meaning(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(EXAMPLES.parent)
    out = tmp_path / "out"
    assert main(dpo_argv(tiny_model_dir, out, "train.max_steps=2")) == 0
    capsys.readouterr()
    assert main(dpo_argv(tiny_model_dir, out, "train.max_steps=3", "train.beta=0.5", "--resume")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{out / 'checkpoint-2'} was trained with train.beta = 0.1, this run sets 0.5" in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]  # nothing touched


def test_run_config_is_fully_resolved(tmp_path, tiny_model_dir, monkeypatch):
    from rftengine.methods.dpo import DPOConfig

    monkeypatch.chdir(EXAMPLES.parent)
    out = tmp_path / "out"
    assert main(dpo_argv(tiny_model_dir, out, "train.max_steps=1")) == 0
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["device"] == "auto" and saved["keep_last"] == 10 and saved["judge_options"] == {}
    assert set(saved["train"]) == {f.name for f in dataclasses.fields(DPOConfig)}
    assert saved["train"]["label_smoothing"] == 0.0 and saved["train"]["max_steps"] == 1
    assert yaml.safe_load((out / "checkpoint-1" / "run_config.yaml").read_text()) == saved


def test_resolved_config_of_nested_stages():
    from rftengine.cli.resume import resolved_run_config
    from rftengine.config import RunConfig
    from rftengine.methods.cai import CAIConfig
    from rftengine.methods.sft import SFTConfig

    cfg = RunConfig(method="cai", model="m", data="d.jsonl", train={"sft": {"learning_rate": 1e-5}})
    resolved = resolved_run_config(cfg, CAIConfig.from_dict(cfg.train))
    assert set(resolved["train"]["sft"]) == {f.name for f in dataclasses.fields(SFTConfig)}
    assert resolved["train"]["sft"]["learning_rate"] == 1e-5
    yaml.safe_dump(resolved)  # plain values only
