"""`rftengine train` under torchrun, 2 ranks on gloo (CPU), against the same run in one process:
the same global batch gives the same losses and the same final weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rftengine.metrics import read_metrics

from ..cli.cli_helpers import EXAMPLES
from .launch import REPO, run_torchrun, torch_env

FAST = {
    "reward": ["train.batch_size=4", "train.max_prompt_length=32", "train.max_response_length=16",
               "train.learning_rate=1e-3", "train.center_coef=0.1"],  # the head bias gets a gradient
    "dpo": ["train.batch_size=4", "train.max_prompt_length=32", "train.max_response_length=16",
            "train.learning_rate=1e-3", "train.beta=0.5"],
    "grpo": ["train.batch_size=2", "train.group_size=2", "train.max_new_tokens=6", "train.learning_rate=1e-3",
             "train.max_prompt_length=24"],
}
STEPS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # Two layers: one FSDP unit each, plus the root (embeddings, norm, head).
    from rftengine.toy import char_tokenizer, tiny_causal_lm

    path = tmp_path_factory.mktemp("tiny2") / "model"
    tok = char_tokenizer()
    model = tiny_causal_lm(len(tok), seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train_args(method: str, model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(EXAMPLES / f"{method}.yaml"), f"model={model_dir}", f"output_dir={out}",
            f"train.max_steps={STEPS}", "train.save_every=1", "device=cpu", "progress=false", "plot=false",
            "tensorboard=false", *FAST[method], *extra]


def run_cli(nproc: int, args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    if nproc == 1:
        proc = subprocess.run([sys.executable, "-m", "rftengine", *args], cwd=cwd, env=torch_env(),
                              capture_output=True, text=True, timeout=240)
    else:
        proc = run_torchrun(["-m", "rftengine", *args], nproc=nproc, cwd=cwd)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def weights(final: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(final.glob("*.safetensors")):
        out.update({f"{file.stem}/{k}": v for k, v in load_file(file).items()})
    return out


def assert_same_run(one: Path, two: Path, keys=("loss",)) -> None:
    rows1, rows2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in rows2] == list(range(1, STEPS + 1))  # each step once, not once per rank
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2]
    for r1, r2 in zip(rows1, rows2):
        assert set(r1) == set(r2)
        for key in keys:
            assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-7), (r1["step"], key)
    w1, w2 = weights(one / "final"), weights(two / "final")
    assert w1.keys() == w2.keys() and w1
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("method, keys", [
    ("dpo", ("loss", "rewards/accuracies", "rewards/margins", "grad_norm")),
    ("reward", ("loss", "accuracy", "rewards/margins", "grad_norm")),
])
def test_two_ranks_equal_one_process(tmp_path, model_dir, method, keys):
    run_cli(1, train_args(method, model_dir, tmp_path / "one"))
    proc = run_cli(2, train_args(method, model_dir, tmp_path / "two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", keys)
    marker = json.loads((tmp_path / "two" / f"checkpoint-{STEPS}" / "rftengine_checkpoint.json").read_text())
    assert marker["world_size"] == 2
    assert proc.stdout.count("rftengine train: done") == 1  # rank 0 alone prints


@pytest.fixture(scope="module")
def grpo_two_ranks(tmp_path_factory, model_dir) -> Path:
    """An uninterrupted 2-rank GRPO run of STEPS steps, checkpointed every step."""
    out = tmp_path_factory.mktemp("grpo") / "two"
    run_cli(2, train_args("grpo", model_dir, out))
    return out


@pytest.mark.slow
def test_grpo_two_ranks(grpo_two_ranks):
    """Each rank samples whole groups for its prompts with its own Generator over the gathered
    weights (its own noise: the samples depend on the world size, so no equality with one
    process here); rank 0 logs each step once and exports a model that from_pretrained loads."""
    from transformers import AutoModelForCausalLM

    rows = read_metrics(grpo_two_ranks / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor([r["loss"], r["reward/mean"], r["grad_norm"]])).all() for r in rows)
    model = AutoModelForCausalLM.from_pretrained(grpo_two_ranks / "final")
    assert type(model).__name__ == "Qwen2ForCausalLM"


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tmp_path, model_dir, grpo_two_ranks):
    """A 2-rank run killed with SIGKILL (launcher and ranks at once) after its first sharded
    checkpoint, then resumed on 2 ranks, logs and ends exactly as the uninterrupted run."""
    import os
    import signal
    import time

    from rftengine.checkpoint import list_checkpoints

    from .launch import torchrun_command

    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun_command(["-m", "rftengine", *train_args("grpo", model_dir, out)]), cwd=REPO,
                            env=torch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list_checkpoints(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = list_checkpoints(out)
    assert done and int(done[-1].name.split("-")[1]) < STEPS, "the run must be killed mid-run"
    run_cli(2, [*train_args("grpo", model_dir, out), "--resume"])
    rows, expected = read_metrics(out / "metrics.jsonl"), read_metrics(grpo_two_ranks / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r, e in zip(rows, expected):
        assert r.keys() == e.keys()
        for key in r:
            assert r[key] == pytest.approx(e[key], rel=1e-6, abs=1e-9), (r["step"], key)
    w1, w2 = weights(grpo_two_ranks / "final"), weights(out / "final")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.slow
def test_batch_size_must_divide_by_the_world_size(tmp_path, model_dir):
    proc = run_torchrun(["-m", "rftengine", *train_args("dpo", model_dir, tmp_path / "o"), "train.batch_size=3"])
    assert proc.returncode != 0
    assert "batch_size must be a multiple of the world size 2" in proc.stderr and "got 3" in proc.stderr
    assert "rftengine train: error:" in proc.stderr  # the one-line message (torchrun adds its own report)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_in_one_process(tmp_path, model_dir):
    """A 2-rank DPO checkpoint resumed by one process (the shards resharded by
    torch.distributed.checkpoint) continues exactly as the one-process run of the same batch."""
    run_cli(1, train_args("dpo", model_dir, tmp_path / "one"))
    run_cli(2, [*train_args("dpo", model_dir, tmp_path / "two"), f"train.max_steps={STEPS - 1}"])
    run_cli(1, [*train_args("dpo", model_dir, tmp_path / "two"), "--resume"])
    assert_same_run(tmp_path / "one", tmp_path / "two", ("loss", "rewards/margins", "grad_norm"))


@pytest.mark.slow
def test_one_process_checkpoint_is_refused_under_torchrun(tmp_path, model_dir):
    run_cli(1, [*train_args("dpo", model_dir, tmp_path / "o"), "train.max_steps=1"])
    proc = run_torchrun(["-m", "rftengine", *train_args("dpo", model_dir, tmp_path / "o"), "--resume"])
    assert proc.returncode != 0
    assert "was written by one process; resume it without torchrun" in proc.stderr


@pytest.mark.slow
def test_bf16_mixed_keeps_fp32_master_weights_and_optimizer_states(tmp_path, model_dir):
    """Under FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 reduction) the sharded weights and
    AdamW states written to the checkpoint stay fp32, and the run and its export are finite."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = tmp_path / "bf16"
    run_cli(2, [*train_args("dpo", model_dir, out), "train.precision=bf16-mixed"])
    meta = FileSystemReader(str(out / f"checkpoint-{STEPS}" / "shards")).read_metadata().state_dict_metadata
    tensors = {k: m.properties.dtype for k, m in meta.items() if isinstance(m, TensorStorageMetadata)}
    weights_ = [k for k in tensors if k.startswith("model.")]
    moments = [k for k in tensors if k.startswith("optimizer.state.") and k.endswith(("exp_avg", "exp_avg_sq"))]
    assert weights_ and moments
    assert {tensors[k] for k in weights_ + moments} == {torch.float32}
    final = weights(out / "final")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in final.values())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(out / "metrics.jsonl"))


@pytest.mark.slow
def test_sigterm_stops_every_rank_after_the_same_step(tmp_path, model_dir):
    """torchrun forwards SIGTERM to every rank: they agree on the step to stop after, write one
    sharded checkpoint of it together, and rank 0 alone says how to resume."""
    import signal
    import time

    from rftengine.checkpoint import list_checkpoints, load_checkpoint

    from .launch import torchrun_command

    out = tmp_path / "stopped"
    args = [*train_args("grpo", model_dir, out), "train.max_steps=400", "train.save_every=0"]
    proc = subprocess.Popen(torchrun_command(["-m", "rftengine", *args]), cwd=REPO, env=torch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().count("\n") >= 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the launcher, which signals its ranks
    _, err = proc.communicate(timeout=120)
    (saved,) = list_checkpoints(out)
    step = load_checkpoint(saved, "grpo").step
    assert 2 <= step < 400
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, step + 1))
    assert err.count("SIGTERM received") == 1 and err.count("resume with:") == 1
    assert f"checkpoint written: {saved}" in err and "torchrun [the same launch options: 2 ranks]" in err
