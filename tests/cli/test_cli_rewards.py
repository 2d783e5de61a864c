"""`rftengine train` with TRL-style reward functions: a list of rewards with weights (functions
and model directories together), the data's extra columns reaching them, per-function metrics,
and one-line errors."""

import pytest

from rftengine.cli import main
from rftengine.metrics import read_metrics

from .cli_helpers import write_config, write_jsonl

REWARDS = '''
def exact(completions, answer, **kwargs):
    """TRL style: the `answer` column, one value per completion; None where it does not apply."""
    return [1.0 if a == "x" else None for a in answer]


def length(prompts, completions, completion_ids, trainer_state, **kwargs):
    assert trainer_state.max_steps == 2 and 0 <= trainer_state.global_step < 2
    return [float(len(ids)) for ids in completion_ids]


def text(prompts, completions, **kwargs):
    return "not a list"
'''

DATA = [{"prompt": "ab:", "answer": "x"}, {"prompt": "cd:", "answer": "y"}] * 2


def run_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and err.startswith("rftengine train: error: ")
    return err


@pytest.fixture
def setup(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "trl_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "prompts.jsonl", DATA)

    def config(**values):
        base = dict(method="grpo", model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "out"),
                    progress=False, plot=False,
                    train={"batch_size": 2, "group_size": 2, "max_new_tokens": 4, "max_steps": 2, "shuffle": False})
        base.update(values)
        return write_config(tmp_path / "run.yaml", **base)

    return tmp_path, config


def test_weighted_trl_functions_and_a_judge_directory(setup, tiny_model_dir):
    tmp_path, config = setup
    cfg = config(reward=["trl_rewards:exact", "trl_rewards:length", str(tiny_model_dir)],
                 reward_weights=[2.0, 0.5, 1.0],
                 judge_options={"batch_size": 8, "ratings": ["a", "b", "c"], "choices": ["a", "b"]})
    assert main(["train", str(cfg)]) == 0
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rewards/exact/mean"] == 1.0 and r["rewards/exact/std"] == 0.0   # only the "x" rows
        assert r["rewards/length/mean"] == pytest.approx(r["completions/mean_length"])
        judge = r[f"rewards/{tiny_model_dir.name}/mean"]
        # the weighted sum over the functions that scored each sample, averaged: half the samples have "x"
        expected = 2.0 * 0.5 + 0.5 * r["rewards/length/mean"] + judge
        assert r["reward"] == pytest.approx(expected, rel=1e-5)


def test_reward_weights_in_the_train_section(setup):
    tmp_path, config = setup
    cfg = config(reward=["trl_rewards:exact", "trl_rewards:length"],
                 train={"batch_size": 2, "group_size": 2, "max_new_tokens": 4, "max_steps": 2,
                        "reward_weights": [0.0, 1.0]})
    assert main(["train", str(cfg)]) == 0
    row = read_metrics(tmp_path / "out" / "metrics.jsonl")[0]
    assert row["reward"] == pytest.approx(row["rewards/length/mean"], rel=1e-6)


@pytest.mark.parametrize("values, message", [
    (dict(reward=["trl_rewards:exact", "trl_rewards:length"], reward_weights=[1.0]),
     "reward_weights must be a list of 2 finite number(s), one per entry of reward, got [1.0]"),
    (dict(reward="trl_rewards:exact", reward_weights=[1.0],
          train={"batch_size": 2, "group_size": 2, "reward_weights": [1.0]}),
     "reward_weights is given twice"),
    (dict(reward=["trl_rewards:exact", 3]), "reward must be a path, module:function, a non-empty list of them"),
    (dict(reward="trl_rewards:text"),
     "reward function trl_rewards:text must return a tensor or a list of numbers, one per response"),
])
def test_reward_mistakes_are_one_line_errors(capsys, setup, values, message):
    _, config = setup
    assert message in run_error(capsys, ["train", str(config(**values))])
