"""The benchmark harness keeps every row it measured: a failing candidate, a failing step
around a candidate (setup, accuracy columns) or a killed run loses no other row."""

import json

import pytest
import torch

from rftengine.bench import bench_generate, bench_logprobs, harness

# Tiny models and tensors: intra-op threads only add contention on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--quick", "--device", "cpu", "--warmup", "0", "--repeat", "1"]


def test_results_are_written_after_every_row(tmp_path):
    out = tmp_path / "suite.json"
    ceiling = {"matmul_tflops": 1.0, "matmul_dtype": "float32", "copy_gbps": 1.0}
    results = harness.Results("suite", ["name", "ms"], "cpu", ceiling, out)
    results.add({"name": "a", "ms": 1.0})
    assert [r["name"] for r in json.loads(out.read_text())["results"]] == ["a"]
    results.add({"name": "b", "ms": 2.0})
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["results"]] == ["a", "b"] and data["complete"] is False
    results.report()
    assert json.loads(out.read_text())["complete"] is True


def test_an_error_around_a_candidate_becomes_its_row():
    def broken():
        raise RuntimeError("setup exploded")

    rows = harness.attempt("cand", broken, shape="4x4")
    assert rows == [{"name": "cand", "ms": None, "peak_gib": None, "error": "RuntimeError: setup exploded",
                     "shape": "4x4"}]
    assert harness.attempt("ok", lambda: {"name": "ok", "ms": 1.0}) == [{"name": "ok", "ms": 1.0}]


def test_logprobs_accuracy_failure_keeps_the_other_rows(tmp_path, monkeypatch):
    calls = []

    def flaky_error(fn, logits, targets):
        calls.append(fn)
        if len(calls) == 1:  # the first candidate's accuracy column fails
            raise RuntimeError("accuracy probe failed")
        return 0.0

    monkeypatch.setattr(bench_logprobs, "logp_error", flaky_error)
    out = tmp_path / "logprobs.json"
    result = bench_logprobs.main(QUICK + ["--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert rows == result["results"]
    failed = [r for r in rows if r.get("error")]
    assert len(failed) == 1 and "accuracy probe failed" in failed[0]["error"]
    assert sum(r["ms"] is not None for r in rows) == len(rows) - 1


def test_generate_measures_rftengine_first_and_keeps_it_when_dlogp_fails(tmp_path, monkeypatch):
    def broken_dlogp(*args, **kwargs):
        raise RuntimeError("trainer forward failed")

    monkeypatch.setattr(bench_generate, "mean_abs_dlogp", broken_dlogp)
    out = tmp_path / "generate.json"
    bench_generate.main(QUICK + ["--batches", "2", "--anchors", "dynamic", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["engine"] for r in rows] == ["rftengine", "transformers (dynamic cache)"]
    ours, anchor = rows
    assert ours["ms_per_step"] is not None and "trainer forward failed" in ours["error"]
    assert anchor["ms_per_step"] is not None and "error" not in anchor
