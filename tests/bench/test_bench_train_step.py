"""bench_train_step --quick on CPU: one row per method and candidate, the first-step losses of
rftengine's fused heads and of the TRL-style loop agree (same weights, same inputs), and a
failing candidate costs its own rows only."""

import json
import math

import pytest
import torch

from rftengine.bench import bench_train_step

# Tiny models and tensors: intra-op threads only add contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--quick", "--device", "cpu", "--warmup", "0", "--repeat", "1"]


def _rows(data):
    return {(r["method"], r["name"]): r for r in data["results"]}


def test_quick_rows_for_every_candidate_and_the_losses_agree(tmp_path):
    out = tmp_path / "train_step.json"
    result = bench_train_step.main(QUICK + ["--out", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is True and data["results"] == result["results"]
    names = [c.name for c in bench_train_step.candidates(torch.device("cpu"), quick=True)]
    assert names[:2] == ["rftengine", "trl-style"]
    rows = _rows(data)
    assert set(rows) == {(m, n) for m in ("dpo", "grpo") for n in names}
    for row in rows.values():
        assert "error" not in row, row
        assert row["ms"] > 0 and row["tokens_per_second"] > 0 and math.isfinite(row["loss"])
    for method in ("dpo", "grpo"):
        ours, trl = rows[(method, "rftengine")], rows[(method, "trl-style")]
        assert trl["speedup"] == 1.0 and trl["loss_err"] == 0.0
        assert ours["speedup"] == pytest.approx(trl["ms"] / ours["ms"])
        # same weights, same inputs, fp32 on CPU: the loss math is the same to fp32 rounding
        assert ours["loss_err"] == pytest.approx(abs(ours["loss"] - trl["loss"]), abs=1e-12)
        assert ours["loss_err"] <= 1e-5 * max(1.0, abs(trl["loss"])), (method, ours["loss"], trl["loss"])
        assert ours["tokens"] == trl["tokens"] == data["setting"][method]["tokens_per_step"]
    # the losses are not trivially equal: DPO starts near log 2, GRPO's weights step apart
    assert abs(rows[("dpo", "rftengine")]["loss"] - math.log(2)) < 0.5
    assert data["setting"]["precision"] == "fp32"


def test_a_failing_candidate_becomes_its_own_row(tmp_path, monkeypatch):
    real = bench_train_step.candidates

    def broken_head(method, batch, compute_dtype):
        raise TypeError("__init__() got an unexpected keyword argument 'use_ref_model'")

    def with_broken(*args, **kwargs):
        return [*real(*args, **kwargs), bench_train_step.Candidate("broken anchor", broken_head, bench_train_step.METHODS)]

    monkeypatch.setattr(bench_train_step, "candidates", with_broken)
    out = tmp_path / "train_step.json"
    bench_train_step.main(QUICK + ["--methods", "grpo", "--out", str(out)])
    rows = _rows(json.loads(out.read_text()))
    assert set(rows) == {("grpo", "rftengine"), ("grpo", "trl-style"), ("grpo", "broken anchor")}
    broken = rows[("grpo", "broken anchor")]
    assert broken["ms"] is None and "unexpected keyword argument 'use_ref_model'" in broken["error"]
    assert all("error" not in rows[("grpo", n)] for n in ("rftengine", "trl-style"))
