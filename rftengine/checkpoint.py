"""Checkpoints that survive crashes, exact resume, and the final export.

A checkpoint is a Hugging Face model directory (safetensors weights, config, tokenizer) plus
`trainer_state.pt` (optimizer, scheduler, data position, step and whatever else the method's
train state holds, with the RNG states of python, numpy, torch CPU and CUDA) and
`rftengine_checkpoint.json` (method, step, format version), written last. The checkpoint of a
LoRA run holds its adapters (adapter_config.json, adapter_model.safetensors) instead of the
full weights: the base is the run's `model`, which a resumed run wraps again.

Writing goes into a hidden temporary directory beside the final one; every file is fsynced and
the directory is then renamed into place, so a crash at any moment leaves either the previous
checkpoints untouched or the new one complete, never a half-written `checkpoint-N`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rftengine.config import UserError

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
MARKER = "rftengine_checkpoint.json"
STATE_FILE = "trainer_state.pt"
ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes beside the adapter weights
FORMAT_VERSION = 1
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "adapter_model.safetensors")


# ---------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from: python, numpy, torch CPU and (if present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Model directories


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """A local Hugging Face model directory with a config and weights, or a UserError saying which is missing."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} directory not found: {path}")
    if not path.is_dir():
        raise UserError(f"{what} must be a Hugging Face model directory, got a file: {path}")
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        raise UserError(f"{what} directory {path} has no config.json: not a Hugging Face model directory")
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise UserError(
            f"{what} directory {path} has no weights (expected model.safetensors, a sharded "
            "model-*.safetensors with its index, or pytorch_model.bin)"
        )
    return path


def check_tokenizer_dir(path: str | Path, what: str = "tokenizer") -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{what} directory not found: {path}")
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / n).is_file() for n in names):
        raise UserError(f"{what} directory {path} has no tokenizer files ({', '.join(names)})")
    return path


# ---------------------------------------------------------------------------------------------
# Writing


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_of(path: Path) -> int | None:
    suffix = path.name[len(PREFIX):]
    return int(suffix) if path.name.startswith(PREFIX) and suffix.isdigit() else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with the marker file) in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _step_of(p) is not None and (p / MARKER).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Atomically put `tmp` at `final`; an existing `final` is moved aside first and then removed."""
    parent = final.parent
    old = None
    if final.exists():
        old = parent / f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_atomically(final: Path, write) -> Path:
    """Run `write(tmp_dir)` into a hidden sibling of `final`, fsync it, rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@contextmanager
def quiet_transformers():
    """No transformers progress bars inside (they would interleave with the training bar)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_model_dir(path: Path, model, tokenizer) -> None:
    """Weights as safetensors, config and tokenizer files: a directory `from_pretrained` reads."""
    with quiet_transformers():
        model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def save_checkpoint(
    output_dir: str | Path,
    *,
    step: int,
    method: str,
    model,
    tokenizer,
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write `output_dir/checkpoint-<step>` atomically and keep only the newest `keep_last`.

    `state` is everything besides the policy weights that resuming needs (the method's train
    state: optimizer, scheduler, data position, value head, KL controller ...); the RNG states
    are added here, at the moment of saving.
    """
    output_dir = Path(output_dir)
    _remove_stale_tmp(output_dir)
    payload = {"state": state, "rng": rng_state(), "step": step, "method": method}
    marker = {"method": method, "step": step, "format_version": FORMAT_VERSION}

    def write(tmp: Path) -> None:
        save_model_dir(tmp, model, tokenizer)
        torch.save(payload, tmp / STATE_FILE)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    final = _write_atomically(output_dir / f"{PREFIX}{step}", write)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _remove_stale_tmp(output_dir: Path) -> None:
    """Leftovers of a writer that died mid-checkpoint (one writer per output_dir)."""
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            if p.is_dir() and p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class Checkpoint:
    """A loaded checkpoint: `path` is also a model directory for `from_pretrained`."""

    path: Path
    step: int
    method: str
    state: dict[str, Any]
    rng: dict[str, Any]

    def restore_rng(self) -> None:
        set_rng_state(self.rng)


def resolve_resume(target: str | Path) -> Path:
    """A checkpoint directory, or an output directory whose newest checkpoint is taken."""
    target = Path(target)
    if (target / MARKER).is_file():
        return target
    if not target.exists():
        raise UserError(f"resume: directory not found: {target}")
    latest = latest_checkpoint(target)
    if latest is None:
        raise UserError(f"resume: no complete checkpoint in {target} (expected {PREFIX}<step>/{MARKER})")
    return latest


def load_checkpoint(path: str | Path, method: str) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; a checkpoint of another method is an error."""
    path = Path(path)
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise UserError(f"{path} is not a complete rftengine checkpoint (no {MARKER})")
    try:
        marker = json.loads(marker_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{marker_path}: unreadable checkpoint marker ({exc.msg})") from None
    if marker.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: checkpoint format version {marker.get('format_version')!r}, this rftengine reads {FORMAT_VERSION}"
        )
    if marker.get("method") != method:
        raise UserError(
            f"{path} is a checkpoint of method '{marker.get('method')}', but this run's method is '{method}'; "
            "resume with the config that wrote it, or start a new output_dir"
        )
    check_model_dir(path, "checkpoint")
    # weights_only=False: the payload holds numpy/python RNG states; the file is our own checkpoint.
    payload = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return Checkpoint(path=path, step=int(payload["step"]), method=method, state=payload["state"], rng=payload["rng"])


# ---------------------------------------------------------------------------------------------
# Export


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def export_model(model, tokenizer, out_dir: str | Path, merge_lora: bool = False) -> Path:
    """The final policy as a plain Hugging Face directory, written atomically.

    A PEFT LoRA model is saved as its adapter directory (adapter_config.json naming the base,
    adapter_model.safetensors; peft's `AutoPeftModelForCausalLM.from_pretrained(out_dir)` loads
    it) unless `merge_lora`, which first folds the adapters into the base weights
    (`merge_and_unload`, which changes the in-memory model) and saves a plain model directory
    that `AutoModelForCausalLM.from_pretrained` loads without peft. A model without adapters is
    saved as is.
    """
    if merge_lora and _is_peft(model):
        model = model.merge_and_unload()
    return _write_atomically(Path(out_dir), lambda tmp: save_model_dir(tmp, model, tokenizer))
