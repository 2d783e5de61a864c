"""RLAIF's online DPO and Constitutional AI under torchrun (2 ranks, gloo, CPU) against the same
run in one process.

Both sample: each response's noise is keyed by its global sequence index (``sample_rollout``,
``sample_responses``), so the 2-rank run samples, judges and generates what one process does,
and the same global batch then gives the same losses and final weights."""

import shutil
from pathlib import Path

import pytest
import torch

from rftengine.metrics import read_metrics

from .launch import REPO
from .test_torchrun_cli import STEPS, assert_same_as_uninterrupted, model_dir, run_cli, weights  # noqa: F401

PROMPTS = REPO / "examples" / "data" / "prompts.jsonl"
COMMON = ["device=cpu", "progress=false", "plot=false", "tensorboard=false"]


def write_config(tmp: Path, name: str, text: str) -> list[str]:
    config = tmp / f"{name}.yaml"
    config.write_text(text)
    return ["train", str(config), *COMMON]


def rlaif_dpo_args(tmp: Path, model: Path, out: Path) -> list[str]:
    """Online DPO, 2 prompts x 2 samples a step: each rank judges its prompt's two responses
    into at most one pair, so a rank may form none (min_margin) while the other forms one."""
    return write_config(tmp, "rlaif_dpo", (
        f"method: rlaif\nmodel: {model}\njudge: {model}\njudge_options:\n  choices: [a, b]\n  batch_size: 8\n"
        f"data: {PROMPTS}\noutput_dir: {out}\n"
        "train:\n  algorithm: dpo\n  judge_mode: pointwise\n  num_samples: 2\n  batch_size: 2\n"
        f"  max_new_tokens: 4\n  max_prompt_length: 24\n  max_steps: {STEPS}\n  min_margin: 0.0005\n"
        "  dpo:\n    learning_rate: 1.0e-3\n    beta: 0.5\n"))


@pytest.mark.slow
def test_rlaif_online_dpo_two_ranks_equal_one_process(tmp_path, model_dir):  # noqa: F811 (fixture)
    run_cli(1, rlaif_dpo_args(tmp_path, model_dir, tmp_path / "one"))
    run_cli(2, rlaif_dpo_args(tmp_path, model_dir, tmp_path / "two"))
    rows1, rows2 = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in rows2] == [r["step"] for r in rows1] == list(range(1, STEPS + 1))  # once each
    assert any(r["judge/pairs"] > 0 for r in rows2)          # it trained
    for r1, r2 in zip(rows1, rows2):
        assert r1.keys() == r2.keys()
        # global: the pairs of both ranks (not a mean over the ranks), their mean margin
        assert r2["judge/pairs"] == r1["judge/pairs"] and r2["judge/pairs"] == int(r2["judge/pairs"])
        for key in ("judge/score", "judge/margin", "completions/mean_length", "completions/max_length", "loss",
                    "rewards/margins", "grad_norm"):
            if key in r1:
                # judge/margin: a difference of nearly equal ratings (~3), whose fp32 rounding is absolute
                assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6 if key == "judge/margin" else 1e-7), \
                    (r1["step"], key)
    w1, w2 = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


def cai_args(tmp: Path, model: Path, out: Path) -> list[str]:
    """SFT then DPO on 5 prompts' revisions (5 over 2 ranks: shares of 3 and 2, padded); the
    DPO stage's reference log-probs are precomputed from a frozen copy of the policy after SFT,
    loaded anew and sharded on each rank (test_cai_rl_stage_... runs a live reference)."""
    lines = [f"{json_line}" for json_line in PROMPTS.read_text().splitlines()[:5]]
    data = tmp / "cai_prompts.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return write_config(tmp, "cai", (
        f"method: cai\nmodel: {model}\ndata: {data}\noutput_dir: {out}\n"
        f"constitution: {REPO / 'examples' / 'data' / 'constitution.yaml'}\n"
        "train:\n  mode: sft_dpo\n  max_new_tokens: 6\n  critique_max_new_tokens: 4\n  max_context_length: 48\n"
        "  max_prompt_length: 24\n  generation_batch_size: 2\n"
        "  sft:\n    learning_rate: 1.0e-3\n    batch_size: 2\n    max_steps: 2\n"
        "  dpo:\n    learning_rate: 1.0e-3\n    batch_size: 2\n    max_steps: 2\n    beta: 0.5\n"))


