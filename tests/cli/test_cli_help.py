"""The command line explains itself: every setting with its default and meaning, the version,
the usage on a bare call, TRL's names with a notice, and the start-up banner."""

import dataclasses
from importlib.metadata import version

import pytest
import yaml
from .cli_helpers import EXAMPLES, write_config

from rftengine.cli import main
from rftengine.cli.runners import METHOD_RUNNERS, method_keys
from rftengine.config import METHODS, RunConfig, load_run_config
from rftengine.errors import UserError


@pytest.mark.parametrize("method", METHODS)
def test_config_command_lists_every_field_with_its_default_and_meaning(method, capsys):
    assert main(["config", method]) == 0
    out = capsys.readouterr().out
    train, _, run = out.partition("\nRunConfig (the top level of the run file)\n")
    for cls, text in ((METHOD_RUNNERS[method].config_class(), train), (RunConfig, run)):
        for f in dataclasses.fields(cls):
            if f.init:
                assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
                line = next(x for x in text.splitlines() if x.startswith(f"  {f.name} "))
                assert "default " in line or "required" in line, line
                assert f.metadata["help"][:30] in text, f.name
    assert "  keep_last " in run and "(TRL: save_total_limit)" in run
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help-config", method])
    assert exit_info.value.code == 0 and capsys.readouterr().out == out


def test_help_states_what_batch_size_counts(capsys):
    main(["config", "grpo"])
    out = capsys.readouterr().out
    assert out.startswith("PPOConfig (the train: section; method grpo sets algorithm: grpo)")
    batch = out[out.index("\n  batch_size "):][:400]
    assert "prompts" in batch and "TRL's per_device_train_batch_size counts the completions" in batch
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "rftengine config METHOD" in capsys.readouterr().out


def test_version_and_a_bare_call(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"rftengine {version('rftengine')}\n"
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rftengine") and "Traceback" not in out
    for command in ("train", "config", "bench", "demo"):
        assert f"\n    {command} " in out


def test_save_total_limit_in_the_train_section_is_the_runs_keep_last(tmp_path, notices):
    path = write_config(tmp_path / "run.yaml", method="dpo", model="m", data="d.jsonl",
                        train={"save_total_limit": 1, "beta": 0.2})
    cfg = load_run_config(path)
    assert cfg.keep_last == 1 and cfg.train == {"beta": 0.2}
    assert notices() == ["train.save_total_limit is TRL's name for the run-level keep_last; using it"]
    top = write_config(tmp_path / "top.yaml", method="dpo", model="m", data="d.jsonl", save_total_limit=3)
    assert load_run_config(top).keep_last == 3
    with pytest.raises(UserError, match="give only one of train.save_total_limit and keep_last"):
        load_run_config(path, ["keep_last=2"])


def test_a_trl_name_at_the_top_level_is_pointed_to_the_train_section(tmp_path):
    path = write_config(tmp_path / "run.yaml", method="grpo", model="m", data="d.jsonl", reward="m:f",
                        num_generations=4)
    with pytest.raises(UserError, match=r"'num_generations' is a setting of the method: put it in the train "
                                        r"section \(train.num_generations\)"):
        load_run_config(path, method_keys=method_keys)


def test_a_trl_grpo_recipe_trains_with_notices_and_the_banner(tmp_path, tiny_model_dir, monkeypatch, capsys, notices):
    monkeypatch.chdir(EXAMPLES.parent)
    trl = {"num_generations": 2, "per_device_train_batch_size": 4, "beta": 0.0, "epsilon": 0.2,
           "max_completion_length": 6, "loss_type": "dr_grpo", "scale_rewards": False, "save_steps": 1,
           "save_total_limit": 1, "max_steps": 1, "lr_scheduler_type": "linear", "warmup_ratio": 0.5}
    path = write_config(tmp_path / "grpo.yaml", method="grpo", model=str(tiny_model_dir),
                        data="examples/data/prompts.jsonl", reward="rftengine.toy:vowel_fraction_reward",
                        output_dir=str(tmp_path / "out"), plot=False, export=False, train=trl)
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rftengine train: grpo on cpu, precision fp32, world size 1\n  parameters: " in out
    assert "trainable (100%)\n  steps: 1 (max_steps)\n" in out
    resolved = yaml.safe_load((tmp_path / "out" / "run_config.yaml").read_text())
    train = resolved["train"]
    assert resolved["keep_last"] == 1
    assert (train["group_size"], train["batch_size"], train["kl_coef"], train["max_new_tokens"]) == (2, 2, 0.0, 6)
    assert (train["aggregation"], train["group_scale"], train["warmup_steps"]) == ("token_sum_norm", "none", 1)
    lines = notices()
    assert "train.num_generations is TRL's name for train.group_size; using it" in lines
    assert len(lines) == len(trl) - 1 == len(set(lines))      # max_steps is rftengine's name too
