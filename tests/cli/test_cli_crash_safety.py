"""What a crash, a damaged checkpoint or a full disk leaves behind, seen through `rftengine train`:
--resume skips what does not load (and says so), an explicit checkpoint that does not load is a
one-line error, a full disk keeps the previous checkpoints, the CAI stage reference is on disk once."""

import errno

import pytest
import torch

from rftengine import checkpoint as ckpt
from rftengine.cli import main
from rftengine.metrics import read_metrics

from . import test_cli_resume
from .cli_helpers import EXAMPLES

DPO = ["train.batch_size=3", "train.max_prompt_length=32", "train.max_response_length=16",
       "train.learning_rate=1e-3", "train.max_steps=3", "train.save_every=1", "keep_last=3", "progress=false"]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)  # the examples' paths are relative to the repository root


def dpo(model_dir, out, *extra):
    return main(["train", str(EXAMPLES / "dpo.yaml"), f"model={model_dir}", f"output_dir={out}", *DPO, *extra])


def test_resume_skips_a_damaged_checkpoint_and_a_torn_metrics_line(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    assert dpo(tiny_model_dir, out) == 0
    rows = read_metrics(out / "metrics.jsonl")
    state = out / "checkpoint-3" / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])          # a torn write of the newest checkpoint
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.')                 # and of the metrics
    capsys.readouterr()
    assert dpo(tiny_model_dir, out, "--resume") == 0
    err = capsys.readouterr().err
    assert "skipping" in err and str(out / "checkpoint-3") in err and ckpt.STATE_FILE in err, err
    assert "Traceback" not in err
    assert read_metrics(out / "metrics.jsonl") == rows     # step 3 again, the same numbers
    ckpt.load_checkpoint(out / "checkpoint-3", "dpo")      # rewritten whole


def test_explicit_damaged_checkpoint_is_a_one_line_error(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    assert dpo(tiny_model_dir, out, "train.max_steps=1") == 0
    weights = out / "checkpoint-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    assert dpo(tiny_model_dir, out, "--resume", str(out / "checkpoint-1")) == 1
    err = capsys.readouterr().err
    assert err.startswith("rftengine train: error: ") and "Traceback" not in err
    assert str(weights) in err and len(err.strip().splitlines()) == 1, err


def test_disk_full_during_a_checkpoint(tmp_path, tiny_model_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    real = ckpt.save_model_dir
    calls = []

    def fills_up(path, model, tokenizer):
        calls.append(path)
        real(path, model, tokenizer)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path / "model.safetensors"))

    monkeypatch.setattr(ckpt, "save_model_dir", fills_up)
    assert dpo(tiny_model_dir, out, "keep_last=2") == 1
    err = capsys.readouterr().err
    assert err.startswith("rftengine train: error: ") and "Traceback" not in err
    assert "no space left on device" in err and str(out) in err, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not list(out.glob(".tmp-*"))


def test_cai_stage_reference_is_stored_once_and_resume_stays_exact(tmp_path, tiny_model_dir, monkeypatch):
    """CAI's DPO stage with a live reference (precompute_ref=false): the reference weights are a
    safetensors file linked from checkpoint to checkpoint, not a pickle in every trainer_state."""
    fast = test_cli_resume.FAST["cai"] + ["train.dpo.precompute_ref=false"]
    monkeypatch.setitem(test_cli_resume.FAST, "cai", fast)
    test_cli_resume.test_resume_is_exact("cai", tmp_path, tiny_model_dir, monkeypatch)
    for run in ("full", "resumed"):
        dpo_ckpts = ckpt.list_checkpoints(tmp_path / run)
        assert [p.name for p in dpo_ckpts] == ["checkpoint-3", "checkpoint-4"]
        inodes = {(p / "stage_reference.safetensors").stat().st_ino for p in dpo_ckpts}
        assert len(inodes) == 1, run
        payload = torch.load(dpo_ckpts[-1] / ckpt.STATE_FILE, weights_only=True)
        assert payload["state"]["extra"]["stage_reference"]["file"] == "stage_reference.safetensors"


def test_truncated_model_weights_are_a_one_line_error(tmp_path, tiny_model_dir, capsys):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    assert dpo(model, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.startswith("rftengine train: error: ") and "Traceback" not in err
    assert str(weights) in err and "truncated" in err, err