@pytest.mark.slow
def test_cai_two_ranks_equal_one_process(tmp_path, model_dir):  # noqa: F811 (fixture)
    """Each rank generates its share of responses, critiques and revisions, every rank trains on
    all of them (SFT, then DPO against the post-SFT reference): the same steps, losses and
    final weights as one process. The 2-rank run stops after the first DPO step and resumes
    from its sharded checkpoint (the generated examples and the reference cache in its state)."""
    run_cli(1, cai_args(tmp_path, model_dir, tmp_path / "one"))
    run_cli(2, [*cai_args(tmp_path, model_dir, tmp_path / "two"), "train.dpo.max_steps=1"])
    proc = run_cli(2, [*cai_args(tmp_path, model_dir, tmp_path / "two"), "--resume"])
    assert "resuming from" in proc.stdout and "checkpoint-3" in proc.stdout
    rows1, rows2 = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in rows2] == [r["step"] for r in rows1] == [1, 2, 3, 4]
    assert [r["cai/stage"] for r in rows2] == [0, 0, 1, 1]
    for r1, r2 in zip(rows1, rows2):
        assert r1.keys() == r2.keys()
        for key in ("loss", "grad_norm", "rewards/margins"):
            if key in r1:
                # rewards/margins: β times differences of summed log-probs (~30), rounded absolutely
                assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-5 if key == "rewards/margins" else 1e-7), \
                    (r1["step"], key)
    assert rows2[-1]["rewards/margins"] != 0  # the reference is not the trained policy
    w1, w2 = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)
    assert proc.stdout.count("examples: 5") == 1


def rlaif_ppo_args(tmp: Path, model: Path, out: Path) -> list[str]:
    return write_config(tmp, "rlaif_ppo", (
        f"method: rlaif\nmodel: {model}\njudge: {model}\njudge_options:\n  choices: [a, b]\n  batch_size: 8\n"
        f"data: {PROMPTS}\noutput_dir: {out}\n"
        "train:\n  algorithm: ppo\n  judge_mode: pointwise\n  num_samples: 2\n  batch_size: 2\n"
        f"  max_new_tokens: 4\n  max_prompt_length: 24\n  max_steps: {STEPS}\n  save_every: 1\n"
        "  ppo:\n    learning_rate: 1.0e-3\n    critic: separate\n    vf_coef: 0.5\n"))


@pytest.mark.slow
def test_rlaif_ppo_with_a_critic_two_ranks_resumes_exactly(tmp_path, model_dir):  # noqa: F811 (fixture)
    """RLAIF with PPO's separate critic on 2 ranks: its checkpoint holds policy, critic and
    optimizer shards together; resuming from the step-2 checkpoint (a new branch) continues
    exactly as the uninterrupted run did."""
    out = tmp_path / "ppo"
    run_cli(2, rlaif_ppo_args(tmp_path, model_dir, out))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["value/loss"])) and r["value/loss"] > 0 for r in rows)
    whole = tmp_path / "whole"
    whole.mkdir()
    shutil.copy(out / "metrics.jsonl", whole / "metrics.jsonl")
    shutil.copytree(out / "final", whole / "final")
    run_cli(2, [*rlaif_ppo_args(tmp_path, model_dir, out), "--resume", str(out / f"checkpoint-{STEPS - 1}")])
    assert_same_as_uninterrupted(out, whole)


@pytest.mark.slow
def test_cai_rl_stage_with_a_critic_two_ranks_resumes_exactly(tmp_path, model_dir):  # noqa: F811 (fixture)
    """RL-CAI on 2 ranks: SFT, then PPO with a separate critic (its trunk loaded anew and
    sharded) and a KL term against the post-SFT policy (a stage reference loaded anew, given
    the policy's shards). Resuming the RL stage's checkpoint (policy, critic and optimizer
    shards, the reference's full weights) continues exactly as the uninterrupted run."""
    lines = PROMPTS.read_text().splitlines()[:4]
    data = tmp_path / "rl_prompts.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "rl"
    args = write_config(tmp_path, "cai_rl", (
        f"method: cai\nmodel: {model_dir}\njudge: {model_dir}\njudge_options:\n  choices: [a, b]\n"
        f"data: {data}\noutput_dir: {out}\nkeep_last: 3\n"
        "train:\n  mode: rl\n  max_new_tokens: 4\n  critique_max_new_tokens: 4\n  max_context_length: 48\n"
        "  max_prompt_length: 24\n  sft:\n    batch_size: 2\n    max_steps: 1\n"
        "  rl:\n    algorithm: ppo\n    critic: separate\n    group_size: 2\n    batch_size: 2\n    max_steps: 2\n"
        "    kl_coef: 0.1\n    learning_rate: 1.0e-3\n    save_every: 1\n"))
    run_cli(2, args)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["cai/stage"] for r in rows] == [0, 1, 1]
    assert rows[-1]["value/loss"] > 0 and rows[-1]["kl"] != 0
    whole = tmp_path / "whole"
    whole.mkdir()
    shutil.copy(out / "metrics.jsonl", whole / "metrics.jsonl")
    shutil.copytree(out / "final", whole / "final")
    run_cli(2, [*args, "--resume", str(out / "checkpoint-2")])
    assert_same_as_uninterrupted(out, whole)  # STEPS == 3
