"""bench_generate --long-tail --quick on CPU: the three engines run the long-tailed mix, each row
produces the lengths it was asked for, and the continuous rows carry their ratios to the anchors."""

import json

import pytest
import torch

from rftengine.bench import bench_generate

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--quick", "--long-tail", "--device", "cpu", "--warmup", "0", "--repeat", "1"]
ENGINES = (bench_generate.CONTINUOUS, bench_generate.NO_COMPACTION, bench_generate.HF_STATIC)


def test_long_tail_lengths_are_seeded_lognormal_and_capped():
    a = bench_generate.long_tail_lengths(4096, median=200, cap=1024, seed=3)
    assert torch.equal(a, bench_generate.long_tail_lengths(4096, median=200, cap=1024, seed=3))
    assert not torch.equal(a, bench_generate.long_tail_lengths(4096, median=200, cap=1024, seed=4))
    assert a.dtype == torch.int64 and int(a.min()) >= 1 and int(a.max()) == 1024
    assert 180 <= float(a.median()) <= 220
    # sigma 1: P(x > 5.12 x median) = P(z > 1.63), about 5% at the cap
    assert 0.03 < float((a == 1024).double().mean()) < 0.08


def test_quick_long_tail_runs_every_engine_at_the_requested_lengths(tmp_path):
    out = tmp_path / "generate_long_tail.json"
    result = bench_generate.main(QUICK + ["--out", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is True and data["results"] == result["results"]
    lengths = bench_generate.long_tail_lengths(16, median=200 / 32, cap=1024 // 32)
    setting = data["setting"]["lengths"]
    assert setting["total_tokens"] == int(lengths.sum()) and setting["max"] == int(lengths.max())
    rows = {(r["engine"], r["max_batch_size"]): r for r in data["results"]}
    assert set(rows) == {(engine, batch) for engine in ENGINES for batch in (4, 16)}
    for row in rows.values():
        assert "error" not in row, row
        assert row["lengths_ok"] is True and row["sequences"] == 16 and row["tokens"] == int(lengths.sum())
        assert row["tokens_per_second"] == pytest.approx(row["tokens"] / row["wall_s"])
    for batch in (4, 16):
        ours = rows[(bench_generate.CONTINUOUS, batch)]
        for key, anchor in (("x_no_compaction", bench_generate.NO_COMPACTION),
                            ("x_hf_static", bench_generate.HF_STATIC)):
            assert ours[key] == pytest.approx(ours["tokens_per_second"] / rows[(anchor, batch)]["tokens_per_second"])
        assert "target_met" not in ours  # a GPU target: not judged on the CPU


def test_a_wrong_length_is_flagged():
    lengths = torch.tensor([3, 5, 2])

    def row(produced, exact):
        return bench_generate.long_tail_row("e", 4, lambda: produced, lambda: None, lengths, exact=exact,
                                            repeat=1, device="cpu")

    assert row(lengths.clone(), exact=True)["lengths_ok"] is True
    assert row(lengths - 1, exact=True)["lengths_ok"] is False
    assert row(lengths + 1, exact=True)["lengths_ok"] is False
    # the static-cache anchor may run past a row's request (its batch's longest), never short of it
    longer = row(lengths + 1, exact=False)
    assert longer["lengths_ok"] is True and longer["tokens"] == 10
    assert row(lengths - 1, exact=False)["lengths_ok"] is False
