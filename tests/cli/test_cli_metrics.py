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
