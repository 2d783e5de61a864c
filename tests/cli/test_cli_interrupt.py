"""Ctrl-C and SIGTERM: the step in progress finishes, a checkpoint is written, the exit status
says which signal (130, 143), the message gives the exact command that resumes, and resuming
gives what an uninterrupted run gives."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import rftengine.cli.run
from rftengine import checkpoint as ckpt
from rftengine.cli import main
from rftengine.cli.interrupt import stop_on_signals
from rftengine.methods.loop import STOP
from rftengine.metrics import read_metrics

from .cli_helpers import EXAMPLES

FAST = ["train.batch_size=2", "train.max_prompt_length=16", "train.max_response_length=8", "train.learning_rate=1e-3",
        "train.lr_scheduler=constant"]


def dpo_argv(model_dir, out, *extra):
    return ["train", str(EXAMPLES / "dpo.yaml"), f"model={model_dir}", f"output_dir={out}", "progress=false",
            "plot=false", "export=false", "tensorboard=false", "train.save_every=0", *FAST, *extra]


def steps_logged(out) -> int:
    path = out / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}")) if path.is_file() else 0


def interrupt(proc, out, sig) -> str:
    """Wait for step 3 in `out`'s metrics, send `sig`, return the process's stderr."""
    try:
        deadline = time.monotonic() + 180
        while steps_logged(out) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(sig)
        return proc.communicate(timeout=120)[1]
    finally:
        proc.kill()


@pytest.mark.slow
def test_signals_checkpoint_the_step_reached(tmp_path, tiny_model_dir, monkeypatch):
    """A real `rftengine train` process per signal (started together: the start-up dominates)."""
    monkeypatch.chdir(EXAMPLES.parent)
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / signal.Signals(sig).name
        argv = dpo_argv(tiny_model_dir, out, "train.max_steps=100000")
        proc = subprocess.Popen([sys.executable, "-m", "rftengine.cli", *argv], cwd=EXAMPLES.parent,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[sig] = proc, out, argv
    for sig, (proc, out, argv) in runs.items():
        err = interrupt(proc, out, sig)
        assert proc.returncode == 128 + sig, err
        assert "Traceback" not in err
        step = read_metrics(out / "metrics.jsonl")[-1]["step"]
        assert step >= 3 and [p.name for p in ckpt.list_checkpoints(out)] == [f"checkpoint-{step}"]
        name = signal.Signals(sig).name
        assert f"stopped by {name} after step {step}; checkpoint written: {out / f'checkpoint-{step}'}" in err
        command = err.split("resume with: ", 1)[1].splitlines()[0]
        assert shlex.split(command) == ["rftengine", *argv, "--resume"]

    # The printed command, run to two steps past the interruption, gives the uninterrupted run's
    # weights and every metric bit for bit.
    proc, out, argv = runs[signal.SIGINT]
    step = read_metrics(out / "metrics.jsonl")[-1]["step"]
    command = shlex.join(["rftengine", *argv, "--resume"])
    assert main([*shlex.split(command)[1:], f"train.max_steps={step + 2}"]) == 0
    full = tmp_path / "full"
    assert main(dpo_argv(tiny_model_dir, full, f"train.max_steps={step + 2}")) == 0
    assert read_metrics(out / "metrics.jsonl") == read_metrics(full / "metrics.jsonl")
    a = load_file(out / f"checkpoint-{step + 2}" / "model.safetensors")
    b = load_file(full / f"checkpoint-{step + 2}" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_second_signal_aborts_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), stop_on_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        assert STOP.signum == signal.SIGINT  # the first only asks the loop to stop
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert STOP.signum is None


def test_stop_leaves_a_multi_stage_run(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """CAI's SFT stage is stopped after its first step: no later stage starts, exit 130."""
    monkeypatch.chdir(EXAMPLES.parent)
    log = rftengine.cli.run.Run.callback

    def callback(self, step, metrics):
        log(self, step, metrics)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(rftengine.cli.run.Run, "callback", callback)
    out = tmp_path / "cai"
    argv = ["train", str(EXAMPLES / "cai.yaml"), f"model={tiny_model_dir}", f"output_dir={out}", "progress=false",
            "plot=false", "tensorboard=false", "train.max_new_tokens=4", "train.critique_max_new_tokens=4",
            "train.max_prompt_length=24", "train.max_context_length=48", "train.sft.max_steps=2",
            "train.sft.batch_size=4", "train.dpo.max_steps=2", "train.dpo.batch_size=3"]
    assert main(argv) == 130
    assert "stopped by SIGINT after step 1" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    assert not (out / "final").exists()
