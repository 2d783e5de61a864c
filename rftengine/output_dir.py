"""A failed run leaves no empty output_dir behind: the directory (and the parents made for it)
is removed when the run that created it fails before writing anything of value."""

from __future__ import annotations

import shutil
from pathlib import Path

from rftengine.checkpoint import list_checkpoints
from rftengine.metrics import JSONL_NAME

FINAL_DIR = "final"  # output_dir/final: the exported model


def first_missing(output_dir: Path) -> Path | None:
    """The outermost directory of ``output_dir``'s path that does not exist yet (what making
    ``output_dir`` creates), None when ``output_dir`` exists."""
    if output_dir.exists():
        return None
    top = output_dir
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def holds_results(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds something a user would want: a checkpoint, the export or a
    logged metric row (the config, an empty metrics file or a TensorBoard header do not count)."""
    if list_checkpoints(output_dir) or (output_dir / FINAL_DIR).exists():
        return True
    metrics = output_dir / JSONL_NAME
    return metrics.is_file() and metrics.stat().st_size > 0


def remove_if_unused(output_dir: Path, created: Path | None) -> bool:
    """After a failed run: remove ``created`` (``first_missing(output_dir)`` taken before the
    run started) when the run made it and ``output_dir`` holds no results. A directory that
    existed before the run is never touched. Returns whether anything was removed."""
    if created is None or not output_dir.is_dir() or holds_results(output_dir):
        return False
    shutil.rmtree(output_dir, ignore_errors=True)
    parent = output_dir.parent
    while created in (parent, *parent.parents):  # the parents made for it, while empty
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent
    return True
