"""Metric files: JSONL + CSV rows per step, resume truncation, the PNG plot."""

import csv

import torch

from rftengine.metrics import MetricsWriter, plot_metrics, read_metrics


def test_jsonl_and_csv_rows(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(1, {"loss": torch.tensor(0.5), "kl": 0.1, "note": "skipped"})
        w.log(2, {"loss": 0.25, "kl": 0.2, "reward/mean": 1.0})  # a new column widens the CSV
        w.log(3, {"loss": 0.125, "kl": 0.3})
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 0.5, "kl": 0.1},
        {"step": 2, "loss": 0.25, "kl": 0.2, "reward/mean": 1.0},
        {"step": 3, "loss": 0.125, "kl": 0.3},
    ]
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "kl", "reward/mean"]
    assert [r["reward/mean"] for r in rows] == ["", "1.0", ""] and rows[2]["loss"] == "0.125"


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in (1, 2, 3):
            w.log(step, {"loss": float(step)})
    with MetricsWriter(tmp_path, resume_step=2, tensorboard=False) as w:
        w.log(3, {"loss": 30.0})
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 2.0, 30.0]
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [r["loss"] for r in csv.DictReader(f)] == ["1.0", "2.0", "30.0"]
    with MetricsWriter(tmp_path, tensorboard=False):
        pass
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_plot_main_curves(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "rewards/accuracies": 0.5, "kl": 0.01 * s} for s in range(1, 6)]
    path = plot_metrics(rows, tmp_path / "metrics.png", title="dpo")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics([{"step": 1, "other": 1.0}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_tensorboard_when_installed(tmp_path, monkeypatch):
    """tensorboard is an optional extra (absent here): a stand-in module proves the wiring."""
    import sys
    import types

    calls = []

    class SummaryWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, key, value, step):
            calls.append((key, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    with MetricsWriter(tmp_path, tensorboard=True) as w:
        w.log(4, {"loss": 0.5, "kl": 0.25})
    assert calls == [("init", str(tmp_path / "tensorboard")), ("loss", 0.5, 4), ("kl", 0.25, 4), ("close",)]


def test_resume_drops_a_torn_last_line(tmp_path, capsys):
    """A kill mid-write leaves half a JSON line at the end of metrics.jsonl (and maybe of
    metrics.csv): resuming drops it, says so, and rewrites both files whole."""
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in (1, 2, 3):
            w.log(step, {"loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("4,0.")
    with MetricsWriter(tmp_path, resume_step=3, tensorboard=False) as w:
        w.log(4, {"loss": 40.0})
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "torn" in err, err
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 2.0, 3.0, 40.0]
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [(r["step"], r["loss"]) for r in csv.DictReader(f)] == [
            ("1", "1.0"), ("2", "2.0"), ("3", "3.0"), ("4", "40.0")]


def test_a_broken_line_before_the_last_is_an_error(tmp_path):
    import pytest

    from rftengine.errors import UserError

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 3.0}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl.*line 2"):
        MetricsWriter(tmp_path, resume_step=3, tensorboard=False)


def test_a_named_writer_tags_rows_with_their_stage(tmp_path):
    """`name` sets the files' stem; `stage` goes into every destination: a "stage" column in the
    JSONL and the CSV (both stages' step 1 kept apart), and in `rows`."""
    with MetricsWriter(tmp_path, name="demo_metrics", report_to=["jsonl", "csv"]) as w:
        assert w.log(1, {"loss": 1.0}, stage="sft") == {"stage": "sft", "step": 1, "loss": 1.0}
        w.log(2, {"loss": 0.5}, stage="sft")
        w.log(1, {"loss": 2.0, "kl": 0.1}, stage="dpo")
    expected = [{"stage": "sft", "step": 1, "loss": 1.0}, {"stage": "sft", "step": 2, "loss": 0.5},
                {"stage": "dpo", "step": 1, "loss": 2.0, "kl": 0.1}]
    records = read_metrics(tmp_path / "demo_metrics.jsonl")
    assert records == expected and w.rows == expected
    assert [list(r)[:2] for r in records] == [["stage", "step"]] * 3
    with open(tmp_path / "demo_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["stage", "step", "loss", "kl"]
    assert [(r["stage"], r["step"], r["kl"]) for r in rows] == [("sft", "1", ""), ("sft", "2", ""), ("dpo", "1", "0.1")]
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "metrics.csv").exists()


def test_a_writer_name_must_be_a_file_stem(tmp_path):
    import pytest

    for bad in ("", "sub/metrics", 3):
        with pytest.raises(ValueError, match=r"name must be a file-name stem .*got"):
            MetricsWriter(tmp_path, name=bad, report_to=["jsonl"])


def test_summary_lines_go_to_jsonl_only_and_resume_drops_them(tmp_path):
    """A summary record is one strict-JSON line (NaN -> null, strings kept) after the rows, read
    back by read_metrics; the CSV and `rows` leave it out; a resume drops it (it has no step)."""
    import json

    with MetricsWriter(tmp_path, report_to=["jsonl", "csv"]) as w:
        w.log(1, {"loss": 1.0})
        w.summary({"accuracy": torch.tensor(0.75), "kl": float("nan"), "note": "held out"}, stage="DPO")
        w.summary({"seconds": 2.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    strict = [json.loads(line, parse_constant=_reject_constant) for line in lines]
    assert strict == read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 1.0},
        {"stage": "DPO", "summary": True, "accuracy": 0.75, "kl": None, "note": "held out"},
        {"summary": True, "seconds": 2.5},
    ]
    assert list(strict[1])[:2] == ["stage", "summary"]
    assert w.rows == [{"step": 1, "loss": 1.0}]
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{"step": "1", "loss": "1.0"}]
    with MetricsWriter(tmp_path, resume_step=1, report_to=["jsonl", "csv"]) as w:
        w.log(2, {"loss": 0.5})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


def _reject_constant(constant):
    raise AssertionError(f"not strict JSON: {constant}")


def test_staged_rows_reach_tensorboard_and_trackers_under_a_prefix(tmp_path, monkeypatch):
    """TensorBoard tags and tracker keys get "<stage>/": two stages' step 1 do not collide. A
    staged row goes to a tracker without `step=` (wandb ignores a step lower than its last) and
    with its step as "<stage>/step". Summaries reach wandb's run summary, not trackio."""
    import sys
    import types

    from tests.cli.test_cli_eval_logging import FakeTracker

    scalars = []

    class SummaryWriter:
        def __init__(self, log_dir):
            pass

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    fakes = {name: FakeTracker(name) for name in ("wandb", "trackio")}
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    fakes["wandb"].run = types.SimpleNamespace(summary={})
    with MetricsWriter(tmp_path, report_to=["tensorboard", "wandb", "trackio"]) as w:
        w.log(1, {"loss": 1.0}, stage="sft")
        w.log(1, {"loss": 2.0}, stage="dpo")
        w.log(3, {"loss": 3.0})
        w.summary({"accuracy": 0.5, "kl": float("nan")}, stage="dpo")
    assert scalars == [("sft/loss", 1.0, 1), ("dpo/loss", 2.0, 1), ("loss", 3.0, 3)]
    for name, module in fakes.items():
        assert [c for c in module.calls if c[0] == "log"] == [
            ("log", None, {"sft/loss": 1.0, "sft/step": 1}), ("log", None, {"dpo/loss": 2.0, "dpo/step": 1}),
            ("log", 3, {"loss": 3.0})], name
    assert fakes["wandb"].run.summary == {"dpo/accuracy": 0.5, "dpo/kl": None}
    assert not hasattr(fakes["trackio"], "run")
    assert not (tmp_path / "metrics.jsonl").exists()
