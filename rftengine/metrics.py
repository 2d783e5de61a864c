"""Metrics of a training run: the destinations of `report_to` (JSONL, CSV, TensorBoard, Weights &
Biases, Trackio; by default JSONL, CSV and TensorBoard when installed) and a PNG plot at the end.

One row per optimizer step: {"step": N, <metric>: value, ...} with the metric names the methods
emit (`loss`, `reward`, `kl`, `rewards/accuracies` ...). On resume the rows after the
checkpoint's step are dropped, so the files read as one uninterrupted run. Evaluation rows carry
`eval/*` metrics (`eval/loss`, `eval/reward` ...), plotted beside their training curve. metrics.jsonl is the
record a resume reads back: a torn last line (a kill mid-write) is dropped with a note on
stderr. metrics.csv is never read back: a resume rewrites it whole from those rows, so a torn
CSV line goes with it.

A writer may also tag its rows with a stage (a run of several trainings, such as the demo:
`log(step, metrics, stage=...)`, a "stage" column) and end with summary records (`summary`:
one `{"summary": true, ...}` line each, JSONL only), under a file-name stem of its own (`name`).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from rftengine.config import check_report_to
from rftengine.errors import UserError

STEM = "metrics"  # the files' stem when the writer is given no `name`
JSONL_NAME = f"{STEM}.jsonl"
CSV_NAME = f"{STEM}.csv"
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
    """Appends one row per `log(step, metrics)` to the `report_to` destinations: `<name>.jsonl`
    and `<name>.csv` in `out_dir` (default `metrics.jsonl`, `metrics.csv`), TensorBoard events in
    `out_dir/tensorboard`, a Weights & Biases or Trackio run (project `$WANDB_PROJECT` /
    `$TRACKIO_PROJECT`, default "rftengine"; run name `run_name`, default the folder's name;
    `config`: the run's settings). The rows are kept in `rows` (for the plot) whatever the
    destinations; summary records (`summary`) are not.

    `report_to` None: JSONL, CSV, and TensorBoard when it is installed. A destination named
    in `report_to` whose package is missing is a UserError saying what to install.
    `tensorboard` (the deprecated switch) adds or removes TensorBoard. `resume_step`: keep the
    rows of an earlier run up to that step and continue after them, dropping its summary
    records; None starts fresh (existing files are replaced). Rows tagged with a stage are cut
    by step alone, whatever their stage: a run of several stages (the demo) does not resume.
    """

    def __init__(self, out_dir: str | Path, *, resume_step: int | None = None,
                 report_to: list[str] | tuple[str, ...] | None = None, tensorboard: bool | None = None,
                 run_name: str | None = None, config: dict | None = None, name: str = STEM):
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise ValueError(f"name must be a file-name stem such as {STEM!r} (no folder), got {name!r}")
        if report_to is None:
            reporters = ["jsonl", "csv"]
        else:
            reporters = check_report_to(list(report_to) if isinstance(report_to, tuple) else report_to, None)
        if tensorboard is not None:
            reporters = [r for r in reporters if r != "tensorboard"] + (["tensorboard"] if tensorboard else [])
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / f"{name}.jsonl"
        self.csv_path = self.out_dir / f"{name}.csv"
        self.rows: list[dict] = []
        if resume_step is not None and self.jsonl_path.is_file():
            self.rows = [r for r in read_metrics(self.jsonl_path)
                         if not r.get("summary") and r.get("step", math.inf) <= resume_step]
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

    def log(self, step: int, metrics: dict, *, stage: str | None = None) -> dict:
        """Append the scalars of `metrics` (numbers, one-element tensors; anything else is left
        out) as the row of `step`, tagged with `stage` when given: a "stage" column in the JSONL
        and the CSV, "<stage>/<metric>" in TensorBoard and the trackers. Returns the row."""
        row = {"step": int(step)} if stage is None else {"stage": stage, "step": int(step)}
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
        values = _prefixed({k: v for k, v in row.items() if k not in ("stage", "step")}, stage)
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, row["step"])
        if stage is not None:
            # Each stage counts its steps from 1, and wandb ignores a step lower than its last:
            # the tracker counts the rows itself, and the stage's step is a metric of the row.
            values[f"{stage}/step"] = row["step"]
        for tracker in self.trackers:
            if stage is None:
                tracker.log(values, step=row["step"])
            else:
                tracker.log(values)
        return row

    def summary(self, record: dict, *, stage: str | None = None) -> dict:
        """Write `record` (a run's end results: numbers, one-element tensors, strings) as one
        `{"stage": stage, "summary": true, ...}` JSONL line (no "stage" when None), NaN and
        infinities as null so that the line is strict JSON. The CSV holds step rows only and
        leaves it out; so do TensorBoard and Trackio; a wandb run gets it in its run summary
        (keys "<stage>/<key>"). Returns the line's record."""
        line = {"summary": True} if stage is None else {"stage": stage, "summary": True}
        for key, value in record.items():
            scalar = _scalar(value)
            if scalar is not None:
                value = scalar if math.isfinite(scalar) else None
            line[key] = value
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(line) + "\n")
            self._jsonl.flush()
        values = _prefixed({k: v for k, v in line.items() if k not in ("stage", "summary")}, stage)
        for tracker in self.trackers:
            if tracker.__name__ == "wandb":
                tracker.run.summary.update(values)
        return line

    def _rewrite_csv(self) -> None:
        for row in self.rows:
            self.columns += [k for k in row if k not in self.columns]
        # "stage" (when any row has one) and "step" lead, in the JSONL's order.
        leading = (["stage"] if "stage" in self.columns else []) + ["step"]
        self.columns = leading + [k for k in self.columns if k not in leading]
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


def _prefixed(values: dict, stage: str | None) -> dict:
    """`values` with keys "<stage>/<key>" (unchanged when `stage` is None)."""
    return values if stage is None else {f"{stage}/{k}": v for k, v in values.items()}


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
    """The records of a metrics JSONL: its rows, then any summary records (`"summary": true`,
    no step; see `MetricsWriter.summary`). A last line that does not parse is what a kill mid-write
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
