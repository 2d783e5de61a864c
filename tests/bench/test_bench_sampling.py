"""bench_sampling --quick on CPU: a row per logits kind, mode and candidate, each drawing the
reference's tokens; the JSON is complete."""

import json

import pytest

from rftengine.bench import bench_sampling

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_run_has_every_mode_and_candidate(tmp_path):
    out = tmp_path / "sampling.json"
    result = bench_sampling.main(["--quick", "--device", "cpu", "--warmup", "0", "--repeat", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is True and data["results"] == result["results"]
    rows = {(r["logits"], r["mode"], r["name"]): r for r in data["results"]}
    assert set(rows) == {(kind, mode, name) for kind in ("zipf", "normal") for mode in bench_sampling.MODES
                         for name in ("rftengine", "torch reference")}
    for row in rows.values():
        assert "error" not in row, row
        assert row["ms"] > 0 and row["same_tokens"] == 1.0 and row["x_floor"] == row["ms"] / row["floor_ms"]
        assert row["shape"] == "5x1000"


def test_zipf_logits_are_heavy_tailed():
    """The zipf kind is the shape it claims: a few tokens hold most of the mass."""
    import torch

    p = torch.softmax(bench_sampling.make_logits("zipf", 4, 5000, torch.device("cpu")).float(), -1)
    top = p.sort(-1, descending=True).values
    assert (top[:, :50].sum(-1) > 0.5).all() and (top[:, :5].sum(-1) < 0.99).all()
