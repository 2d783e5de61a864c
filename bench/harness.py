"""Shared benchmark harness: timing, peak memory, hardware ceilings, JSON + table output.

Every bench script measures its candidates with `measure`, measures the device ceilings in
the same run (`ceilings`), and collects its rows in `Results`, which rewrites the JSON after
every row (a run killed by its time limit keeps what it measured) and prints the table at the
end. A candidate that fails, or fails in the work around it (its inputs, an accuracy column),
becomes a row with an ``error`` (`measure`, `attempt`): the suite goes on. On CPU the figures
are smoke numbers only (they prove the code runs); speed claims come from CUDA runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

GIB = 1024**3


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test that runs anywhere")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs; the median is reported")
    parser.add_argument("--out", type=Path, default=None, help="JSON results path (default: print only)")
    return parser


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, repeat: int = 10) -> float:
    """Median wall time of `fn` in ms: CUDA events on GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_extra_gib(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak device memory during one call of `fn` above what was allocated before it (CUDA only)."""
    if torch.device(device).type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def error_row(name: str, err: BaseException, **extra) -> dict:
    """The row of a candidate that failed: its traceback goes to the log, the error into the row.
    Call it from the `except` clause; it frees what the failed work left allocated."""
    _release_memory()
    if isinstance(err, torch.OutOfMemoryError):
        error = "out of memory"
    else:
        traceback.print_exc()
        error = f"{type(err).__name__}: {err}"[:500]
    return {"name": name, "ms": None, "peak_gib": None, "error": error, **extra}


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(name: str, fn: Callable[[], object], device, warmup: int = 3, repeat: int = 10, **extra) -> dict:
    """One row of results: name, median ms and peak extra GiB, plus any extra fields."""
    try:
        peak = peak_extra_gib(fn, device)
        ms = time_ms(fn, device, warmup, repeat)
    except Exception as err:  # noqa: BLE001
        # One failing candidate (an anchor library's changed API, a kernel that fails to compile,
        # out of memory) must not lose the rest of a GPU session's rows.
        return error_row(name, err, **extra)
    finally:
        _release_memory()
    return {"name": name, "ms": ms, "peak_gib": peak, **extra}


def attempt(name: str, build: Callable[[], dict | list[dict]], **extra) -> list[dict]:
    """The rows `build` returns (one dict or a list), or one error row named `name` if it raises.

    For the work around `measure`: a shape's inputs (out of memory), accuracy columns, derived
    figures. An exception there must cost that candidate's row, not the suite.
    """
    try:
        rows = build()
    except Exception as err:  # noqa: BLE001
        return [error_row(name, err, **extra)]
    return [rows] if isinstance(rows, dict) else list(rows)


def ceilings(device, quick: bool = False) -> dict:
    """Measured bf16 matmul rate (TFLOP/s) and device copy bandwidth (GB/s, read + written)."""
    dev = torch.device(device)
    n = 1024 if quick or dev.type != "cuda" else 8192
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    mm_ms = time_ms(lambda: a @ b, dev, warmup=2, repeat=5 if quick else 20)
    numel = (1 << 22) if quick or dev.type != "cuda" else (1 << 28)
    src = torch.randn(numel, device=dev, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), dev, warmup=2, repeat=5 if quick else 20)
    return {
        "matmul_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "copy_gbps": 2 * src.numel() * src.element_size() / (copy_ms * 1e-3) / 1e9,
    }


def environment(device) -> dict:
    dev = torch.device(device)
    info = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for module in ("triton", "transformers", "liger_kernel"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # optional packages: absent or broken installs are simply not reported
            continue
    return info


def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    grid = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Results:
    """The rows of one suite, written to `out` (JSON) after every row with ``complete: false``;
    `report` prints the table and writes the final file with ``complete: true``."""

    def __init__(self, suite: str, columns: list[str], device, ceiling: dict, out: Path | None):
        self.suite, self.columns, self.device, self.out = suite, columns, device, out
        self.rows: list[dict] = []
        self.result = {"suite": suite, "environment": environment(device), "ceilings": ceiling,
                       "results": self.rows, "complete": False}

    def add(self, *rows: dict) -> None:
        self.rows.extend(rows)
        self.write()

    def write(self) -> None:
        """Rewrite the JSON (atomically: a kill mid-write leaves the previous file)."""
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=2) + "\n")
        os.replace(tmp, self.out)

    def report(self) -> dict:
        """Print the table (with a CPU caveat) and write the final JSON when `out` is given."""
        result, ceiling = self.result, self.result["ceilings"]
        result["complete"] = True
        print(f"\n== {self.suite} on {result['environment']['device']} ==")
        print(
            f"ceilings: matmul {ceiling['matmul_tflops']:.3g} TFLOP/s ({ceiling['matmul_dtype']}), "
            f"copy {ceiling['copy_gbps']:.4g} GB/s"
        )
        print(format_table(self.rows, self.columns))
        if torch.device(self.device).type != "cuda":
            print("note: CPU run: only smoke figures are meaningful here; speed is measured on CUDA.")
        if self.out is not None:
            self.write()
            print(f"wrote {self.out}")
        return result

