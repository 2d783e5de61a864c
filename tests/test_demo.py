"""`rftengine demo --quick` runs every stage end to end and writes its plot and metrics."""

import csv
import importlib.util
import json
import subprocess
import sys

import pytest

from rftengine import demo


def test_quick_demo_end_to_end(tmp_path, capsys, monkeypatch):
    seen = []  # what a demo killed before its last stage leaves in demo_metrics.jsonl
    stage_cai = demo.stage_cai

    def watched_stage_cai(world):
        seen.extend(json.loads(line) for line in (tmp_path / "demo_metrics.jsonl").read_text().splitlines())
        return stage_cai(world)

    monkeypatch.setattr(demo, "stage_cai", watched_stage_cai)
    assert demo.main(["--quick", "--output-dir", str(tmp_path), "--seed", "0"]) == 0
    out = capsys.readouterr().out
    for stage in ("reward model", "PPO", "DPO", "RLAIF", "Constitutional AI"):
        assert stage in out
    png = tmp_path / "demo_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    records = [json.loads(line) for line in (tmp_path / "demo_metrics.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in records if not r.get("summary")}
    assert {"pretrain", "reward_model", "ppo", "dpo", "judge_sft", "rlaif", "cai"} <= stages
    summary = {r["stage"]: r for r in records if r.get("summary")}
    assert list(summary) == ["reward model", "PPO (reward model)", "DPO", "RLAIF (GRPO + judge)",
                             "Constitutional AI"]
    # Even the quick run moves every model toward the verifiable reward, away from its start.
    for name, row in summary.items():
        assert row["accuracy_after"] > row["accuracy_before"], name
        if name != "reward model":
            assert row["reward_after"] > row["reward_before"] + 0.05, name
            assert row["kl_after"] > 0.0, name
    # The steps were written as they came: the earlier stages' steps were there before the last began.
    assert {r["stage"] for r in seen} == {"pretrain", "reward_model", "ppo", "dpo", "judge_sft", "rlaif"}
    assert seen == records[:len(seen)]
    with open(tmp_path / "demo_metrics.csv", newline="") as f:
        steps = list(csv.DictReader(f))
    assert list(steps[0])[:2] == ["stage", "step"] and len(steps) == len(records) - len(summary)


def test_demo_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--seed", "-1", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        demo.main(["--threads", "0", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="threads"):
        demo.run_demo(tmp_path, threads=0)
    with pytest.raises(SystemExit):
        demo.main(["--report-to", "jsonl,wandbb", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"report_to: unknown destination 'cvs' \(did you mean 'csv'\?\)"):
        demo.run_demo(tmp_path, report_to=["jsonl", "cvs"])
    assert not any(tmp_path.iterdir())  # refused before anything ran


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="needs wandb absent")
def test_python_m_demo_reports_a_missing_tracker_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rftengine.demo", "--quick", "--report-to", "jsonl,wandb",
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "rftengine demo: error: report_to includes wandb, which is not installed: pip install wandb" in proc.stderr
