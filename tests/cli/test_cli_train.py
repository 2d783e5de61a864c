"""Every method through `rftengine train` on a tiny model, from the example configs."""

import json

import pytest
from .cli_helpers import EXAMPLES

from rftengine import checkpoint as ckpt
from rftengine.cli import main
from rftengine.metrics import read_metrics

FAST = {
    "reward": ["train.batch_size=4", "train.max_prompt_length=32", "train.max_response_length=16"],
    "dpo": ["train.batch_size=4", "train.max_prompt_length=32", "train.max_response_length=16"],
    "ppo": ["train.batch_size=2", "train.max_new_tokens=6", "train.ppo_epochs=1", "train.minibatch_size=2"],
    "grpo": ["train.batch_size=2", "train.group_size=2", "train.max_new_tokens=6"],
    "rloo": ["train.batch_size=2", "train.group_size=2", "train.max_new_tokens=6"],
    "rlaif": ["train.batch_size=2", "train.group_size=2", "train.max_new_tokens=6", "judge_options.batch_size=8",
              "judge_options.choices=[a,b]"],
}


def train(method, model_dir, out, *extra, steps=2):
    argv = ["train", str(EXAMPLES / f"{method}.yaml"), f"model={model_dir}", f"output_dir={out}",
            f"train.max_steps={steps}", "train.save_every=1", *FAST.get(method, []), *extra]
    return main(argv)


def check_run(out, steps=2):
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, steps + 1))
    assert (out / "metrics.csv").read_text().startswith("step,")
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in ckpt.list_checkpoints(out)] == [f"checkpoint-{steps - 1}", f"checkpoint-{steps}"]
    ckpt.check_model_dir(out / "final")
    assert json.loads((out / f"checkpoint-{steps}" / ckpt.MARKER).read_text())["step"] == steps


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)  # the examples' paths are relative to the repository root


def test_reward_then_ppo_with_the_reward_model(tmp_path, tiny_model_dir, capsys):
    assert train("reward", tiny_model_dir, tmp_path / "rm") == 0
    check_run(tmp_path / "rm")
    out = capsys.readouterr().out
    assert "pair_accuracy" in out and "final_model" in out
    rows = read_metrics(tmp_path / "rm" / "metrics.jsonl")
    assert {"loss", "accuracy", "rewards/margins"} <= set(rows[0])

    assert train("ppo", tiny_model_dir, tmp_path / "ppo", f"reward={tmp_path / 'rm' / 'final'}") == 0
    check_run(tmp_path / "ppo")
    rows = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    assert {"loss", "reward", "reward_std", "kl", "clip_ratio/region_mean", "entropy", "value/loss",
            "completions/mean_length"} <= set(rows[0])


def test_grpo_with_a_judge_model_as_reward(tmp_path, tiny_model_dir):
    code = train("grpo", tiny_model_dir, tmp_path / "grpo", f"reward={tiny_model_dir}",
                 "judge_options.batch_size=4", "judge_options.ratings=[a,b,c]", "judge_options.choices=[a,b]")
    assert code == 0
    check_run(tmp_path / "grpo")
    rows = read_metrics(tmp_path / "grpo" / "metrics.jsonl")
    assert all(0.0 <= r["reward"] <= 3.0 for r in rows) and "kl" in rows[0]


def test_rloo_with_a_python_reward_beside_the_config(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    monkeypatch.chdir(tmp_path)
    code = train("rloo", tiny_model_dir, tmp_path / "rloo", "reward=my_rewards:length",
                 f"data={EXAMPLES / 'data' / 'prompts.jsonl'}")
    assert code == 0
    check_run(tmp_path / "rloo")


def test_dpo_on_chat_pairs(tmp_path, tiny_model_dir):
    code = train("dpo", tiny_model_dir, tmp_path / "dpo", "data=examples/data/chat_pairs.jsonl", "keep_last=1", steps=3)
    assert code == 0
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "dpo")] == ["checkpoint-3"]
    rows = read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and {"rewards/accuracies", "rewards/margins"} <= set(rows[0])


def test_rlaif_online_dpo_with_a_judge(tmp_path, tiny_model_dir):
    assert train("rlaif", tiny_model_dir, tmp_path / "rlaif", f"judge={tiny_model_dir}") == 0
    check_run(tmp_path / "rlaif")
    rows = read_metrics(tmp_path / "rlaif" / "metrics.jsonl")
    assert {"judge/score", "judge/pairs"} <= set(rows[0])


def test_cai_sft_then_dpo(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "constitution.yaml").write_text(
        "principles:\n  - name: vowels\n    critique_request: count the vowels\n    revision_request: use more vowels\n")
    argv = ["train", str(EXAMPLES / "cai.yaml"), f"model={tiny_model_dir}", f"output_dir={tmp_path / 'cai'}",
            f"constitution={tmp_path / 'constitution.yaml'}", "train.max_new_tokens=5",
            "train.critique_max_new_tokens=5", "train.max_prompt_length=24", "train.max_context_length=64",
            "train.sft.max_steps=1", "train.sft.batch_size=4", "train.dpo.max_steps=2", "train.dpo.batch_size=4",
            "train.dpo.save_every=1"]
    assert main(argv) == 0
    rows = read_metrics(tmp_path / "cai" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["cai/stage"] for r in rows] == [0.0, 1.0, 1.0]
    assert "rewards/accuracies" in rows[-1]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "cai")] == ["checkpoint-2", "checkpoint-3"]
    out = capsys.readouterr().out
    assert "examples: 16" in out and "pairs:" in out
    ckpt.check_model_dir(tmp_path / "cai" / "final")


def test_bad_constitution(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "c.yaml").write_text("principles:\n  - name: x\n")
    argv = ["train", str(EXAMPLES / "cai.yaml"), f"model={tiny_model_dir}", f"output_dir={tmp_path / 'cai'}",
            f"constitution={tmp_path / 'c.yaml'}"]
    assert main(argv) == 1
    assert "principle 0 needs a non-empty string 'critique_request'" in capsys.readouterr().err


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("rftengine.toy:nope", "module 'rftengine.toy' .* has no 'nope'"),
    ("rftengine.toy:VOWELS", "'VOWELS' is a frozenset, not a function"),
])
def test_bad_reward_function(tmp_path, tiny_model_dir, capsys, spec, message):
    assert train("grpo", tiny_model_dir, tmp_path / "g", f"reward={spec}") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_unknown_judge_option(tmp_path, tiny_model_dir, capsys):
    assert train("grpo", tiny_model_dir, tmp_path / "g", f"reward={tiny_model_dir}", "judge_options.templte=x") == 1
    assert "unknown judge_options key 'templte' (did you mean 'template'?)" in capsys.readouterr().err


def test_algorithm_must_match_method(tmp_path, tiny_model_dir, capsys):
    assert train("grpo", tiny_model_dir, tmp_path / "g", "train.algorithm=rloo") == 1
    assert "train.algorithm is 'rloo' but method is 'grpo'" in capsys.readouterr().err
