"""`rftengine bench --quick` and `rftengine demo --quick` through main(), as a user types them."""

import pytest

from rftengine.cli import main
from rftengine.cli.bench import BENCH_SUITES, _bench_module


def test_every_benchmark_module_is_present():
    for names in BENCH_SUITES.values():
        for name in names:
            assert callable(_bench_module(name).main), f"rftengine.bench.{name} is missing"


def test_bench_quick_all_suites(capsys, tmp_path):
    assert main(["bench", "--quick", "--warmup", "0", "--repeat", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for names in BENCH_SUITES.values():
        for name in names:
            assert f"### {name} --quick --warmup 0 --repeat 1" in out
            assert (tmp_path / f"{name}.json").is_file()
    assert "only the smoke figures" in out


def test_bench_unknown_suite_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--suite", "everything"])
    assert exc.value.code == 2 and "invalid choice: 'everything'" in capsys.readouterr().err


def test_full_size_bench_on_cpu_is_refused_with_a_hint(capsys):
    assert main(["bench", "--suite", "losses", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "need a CUDA GPU" in err and "got device cpu" in err and "--quick" in err


def test_demo_quick(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--output-dir", "out"]) == 0
    assert capsys.readouterr().out.strip()
    assert (tmp_path / "out" / "demo_metrics.jsonl").stat().st_size > 0
    assert (tmp_path / "out" / "demo_curves.png").read_bytes()[:4] == b"\x89PNG"
