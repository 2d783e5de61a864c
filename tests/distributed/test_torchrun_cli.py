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
    "ppo": ["reward=rftengine.toy:vowel_fraction_reward", "train.batch_size=4", "train.max_new_tokens=6",
            "train.max_prompt_length=24", "train.learning_rate=1e-3", "train.ppo_epochs=1", "train.minibatch_size=4",
            "train.adaptive_kl=true", "train.kl_coef=0.1", "train.vf_coef=0.5"],
}
FAST["dpo_lora"] = [*FAST["dpo"], "lora.r=4", "lora.alpha=8", "train.learning_rate=1e-2"]
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
            # rewards/margins: β times a difference of summed log-probs, whose rounding is absolute
            tol = 1e-6 if key == "rewards/margins" else 1e-7
            assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=tol), (r1["step"], key)
    w1, w2 = weights(one / "final"), weights(two / "final")
    assert w1.keys() == w2.keys() and w1
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("method, keys", [
    ("dpo", ("loss", "rewards/accuracies", "rewards/margins", "grad_norm")),
    ("reward", ("loss", "accuracy", "rewards/margins", "grad_norm")),
    # LoRA: the adapters train inside their layers' FSDP units, the base frozen; the reference
    # is the policy with its adapters off; the export merges the adapters (merge_lora: true)
    ("dpo_lora", ("loss", "rewards/accuracies", "rewards/margins", "grad_norm")),
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
    weights; rank 0 logs each step once and exports a model that from_pretrained loads (equality
    with one process: tests/distributed/test_grpo_equal.py)."""
    from transformers import AutoModelForCausalLM

    rows = read_metrics(grpo_two_ranks / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor([r["loss"], r["reward"], r["grad_norm"]])).all() for r in rows)
    model = AutoModelForCausalLM.from_pretrained(grpo_two_ranks / "final")
    assert type(model).__name__ == "Qwen2ForCausalLM"


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tmp_path, model_dir, grpo_two_ranks):
    """A 2-rank run killed with SIGKILL (launcher and ranks at once) after its first sharded
    checkpoint, then resumed on 2 ranks, logs and ends exactly as the uninterrupted run."""
    out = tmp_path / "killed"
    kill_and_resume(train_args("grpo", model_dir, out), out)
    assert_same_as_uninterrupted(out, grpo_two_ranks)


def kill_and_resume(args: list[str], out: Path) -> None:
    """Run `rftengine *args` on 2 ranks, SIGKILL launcher and ranks at once after its first
    sharded checkpoint, then resume it on 2 ranks to the end."""
    import os
    import signal
    import time

    from rftengine.checkpoint import list_checkpoints

    from .launch import torchrun_command

    proc = subprocess.Popen(torchrun_command(["-m", "rftengine", *args]), cwd=REPO, env=torch_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list_checkpoints(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = list_checkpoints(out)
    assert done and int(done[-1].name.split("-")[1]) < STEPS, "the run must be killed mid-run"
    run_cli(2, [*args, "--resume"])


def assert_same_as_uninterrupted(out: Path, expected_out: Path) -> None:
    rows, expected = read_metrics(out / "metrics.jsonl"), read_metrics(expected_out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r, e in zip(rows, expected):
        assert r.keys() == e.keys()
        for key in r:
            assert r[key] == pytest.approx(e[key], rel=1e-6, abs=1e-9), (r["step"], key)
    w1, w2 = weights(expected_out / "final"), weights(out / "final")
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


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_ppo_with_a_critic_two_ranks(tmp_path, model_dir, critic):
    """PPO's critic (a value head on the policy, or its own trunk) is sharded like the policy:
    the 2-rank run trains it (value loss, whitened GAE advantages, adaptive KL on global
    means), logs each step once, exports the policy, and writes sharded checkpoints of policy,
    critic and optimizer together, from which a resumed run continues exactly."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / critic
    run_cli(2, train_args("ppo", model_dir, out, f"train.critic={critic}"))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "value/loss", "grad_norm", "objective/kl_coef"))
        assert r["value/loss"] > 0
    assert rows[-1]["objective/kl_coef"] != 0.1  # the adaptive controller moved β
    assert AutoModelForCausalLM.from_pretrained(out / "final").num_parameters() > 0
    part = tmp_path / f"{critic}-resumed"
    run_cli(2, train_args("ppo", model_dir, part, f"train.critic={critic}", f"train.max_steps={STEPS - 1}"))
    run_cli(2, [*train_args("ppo", model_dir, part, f"train.critic={critic}"), "--resume"])
    assert_same_as_uninterrupted(part, out)


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_ppo_two_ranks_equal_one_process(tmp_path, model_dir, critic):
    """Greedy rollouts (top_k=1: the same tokens whatever each rank's sampling noise), so 2 ranks
    and one process train on the same global batch: GAE per rank, advantages whitened over
    every rank's tokens, the value loss over the global token count and β on global means give
    the same first step at 1e-5 and the same run at 1e-4 (the rollout log-probs come from
    Generators over different batch shapes: fp32 rounding that later steps carry on)."""
    args = ["train.top_k=1", f"train.critic={critic}", "train.save_every=0"]
    run_cli(1, train_args("ppo", model_dir, tmp_path / "one", *args))
    run_cli(2, train_args("ppo", model_dir, tmp_path / "two", *args))
    rows1, rows2 = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in rows2] == [r["step"] for r in rows1] == list(range(1, STEPS + 1))
    for r1, r2 in zip(rows1, rows2):
        for key in ("loss", "value/loss", "kl", "objective/kl_coef", "grad_norm", "reward"):
            rel = 1e-5 if r1["step"] == 1 else 1e-4
            # kl: a difference of nearly equal log-probs, whose rounding is absolute
            assert r2[key] == pytest.approx(r1[key], rel=rel, abs=1e-5 if key == "kl" else 1e-7), (r1["step"], key)
    w1, w2 = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    assert w1.keys() == w2.keys() and w1
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_lora_two_ranks_resume_equals_one_process(tmp_path, model_dir):
    """A 2-rank LoRA checkpoint (base and adapter shards through DCP, optimizer states of the
    adapters alone) resumed on 2 ranks continues as the one-process run of the same batch."""
    run_cli(1, train_args("dpo_lora", model_dir, tmp_path / "one"))
    run_cli(2, [*train_args("dpo_lora", model_dir, tmp_path / "two"), f"train.max_steps={STEPS - 1}"])
    run_cli(2, [*train_args("dpo_lora", model_dir, tmp_path / "two"), "--resume"])
    assert_same_run(tmp_path / "one", tmp_path / "two", ("loss", "rewards/margins", "grad_norm"))


