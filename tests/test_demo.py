"""`rftengine demo --quick` runs every stage end to end and writes its plot and metrics."""

import json

import pytest

from rftengine import demo


def test_quick_demo_end_to_end(tmp_path, capsys):
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


def test_demo_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--seed", "-1", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        demo.main(["--threads", "0", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="threads"):
        demo.run_demo(tmp_path, threads=0)
