"""Run config: YAML + dotted overrides, typed values, unknown keys with suggestions."""

from pathlib import Path

import pytest

from rftengine.config import apply_overrides, load_run_config, parse_override
from rftengine.errors import UserError


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_overrides_are_dotted_and_yaml_typed():
    raw = {"method": "dpo", "train": {"beta": 0.1}}
    out = apply_overrides(raw, ["train.beta=0.25", "keep_last=7", "reference=null", "train.loss_type=ipo", "a.b.c=true"])
    assert out == {"method": "dpo", "keep_last": 7, "reference": None, "a": {"b": {"c": True}},
                   "train": {"beta": 0.25, "loss_type": "ipo"}}
    assert raw["train"]["beta"] == 0.1  # the input is not modified
    assert parse_override("train.lr=1e-5") == (["train", "lr"], 1e-5)  # YAML 1.1 alone reads a string


@pytest.mark.parametrize("bad", ["beta", "=3", "train..beta=1", "train.beta=[1,"])
def test_malformed_override(bad):
    with pytest.raises(UserError, match="override"):
        parse_override(bad)


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(UserError, match="keep_last is 3, not a section"):
        apply_overrides({"keep_last": 3}, ["keep_last.x=1"])


def test_defaults_and_relative_paths(tmp_path):
    path = write(tmp_path, "method: dpo\nmodel: m\ndata: d.jsonl\n")
    cfg = load_run_config(path, ["reference=r"])
    assert (cfg.model, cfg.data, cfg.reference) == ("m", "d.jsonl", "r")  # relative to the working dir
    assert cfg.tokenizer_path == "m" and cfg.reference_path == "r" and cfg.train == {}
    assert load_run_config(path).reference_path == "m"


def test_reward_function_spec_is_not_a_path(tmp_path):
    path = write(tmp_path, "method: grpo\nmodel: m\ndata: d.jsonl\nreward: rftengine.toy:vowel_fraction_reward\n")
    assert load_run_config(path).reward == "rftengine.toy:vowel_fraction_reward"


def test_unknown_key_suggests_closest(tmp_path):
    path = write(tmp_path, "method: dpo\nmodel: m\ndata: d.jsonl\nkeep_lst: 3\n")
    with pytest.raises(UserError, match=r"unknown config key 'keep_lst' \(did you mean 'keep_last'\?\)"):
        load_run_config(path)
    with pytest.raises(UserError, match="did you mean 'output_dir'"):
        load_run_config(write(tmp_path, "method: dpo\nmodel: m\ndata: d.jsonl\n", "ok.yaml"), ["outpt_dir=x"])


def test_method_key_at_top_level_points_to_train(tmp_path):
    path = write(tmp_path, "method: dpo\nmodel: m\ndata: d.jsonl\nbeta: 0.3\n")
    keys = {"dpo": ["beta", "seed"]}.get
    with pytest.raises(UserError, match=r"'beta' is a setting of the method: put it in the train section \(train.beta\)"):
        load_run_config(path, method_keys=keys)
    with pytest.raises(UserError, match="unknown config key 'beta'"):
        load_run_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("method: dop\nmodel: m\ndata: d\n", "did you mean 'dpo'"),
        ("model: m\ndata: d\n", "missing required key 'method'"),
        ("method: dpo\nmodel: m\n", "data is required"),
        ("method: ppo\nmodel: m\ndata: d\n", "reward is required"),
        ("method: rlaif\nmodel: m\ndata: d\n", "judge is required"),
        ("method: dpo\nmodel: m\ndata: d\nkeep_last: 0\n", "keep_last must be an integer >= 1"),
        ("method: dpo\nmodel: m\ndata: d\ndtype: fp8\n", "dtype must be one of"),
        ("method: dpo\nmodel: m\ndata: d\ntrain: [1]\n", "train must be a mapping"),
        ("method: dpo\nmodel: m\ndata: d\njudge_options: 3\n", "judge_options must be a mapping"),
        ("method: dpo\nmodel: m\ndata: d\nplot: maybe\n", "plot must be true or false"),
        ("- a\n- b\n", "must be a mapping"),
        ("method: dpo\n  model: : m\n", r"run.yaml:\d+: invalid YAML"),
    ],
)
def test_bad_configs(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_run_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found: .*nope.yaml"):
        load_run_config(tmp_path / "nope.yaml")


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_train_section_loads_into_its_method_config(path):
    """The YAML stays flat: each example's train section builds its config unchanged, every
    value given (stage sections included) lands on the field of that name."""
    from rftengine.cli.runners import METHOD_RUNNERS
    from rftengine.config import method_config

    cfg = load_run_config(path)
    section = dict(cfg.train)
    if cfg.method in ("ppo", "grpo", "rloo"):
        section.setdefault("algorithm", cfg.method)
    method_cfg = method_config(METHOD_RUNNERS[cfg.method].config_class(), section, str(path))
    for key, value in section.items():
        if isinstance(value, dict):                     # a stage: RLAIF's ppo/dpo, CAI's sft/dpo/rl
            merged = getattr(method_cfg, f"{key}_config")
            assert all(getattr(merged, k) == v for k, v in value.items()), (key, value)
        else:
            assert getattr(method_cfg, key) == (tuple(value) if isinstance(value, list) else value), key


def test_examples_are_found():
    assert {p.stem for p in EXAMPLES} >= {"dpo", "grpo", "ppo", "reward", "rlaif", "rloo", "cai"}


def test_help_config_lists_every_field_of_the_method(capsys):
    import dataclasses

    from rftengine.cli import main
    from rftengine.methods.rlaif import RLAIFConfig

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help-config", "rlaif"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("RLAIFConfig")
    for f in dataclasses.fields(RLAIFConfig):
        assert f"\n  {f.name} " in out
    assert "group_size" in out and "default 2; >= 2" in out