@pytest.mark.slow
def test_fp16_mixed_two_ranks(tmp_path, model_dir):
    """fp16-mixed under FSDP2: torch.amp.GradScaler unscales the DTensor gradient shards and
    its inf check is reduced over the ranks (DTensor's handler for the unscale op, torch 2.13),
    so every rank skips the same overflow steps and keeps the same loss scale. The scale can
    differ from one process's (each rank's fp16 gradients are its share of the sum, reduced in
    fp32), so this checks the run itself: finite, fp32 master weights, steps applied."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fp16"
    run_cli(2, train_args("dpo", model_dir, out, "train.precision=fp16-mixed", "train.max_steps=4"))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["train/loss_scale"] >= 1 and torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["train/skipped_steps"] < 4
    final = weights(out / "final")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in final.values())
    start = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert any(not torch.equal(final[f"model/{k}"], v) for k, v in start.items() if f"model/{k}" in final)


def rlaif_args(tmp: Path, model_dir: Path, out: Path, algorithm: str = "grpo") -> list[str]:
    """RLAIF with the judge as GRPO's reward (pointwise: the expected rating of a choice token)."""
    config = tmp / "rlaif.yaml"
    config.write_text(
        f"method: rlaif\nmodel: {model_dir}\njudge: {model_dir}\n"
        f"judge_options:\n  choices: [a, b]\n  batch_size: 8\n"
        f"data: {REPO / 'examples' / 'data' / 'prompts.jsonl'}\noutput_dir: {out}\n"
        f"train:\n  algorithm: {algorithm}\n  judge_mode: pointwise\n  num_samples: 2\n  batch_size: 2\n"
        f"  max_new_tokens: 4\n  max_prompt_length: 24\n  max_steps: {STEPS}\n  save_every: 1\n"
        "  ppo:\n    learning_rate: 1.0e-3\n")
    return ["train", str(config), "device=cpu", "progress=false", "plot=false", "tensorboard=false"]


@pytest.mark.slow
def test_rlaif_two_ranks_resume_after_sigkill(tmp_path, model_dir):
    """RLAIF (the judge replicated on each rank, judging that rank's rollouts) on 2 ranks: each
    step logged once, and a run killed with SIGKILL and resumed equals the uninterrupted one."""
    run_cli(2, rlaif_args(tmp_path, model_dir, tmp_path / "whole"))
    rows = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor([r["loss"], r["reward"]])).all() for r in rows)
    out = tmp_path / "killed"
    kill_and_resume(rlaif_args(tmp_path, model_dir, out), out)
    assert_same_as_uninterrupted(out, tmp_path / "whole")
