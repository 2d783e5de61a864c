"""Metrics of a training run: the destinations of `report_to` (JSONL, CSV, TensorBoard, Weights &
Biases, Trackio; by default JSONL, CSV and TensorBoard when installed) and a PNG plot at the end.

One row per optimizer step: {"step": N, <metric>: value, ...} with the metric names the methods
emit (`loss`, `reward`, `kl`, `rewards/accuracies` ...). On resume the rows after the
checkpoint's step are dropped, so the files read as one uninterrupted run. Evaluation rows carry
`eval/*` metrics (`eval/loss`, `eval/reward` ...), plotted beside their training curve. metrics.jsonl is the
record a resume reads back: a torn last line (a kill mid-write) is dropped with a note on
stderr. metrics.csv is never read back: a resume rewrites it whole from those rows, so a torn
CSV line goes with it.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from rftengine.config import REPORTERS
from rftengine.errors import UserError

JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"
PLOT_NAME = "metrics.png"

# Panels of the plot, in order: (title, candidate metric names; the first present is drawn).
# Each panel also draws the held-out curve of its metric (`eval/<name>`) when there is one.
PANELS = (
    ("reward", ("reward", "judge/score", "rewards/margins", "rewards/chosen")),
    ("KL", ("kl", "objective/kl")),
    ("loss", ("loss",)),
    ("accuracy", ("accuracy", "rewards/accuracies")),
)
# The held-out metric of a training metric whose eval name differs: rollout evaluations log
# `eval/reward` whatever the training reward is called.
EVAL_NAMES = {"judge/score": "eval/reward"}


def _scalar(value) -> float | None:
    """Python float of a number or a one-element tensor; None for anything else."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class MetricsWriter:
    """Appends one row per `log(step, metrics)` to the `report_to` destinations: `metrics.jsonl`
    and `metrics.csv` in `out_dir`, TensorBoard events in `out_dir/tensorboard`, a Weights &
    Biases or Trackio run (project `$WANDB_PROJECT` / `$TRACKIO_PROJECT`, default "rftengine";
    run name `run_name`, default the folder's name; `config`: the run's settings). The rows are
    kept in `rows` (for the plot) whatever the destinations.

    `report_to` None: JSONL, CSV, and TensorBoard when it is installed. A destination named
    in `report_to` whose package is missing is a UserError saying what to install.
    `tensorboard` (the deprecated switch) adds or removes TensorBoard. `resume_step`: keep the
    rows of an earlier run up to that step and continue after them; None starts fresh
    (existing files are replaced).
    """

    def __init__(self, out_dir: str | Path, *, resume_step: int | None = None,
                 report_to: list[str] | tuple[str, ...] | None = None, tensorboard: bool | None = None,
                 run_name: str | None = None, config: dict | None = None):
        reporters = list(report_to) if report_to is not None else ["jsonl", "csv"]
        unknown = [r for r in reporters if r not in REPORTERS]
        if unknown:
            raise UserError(f"report_to: unknown destination {unknown[0]!r}; choose from {', '.join(REPORTERS)}")
        if tensorboard is not None:
            reporters = [r for r in reporters if r != "tensorboard"] + (["tensorboard"] if tensorboard else [])
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / JSONL_NAME
        self.csv_path = self.out_dir / CSV_NAME
        self.rows: list[dict] = []
        if resume_step is not None and self.jsonl_path.is_file():
            self.rows = [r for r in read_metrics(self.jsonl_path) if r.get("step", math.inf) <= resume_step]
        self.write_jsonl, self.write_csv = "jsonl" in reporters, "csv" in reporters
        if self.write_jsonl:
            self.jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.columns: list[str] = []
        if self.write_csv:
            self._rewrite_csv()
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8") if self.write_jsonl else None
        self.tb = None
        if "tensorboard" in reporters or (report_to is None and tensorboard is None):
            # The default takes TensorBoard only when installed; asked for by name, it must be.
            self.tb = _tensorboard_writer(self.out_dir / "tensorboard", required="tensorboard" in reporters)
        name = run_name or self.out_dir.resolve().name
        self.trackers = [_tracker(kind, name, config or {}) for kind in ("wandb", "trackio") if kind in reporters]

    def log(self, step: int, metrics: dict) -> dict:
        row = {"step": int(step)}
        for key, value in metrics.items():
            scalar = _scalar(value)
            if scalar is not None:
                row[key] = scalar
        self.rows.append(row)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self.write_csv:
            if any(k not in self.columns for k in row):
                self._rewrite_csv()  # a new metric (the first eval/* row): widen the header
            else:
                with self.csv_path.open("a", newline="", encoding="utf-8") as f:
                    csv.DictWriter(f, self.columns).writerow(row)
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(key, value, step)
        values = {k: v for k, v in row.items() if k != "step"}
        for tracker in self.trackers:
            tracker.log(values, step=row["step"])
        return row

    def _rewrite_csv(self) -> None:
        for row in self.rows:
            self.columns += [k for k in row if k not in self.columns]
        if "step" in self.columns:
            self.columns.remove("step")
        self.columns.insert(0, "step")
        with self.csv_path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self.tb is not None:
            self.tb.close()
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _tensorboard_writer(log_dir: Path, required: bool):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        if required:
            raise UserError("report_to includes tensorboard, which is not installed: pip install tensorboard") from None
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _tracker(kind: str, name: str, config: dict):
    """The `wandb` or `trackio` module with a run started (both take `init(project, name,
    config)`, `log(values, step=)` and `finish()`); a missing package is a UserError."""
    import importlib
    import os

    try:
        module = importlib.import_module(kind)
    except ImportError:
        raise UserError(f"report_to includes {kind}, which is not installed: pip install {kind}") from None
    project = os.environ.get(f"{kind.upper()}_PROJECT", "rftengine")
    module.init(project=project, name=name, config=config)
    return module


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl. A last line that does not parse is what a kill mid-write
    leaves: it is dropped, with a note on stderr. A broken line before it is a UserError naming
    the file and line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                print(f"rftengine: warning: {path}: dropped a torn last line {number} ({exc.msg}), "
                      "left by a run killed while writing it", file=sys.stderr, flush=True)
                break
            raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def plot_metrics(rows: list[dict], path: str | Path, title: str = "") -> Path | None:
    """PNG of the main curves (reward, KL, loss, accuracy) against step, each panel with its
    held-out curve (`eval/...`, see EVAL_NAMES) when the run evaluated; panels without data are
    left out. Returns the path, or None when no panel has data."""
    panels = []
    for name, candidates in PANELS:
        key = next((k for k in candidates if any(k in r for r in rows)), None)
        if key is not None:
            panels.append((name, key))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (name, key) in zip(axes[0], panels):
        for label in (key, EVAL_NAMES.get(key, f"eval/{key}")):
            points = [(r["step"], r[label]) for r in rows if label in r]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=label,
                        marker="." if len(points) < 50 else None)
        if any(k.startswith("eval/") for r in rows for k in r):
            ax.legend(fontsize=8)
        ax.set_title(f"{name} ({key})", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
