"""`rftengine train` evaluation and logging: eval_data logged as eval/* and plotted, report_to
destinations (wandb and trackio through stand-in modules), console lines without bars, and no
terminal escape codes in a log file."""

import contextlib
import json
import sys
import types

import pytest
from .cli_helpers import EXAMPLES, write_jsonl

from rftengine.cli import main
from rftengine.config import RunConfig
from rftengine.errors import UserError
from rftengine.metrics import read_metrics

PAIRS = [json.loads(line) for line in (EXAMPLES / "data" / "pairs.jsonl").read_text().splitlines() if line.strip()]
DPO_FAST = ["train.batch_size=4", "train.max_prompt_length=32", "train.max_response_length=16", "plot=false",
            "export=false"]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)  # the examples' paths are relative to the repository root


def run_logged(argv, log_path):
    """main(argv) with stdout and stderr written to a file, as `rftengine train ... > log 2>&1`."""
    with open(log_path, "w", encoding="utf-8") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = main(argv)
    return code, log_path.read_text(encoding="utf-8")


def test_dpo_eval_data_is_logged_evaluated_and_plotted(tmp_path, tiny_model_dir):
    held_out = write_jsonl(tmp_path / "held_out.jsonl", PAIRS[-5:])
    out = tmp_path / "out"
    argv = ["train", str(EXAMPLES / "dpo.yaml"), f"model={tiny_model_dir}", f"output_dir={out}",
            f"eval_data={held_out}", "train.eval_every=2", "train.max_steps=3", "train.logging_steps=1",
            *DPO_FAST, "plot=true"]
    code, log = run_logged(argv, tmp_path / "log.txt")
    assert code == 0, log
    rows = read_metrics(out / "metrics.jsonl")
    assert [("eval/loss" in r) for r in rows] == [False, True, True]
    for name in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"):
        assert name in rows[-1], name
    assert "eval/rewards/accuracies" in (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    lines = [line for line in log.splitlines() if line.startswith("dpo step")]
    assert [line.split(":")[0] for line in lines] == ["dpo step 1/3", "dpo step 2/3", "dpo step 3/3"], log
    assert "eval/loss" in lines[1] and "eval/loss" not in lines[0]


def test_eval_data_is_refused_for_cai(tmp_path, tiny_model_dir, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}])
    code = main(["train", str(EXAMPLES / "cai.yaml"), f"model={tiny_model_dir}", f"output_dir={tmp_path / 'o'}",
                 f"eval_data={prompts}"])
    err = capsys.readouterr().err
    assert code == 1 and "not supported for method cai" in err and "Traceback" not in err


@pytest.mark.parametrize("interactive", [False, True])
def test_no_escape_codes_in_a_log_file(tmp_path, tiny_model_dir, monkeypatch, interactive):
    """RLAIF draws bars inside the step bar (sampling, judging): in a log file they would leave
    cursor-up codes (ESC[A); with the output not a terminal, plain lines are printed instead."""
    if interactive:      # the check itself: bars forced on do leave escape codes in the file
        monkeypatch.setattr("rftengine.methods.loop.interactive_terminal", lambda: True)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": "ab> "}, {"prompt": "cd> "}])
    out = tmp_path / "out"
    argv = ["train", str(EXAMPLES / "rlaif.yaml"), f"model={tiny_model_dir}", f"judge={tiny_model_dir}",
            f"output_dir={out}", f"eval_data={held_out}", "train.max_steps=2", "train.batch_size=2",
            "train.group_size=2", "train.max_new_tokens=4", "train.logging_steps=1", "judge_options.batch_size=8",
            "plot=false", "progress=true"]
    code, log = run_logged(argv, tmp_path / "log.txt")
    assert code == 0, log
    if interactive:
        assert "\x1b[A" in log
        return
    assert "\x1b" not in log and "\r" not in log, repr(log[-2000:])
    assert "rlaif-dpo step 2/2:" in log and "eval/reward" in log
    assert {"eval/reward", "eval/reward_std", "eval/completions/mean_length"} <= set(read_metrics(out / "metrics.jsonl")[-1])


class FakeTracker(types.ModuleType):
    """A stand-in `wandb` / `trackio` module that records its calls."""

    def __init__(self, name):
        super().__init__(name)
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))

    def log(self, values, step=None):
        self.calls.append(("log", step, dict(values)))

    def finish(self):
        self.calls.append(("finish",))


def test_report_to_wandb_and_trackio(tmp_path, tiny_model_dir, monkeypatch):
    fakes = {name: FakeTracker(name) for name in ("wandb", "trackio")}
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    out = tmp_path / "my-run"
    argv = ["train", str(EXAMPLES / "dpo.yaml"), f"model={tiny_model_dir}", f"output_dir={out}",
            "report_to=[jsonl, wandb, trackio]", "train.max_steps=2", *DPO_FAST]
    assert main(argv) == 0
    for name, module in fakes.items():
        kind, kwargs = module.calls[0]
        assert kind == "init" and kwargs["project"] == "rftengine" and kwargs["name"] == "my-run", name
        assert kwargs["config"]["method"] == "dpo" and kwargs["config"]["train"]["max_steps"] == 2
        logs = [c for c in module.calls if c[0] == "log"]
        assert [c[1] for c in logs] == [1, 2] and all("loss" in c[2] and "step" not in c[2] for c in logs)
        assert module.calls[-1] == ("finish",) and len(module.calls) == 4
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert not (out / "metrics.csv").exists()              # csv was not asked for


@pytest.mark.parametrize("name", ["wandb", "trackio", "tensorboard"])
def test_report_to_a_missing_package_says_what_to_install(tmp_path, tiny_model_dir, monkeypatch, capsys, name):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard" if name == "tensorboard" else name, None)
    argv = ["train", str(EXAMPLES / "dpo.yaml"), f"model={tiny_model_dir}", f"output_dir={tmp_path / 'o'}",
            f"report_to=[{name}]", "train.max_steps=1", *DPO_FAST]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"report_to includes {name}, which is not installed: pip install {name}" in err and "Traceback" not in err


def test_report_to_is_checked_and_tensorboard_is_its_deprecated_spelling(caplog):
    base = dict(method="dpo", model="m", data="d")
    assert RunConfig(**base).report_to is None                              # the default destinations
    assert RunConfig(**base, report_to=["csv", "wandb", "csv"]).report_to == ["csv", "wandb"]
    with caplog.at_level("WARNING", logger="rftengine"):
        off = RunConfig(**base, tensorboard=False)
        on = RunConfig(**base, report_to=["jsonl"], tensorboard=True)
    assert off.report_to == ["jsonl", "csv"] and on.report_to == ["jsonl", "tensorboard"]
    assert off.tensorboard is None and "tensorboard: false is deprecated" in caplog.text
    with pytest.raises(UserError, match=r"report_to: unknown destination 'wandbb' \(did you mean 'wandb'\?\)"):
        RunConfig(**base, report_to=["wandbb"])
    with pytest.raises(UserError, match="report_to must be a list"):
        RunConfig(**base, report_to=[1])
