"""Checkpoints that survive crashes, exact resume, and the final export.

A checkpoint is a Hugging Face model directory (safetensors weights, config, tokenizer) plus
`trainer_state.pt` (optimizer, scheduler, data position, step and whatever else the method's
train state holds, with the RNG states of python, numpy, torch CPU and CUDA) and
`rftengine_checkpoint.json` (method, step, format version), written last. The checkpoint of a
LoRA run holds its adapters (adapter_config.json, adapter_model.safetensors) instead of the
full weights: the base is the run's `model`, which a resumed run wraps again.

`trainer_state.pt` holds plain data only (tensors, numbers, strings, lists, dicts) and is read
with `torch.load(weights_only=True)`: resuming from a checkpoint someone else wrote cannot run
code. Tensors that stay fixed for a stretch of the run (`FixedTensors` in the state's `extra`,
the weights of CAI's stage reference) go to `<name>.safetensors` beside it instead: written by
the first checkpoint that holds them and hard-linked (copied where links are not supported)
into each later checkpoint with the same key. So they are on disk once, yet every checkpoint is
complete on its own: pruning an older one removes a link, not the data.

Writing goes into a hidden temporary directory beside the final one; every file is fsynced and
read back (safetensors headers, the state's zip directory), and the directory is then renamed
into place, so a crash at any moment leaves either the previous checkpoints untouched or the new
one complete, never a half-written `checkpoint-N`. Pruning renames a checkpoint to a hidden name
before deleting it, for the same reason. A full disk is a one-line error that keeps the
previous checkpoints; weights holding NaN or inf are never written.

Under torchrun (several ranks, FSDP2) a checkpoint is sharded instead (`save_sharded_checkpoint`):
`shards/` (torch.distributed.checkpoint, each rank writing its part of the weights and optimizer
state), the same `trainer_state.pt` less the optimizer, config and tokenizer; its marker, written
by rank 0 once every rank's shards are on disk, records the world size. It resumes at any world
size, one process included (the shards are resharded on load).

Resuming from an output directory takes the newest checkpoint that loads, and says which newer
ones it skipped and why (`load_resume`); a checkpoint named explicitly must load.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import sys
import uuid
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rftengine.errors import UserError
from rftengine.methods.train_state import FixedTensors, capture_rng_state, restore_rng_state
from rftengine.methods.model_source import ADAPTER_CONFIG  # noqa: F401 - re-exported (the CLI, the tests)
from rftengine.methods.model_source import resolve_model, resolve_tokenizer_dir

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
MARKER = "rftengine_checkpoint.json"
STATE_FILE = "trainer_state.pt"
SHARDS_DIR = "shards"  # a sharded checkpoint's weights and optimizer state (torch.distributed.checkpoint)
CRITIC_DIR = "critic"  # the export's PPO critic, beside the policy in output_dir/final
README = "README.md"  # the export's note: where the model is and how to load it (`model_card`)
FORMAT_VERSION = 2  # 2: trainer_state.pt is plain data (weights_only), FixedTensors as safetensors


# ---------------------------------------------------------------------------------------------
# Model directories


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """The local directory of a model given as a directory, a hub id in the local Hugging Face
    cache or a PEFT adapter directory, checked by the one model-directory check
    (`methods.model_source.resolve_model`: config, weights, safetensors headers, an adapter's
    base too; a "checkpoint" is a directory only); a UserError saying what is wrong."""
    try:
        # A checkpoint is a directory, and a LoRA checkpoint's base is the run's `model`, checked as such.
        return resolve_model(path, what, hub=what != "checkpoint", adapters=what != "checkpoint", weights=True).path
    except ValueError as exc:
        raise UserError(str(exc)) from None


def check_tokenizer_dir(path: str | Path, what: str = "tokenizer") -> Path:
    """The directory of a tokenizer given as a directory, a cached hub id or an adapter
    directory (its base's tokenizer when it has none), or a UserError."""
    try:
        return resolve_tokenizer_dir(path, what)
    except ValueError as exc:
        raise UserError(str(exc)) from None


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


def _hide(path: Path) -> Path:
    """Rename `path` to a hidden temporary sibling (one atomic step) and return the new name."""
    hidden = path.parent / f"{TMP_PREFIX}old-{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, hidden)
    return hidden


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory so that a kill at any moment leaves no half-deleted
    `checkpoint-N` that still looks complete: hidden first, then removed (a leftover hidden
    directory is cleared by the next writer)."""
    hidden = _hide(path)
    _fsync_dir(path.parent)
    shutil.rmtree(hidden, ignore_errors=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Atomically put `tmp` at `final`; an existing `final` is moved aside first and then removed."""
    parent = final.parent
    old = _hide(final) if final.exists() else None
    os.replace(tmp, final)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _write_atomically(final: Path, write) -> Path:
    """Run `write(tmp_dir)` into a hidden sibling of `final`, fsync it, rename it into place.

    A full disk (or quota) is a UserError naming the directory; the temporary directory is
    removed and whatever was at `final` before is untouched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise UserError(
                f"{os.strerror(exc.errno).lower()} while writing {final.name} in output_dir {final.parent}: "
                "nothing was replaced and the previous checkpoints are kept; free some space and resume"
            ) from None
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


def require_finite_weights(model, what: str) -> None:
    """UserError naming the first parameter or buffer of `model` that holds NaN or inf: such
    weights are never written (`what` names what was about to be written). One host sync."""
    tensors = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
    if not tensors:
        return
    device = tensors[0][1].device
    finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in tensors]).cpu()
    if not bool(finite.all()):
        name = tensors[int((~finite).nonzero()[0])][0]
        raise UserError(
            f"refusing to write {what}: weight {name} holds NaN or inf values (the training diverged); "
            "the previous checkpoints are kept"
        )


_PLAIN_SCALARS = (int, float, str, bool, type(None))
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _require_plain(obj, where: str) -> None:
    """ValueError naming the first entry of `obj` that `torch.load(weights_only=True)` would
    refuse, before anything is written (rather than a checkpoint that fails at resume)."""
    # Exact types: a subclass (numpy's float64, an IntEnum) pickles as its own class, which
    # weights_only refuses.
    if type(obj) in _PLAIN_SCALARS or type(obj) in (torch.Tensor, torch.nn.Parameter):
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if not isinstance(key, (int, str)):
                raise ValueError(f"trainer state {where} has a key of type {type(key).__name__}: {key!r}")
            _require_plain(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            _require_plain(value, f"{where}[{i}]")
        return
    raise ValueError(
        f"trainer state {where} is a {type(obj).__name__}: a checkpoint holds plain data only "
        "(tensors, numbers, strings, lists, dicts; FixedTensors directly in extra)"
    )


def _split_fixed(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, FixedTensors]]:
    """`state` with each `FixedTensors` in `state["extra"]` replaced by a reference to the file
    that holds it (`{"type": "FixedTensors", "file": "<name>.safetensors", "key": key}`), and
    those FixedTensors by file name."""
    extra = state.get("extra") if isinstance(state, Mapping) else None
    if not isinstance(extra, Mapping):
        return dict(state), {}
    fixed, plain_extra = {}, {}
    for name, value in extra.items():
        if isinstance(value, FixedTensors):
            if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
                raise ValueError(f"trainer state extra key {name!r} holds FixedTensors but is not a file name")
            file = f"{name}.safetensors"
            fixed[file] = value
            plain_extra[name] = {"type": "FixedTensors", "file": file, "key": value.key}
        else:
            plain_extra[name] = value
    return {**state, "extra": plain_extra}, fixed


def _fixed_key(path: Path) -> str | None:
    """The key a FixedTensors file was written with, or None (no file, or not a readable one)."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("key")
    except Exception:  # noqa: BLE001 - a damaged earlier file is simply written anew
        return None


def _write_fixed(dest: Path, fixed: FixedTensors, previous: Path | None) -> None:
    """`fixed` as safetensors at `dest`: a hard link to the previous checkpoint's file when that
    holds the same key (a copy where the filesystem has no hard links), else written anew."""
    from safetensors.torch import save_file

    source = previous / dest.name if previous is not None else None
    if source is not None and _fixed_key(source) == fixed.key:
        try:
            os.link(source, dest)
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise
            shutil.copyfile(source, dest)
        return
    # safetensors refuses tensors that share memory (tied embeddings): each view is stored once
    # and the names that alias it are listed in the metadata.
    tensors, aliases, seen = {}, {}, {}
    for name, t in fixed.tensors.items():
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and view in seen:
            aliases[name] = seen[view]
        else:
            seen[view] = name
            tensors[name] = t.detach().contiguous()
    save_file(tensors, dest, metadata={"key": fixed.key, "aliases": json.dumps(aliases)})


def _load_fixed(path: Path, key: str) -> FixedTensors:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise DamagedCheckpoint(f"{path} is missing")
    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("key") != key:
        raise DamagedCheckpoint(f"{path} holds tensors with key {metadata.get('key')!r}, the state names {key!r}")
    tensors = load_file(path)
    try:
        for alias, name in json.loads(metadata.get("aliases", "{}")).items():
            tensors[alias] = tensors[name]
    except (ValueError, KeyError, AttributeError) as exc:
        raise DamagedCheckpoint(f"{path}: unreadable aliases in its metadata ({exc!r})") from None
    return FixedTensors(key, tensors)


def save_checkpoint(
    output_dir: str | Path,
    *,
    step: int,
    method: str,
    model,
    tokenizer,
    state: dict[str, Any],
    keep_last: int = 2,
    files: Mapping[str, str] | None = None,
) -> Path:
    """Write `output_dir/checkpoint-<step>` atomically and keep only the newest `keep_last`.

    `state` is everything besides the policy weights that resuming needs (the method's train
    state: optimizer, scheduler, data position, value head, KL controller ...): plain data, and
    `FixedTensors` directly in `state["extra"]`, which go to their own safetensors file; the RNG
    states are added here, at the moment of saving. Refuses (UserError) weights holding NaN or
    inf; a full disk is a UserError; either way the previous checkpoints stay as they were.
    """
    output_dir = Path(output_dir)
    require_finite_weights(model, f"{PREFIX}{step}")
    plain_state, fixed = _split_fixed(state)
    payload = {"state": plain_state, "rng": capture_rng_state(), "step": step, "method": method}
    _require_plain(payload, "payload")
    marker = {"method": method, "step": step, "format_version": FORMAT_VERSION}
    _remove_stale_tmp(output_dir)
    previous = latest_checkpoint(output_dir)

    def write(tmp: Path) -> None:
        save_model_dir(tmp, model, tokenizer)
        for name, text in (files or {}).items():  # text files kept with it (the CLI's run_config.yaml)
            (tmp / name).write_text(text, encoding="utf-8")
        for file, tensors in fixed.items():
            _write_fixed(tmp / file, tensors, previous)
        # A file object, not a path: torch's own writer reports a full disk as a RuntimeError
        # without errno; Python's file raises OSError(ENOSPC).
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(payload, f)
        try:
            _check_files(tmp)  # read back: a writer that lost bytes silently must not be committed
        except DamagedCheckpoint as exc:
            raise UserError(
                f"{PREFIX}{step} in output_dir {output_dir} did not write correctly ({exc}); is the disk full? "
                "the previous checkpoints are kept"
            ) from None
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    final = _write_atomically(output_dir / f"{PREFIX}{step}", write)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        remove_checkpoint(old)
    return final


def _remove_stale_tmp(output_dir: Path) -> None:
    """Leftovers of a writer that died mid-checkpoint or mid-pruning (one writer per output_dir)."""
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
    world_size: int | None = None  # ranks that wrote a sharded checkpoint; None: the one-process format

    @property
    def sharded(self) -> bool:
        return self.world_size is not None

    def restore_rng(self) -> None:
        restore_rng_state(self.rng)


class DamagedCheckpoint(UserError):
    """A checkpoint whose files do not load: torn, truncated, missing, or holding more than plain
    data. Resuming from an output directory skips it for an older one."""


def resolve_resume(target: str | Path) -> Path:
    """A checkpoint directory, or an output directory whose newest checkpoint is taken."""
    target = Path(target)
    if _is_checkpoint_dir(target):
        return target
    if not target.exists():
        raise UserError(f"resume: directory not found: {target}")
    latest = latest_checkpoint(target)
    if latest is None:
        raise UserError(f"resume: no complete checkpoint in {target} (expected {PREFIX}<step>/{MARKER})")
    return latest


def _is_checkpoint_dir(path: Path) -> bool:
    """A checkpoint (complete or not), as opposed to an output directory that holds checkpoints."""
    return (path / MARKER).is_file() or (_step_of(path) is not None and path.is_dir() and not list_checkpoints(path))


def load_resume(target: str | Path, method: str) -> Checkpoint:
    """The checkpoint `--resume` continues from.

    `target` is a checkpoint directory: that checkpoint, or a UserError saying why it does not
    load. `target` is an output directory: its newest checkpoint that loads; each newer one that
    is damaged (`DamagedCheckpoint`: torn, truncated, missing or unsafe files, as a kill mid-write
    or mid-pruning may leave) is skipped with a line on stderr saying which and why. Other errors
    (a checkpoint of another method or format) are raised, not skipped.
    """
    target = Path(target)
    if _is_checkpoint_dir(target):
        return load_checkpoint(target, method)
    found = list_checkpoints(resolve_resume(target).parent)
    for path in reversed(found):
        try:
            return load_checkpoint(path, method)
        except DamagedCheckpoint as exc:
            print(f"rftengine: warning: skipping checkpoint {path}, it does not load: {exc}",
                  file=sys.stderr, flush=True)
    raise UserError(f"resume: no checkpoint in {target} loads ({len(found)} tried, each skipped above)")


def _check_state_file(state: Path) -> None:
    if not state.is_file():
        raise DamagedCheckpoint(f"{state} is missing")
    try:
        zipfile.ZipFile(state).close()
    except (zipfile.BadZipFile, OSError) as exc:
        size = state.stat().st_size if state.exists() else 0
        what = "empty" if size == 0 else "truncated or corrupt"
        raise DamagedCheckpoint(f"{state} is {what} ({exc})") from None


def _check_sharded_files(path: Path) -> None:
    """A sharded checkpoint has its DCP metadata (written once every rank's shard is) and its state."""
    if not (path / SHARDS_DIR / ".metadata").is_file():
        raise DamagedCheckpoint(f"{path / SHARDS_DIR} has no .metadata: the shards are incomplete")
    _check_state_file(path / STATE_FILE)


def _check_files(path: Path) -> None:
    """The files of checkpoint `path` are whole: weights, adapters and FixedTensors (safetensors
    headers) and the state (its zip directory, which a truncated file has lost). Cheap: no
    tensor data is read."""
    try:
        check_model_dir(path, "checkpoint")  # every *.safetensors in it, stage references included
    except UserError as exc:
        raise DamagedCheckpoint(str(exc)) from None
    _check_state_file(path / STATE_FILE)


def load_checkpoint(path: str | Path, method: str) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; a checkpoint of another method is an error.

    `trainer_state.pt` is read with `weights_only=True`: a file that holds anything but plain
    data is refused (DamagedCheckpoint), never unpickled. Damaged files raise DamagedCheckpoint
    naming the file."""
    path = Path(path)
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise UserError(f"{path} is not a complete rftengine checkpoint (no {MARKER})")
    try:
        marker = json.loads(marker_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedCheckpoint(f"{marker_path}: unreadable checkpoint marker ({exc})") from None
    if not isinstance(marker, dict):
        raise DamagedCheckpoint(f"{marker_path}: unreadable checkpoint marker (not a JSON object)")
    if marker.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: checkpoint format version {marker.get('format_version')!r}, this rftengine reads {FORMAT_VERSION}"
        )
    if marker.get("method") != method:
        raise UserError(
            f"{path} is a checkpoint of method '{marker.get('method')}', but this run's method is '{method}'; "
            "resume with the config that wrote it, or start a new output_dir"
        )
    world_size = marker.get("world_size")
    if world_size is None:
        _check_files(path)
    else:
        _check_sharded_files(path)
    state_path = path / STATE_FILE
    try:
        payload = torch.load(state_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = ("it holds more than plain data (tensors, numbers, strings, lists, dicts), and unpickling "
                      "it could run arbitrary code: refused (unsafe)")
        raise DamagedCheckpoint(f"{state_path}: {reason}") from None
    except Exception as exc:  # noqa: BLE001 - RuntimeError, EOFError ...: the file is unusable either way
        raise DamagedCheckpoint(f"{state_path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or not {"step", "state", "rng"} <= set(payload):
        raise DamagedCheckpoint(f"{state_path} does not hold an rftengine trainer state")
    state = payload["state"]
    extra = state.get("extra") if isinstance(state, dict) else None
    if isinstance(extra, dict):
        for name, value in extra.items():
            if isinstance(value, dict) and value.get("type") == "FixedTensors":
                file = str(value.get("file"))
                if not _SAFE_NAME.fullmatch(file):
                    raise DamagedCheckpoint(f"{state_path}: extra[{name!r}] names an invalid file {file!r}")
                extra[name] = _load_fixed(path / file, str(value.get("key")))
    return Checkpoint(path=path, step=int(payload["step"]), method=method, state=state, rng=payload["rng"],
                      world_size=int(world_size) if world_size is not None else None)


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints (torchrun, FSDP2)


def save_sharded_checkpoint(
    output_dir: str | Path,
    *,
    step: int,
    method: str,
    model,
    optimizer,
    tokenizer,
    state: dict[str, Any],
    keep_last: int = 2,
    files: Mapping[str, str] | None = None,
    modules: Mapping[str, torch.nn.Module] | None = None,
) -> Path:
    """`save_checkpoint` for a run sharded over the ranks of a process group (every rank calls it).

    `modules`: trainable modules outside `model` that `optimizer` also steps (PPO's critic):
    their shards and optimizer states go into the DCP shards too, under `policy.`/`<name>.`
    prefixes (the optimizer's state is keyed by parameter names, which only a module holding
    all of them gives); `state["modules"]` is then recorded as `sharded_modules` (their names).

    `output_dir/checkpoint-<step>` holds `shards/` (torch.distributed.checkpoint: each rank
    writes its shards of the weights and of the optimizer state), and, written by rank 0,
    `trainer_state.pt` (`state` without the optimizer, which is in the shards; rank 0's RNG
    states), the model's config.json, the tokenizer and `files`. Rank 0 writes the marker after a
    barrier, when every rank's shards are on disk, then renames the directory into place as
    `save_checkpoint` does (so a kill at any moment leaves no complete-looking torn checkpoint).
    Weights holding NaN or inf on any rank are refused (UserError) before anything is written.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from rftengine import distributed
    from rftengine.methods.modeling import _hf_model

    output_dir = Path(output_dir)
    holder = torch.nn.ModuleDict({"policy": model, **modules}) if modules else model
    model_sd, optim_sd = get_state_dict(holder, optimizer)
    _require_finite_sharded(model_sd, f"{PREFIX}{step}")
    extra = {"modules": {}, "sharded_modules": sorted(modules)} if modules else {}
    plain_state, fixed = _split_fixed({**state, "optimizer": None, **extra})
    payload = {"state": plain_state, "rng": capture_rng_state(), "step": step, "method": method}
    _require_plain(payload, "payload")
    marker = {"method": method, "step": step, "format_version": FORMAT_VERSION,
              "world_size": distributed.world_size()}
    final = output_dir / f"{PREFIX}{step}"
    tmp = final.parent / distributed.broadcast_object(f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
    main = distributed.is_main_process()
    if main:
        _remove_stale_tmp(output_dir)
        tmp.mkdir(parents=True)
    distributed.barrier()
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / SHARDS_DIR))
    distributed.barrier()  # every rank's shards are written
    if main:
        previous = latest_checkpoint(output_dir)

        def write(_):
            _hf_model(model).config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, text in (files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
            for file, tensors in fixed.items():
                _write_fixed(tmp / file, tensors, previous)
            with open(tmp / STATE_FILE, "wb") as f:
                torch.save(payload, f)
            _check_sharded_files(tmp)
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

        try:
            write(tmp)
            _fsync_tree(tmp)
            _replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in list_checkpoints(output_dir)[:-keep_last]:
            remove_checkpoint(old)
    distributed.barrier()  # no rank runs ahead of a checkpoint that is not complete yet
    return final


def _require_finite_sharded(state: Mapping[str, Any], what: str) -> None:
    """`require_finite_weights` over the ranks: each checks its shards, the verdict is shared."""
    from torch.distributed.tensor import DTensor

    from rftengine import distributed

    bad = [name for name, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
           and not bool(torch.isfinite(t.to_local() if isinstance(t, DTensor) else t).all())]
    count = distributed.all_reduce_sum(torch.tensor([len(bad)]))
    if int(count) > 0:
        names = distributed.broadcast_object(bad) or ["(on another rank)"]
        raise UserError(
            f"refusing to write {what}: weight {names[0]} holds NaN or inf values (the training diverged); "
            "the previous checkpoints are kept"
        )


def check_world_size(checkpoint: Checkpoint) -> None:
    """A sharded checkpoint resumes at any world size, one process included (the shards are
    resharded on load); a one-process checkpoint needs one process (UserError otherwise)."""
    from rftengine import distributed

    if not checkpoint.sharded and distributed.world_size() > 1:
        raise UserError(
            f"{checkpoint.path} was written by one process; resume it without torchrun, or start a new "
            "output_dir for a torchrun run"
        )


def load_sharded_weights(model, checkpoint: Checkpoint) -> None:
    """The checkpoint's weights into the sharded `model` (every rank calls it; DCP reshards for
    another world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    sd = get_model_state_dict(model)
    dcp.load({"model": sd}, checkpoint_id=str(checkpoint.path / SHARDS_DIR))
    set_model_state_dict(model, sd)


def load_sharded_optimizer_state(model, checkpoint: Checkpoint) -> dict[str, Any]:
    """The checkpoint's optimizer state over `model`'s trainable parameters, in the form
    `torch.optim.Optimizer.load_state_dict` takes (parameters by index, states as DTensor
    shards): the state a `TrainState` restores from. The optimizer the method builds must be
    AdamW over the same parameters in the same order (`model.parameters()`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    holder = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    osd = get_optimizer_state_dict(model, holder)
    dcp.load({"optimizer": osd}, checkpoint_id=str(checkpoint.path / SHARDS_DIR))
    set_optimizer_state_dict(model, holder, osd)
    return holder.state_dict()


def full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """The whole of a sharded `model`'s state dict on rank 0 (CPU tensors), None on the other
    ranks. Every rank calls it (the shards are gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from rftengine import distributed

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if distributed.is_main_process() else None


# ---------------------------------------------------------------------------------------------
# Export


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def export_model(model, tokenizer, out_dir: str | Path, merge_lora: bool = False, *, critic=None) -> Path:
    """The final model as a directory transformers (or peft) loads, written atomically, with a
    README.md that says how (`model_card`).

    A PEFT LoRA model is saved as its adapter directory (adapter_config.json naming the base,
    adapter_model.safetensors; peft's `AutoPeftModelForCausalLM.from_pretrained(out_dir)` loads
    it) unless `merge_lora`, which first folds the adapters into the base weights
    (`merge_and_unload`, which changes the in-memory model) and saves a plain model directory
    that `AutoModelForCausalLM.from_pretrained` loads without peft. A reward model
    (`RewardModel`, `CausalLMWithValueHead`) is saved as the `*ForSequenceClassification` of its
    architecture with its trained score head (`methods.hf_export`), loaded by
    `AutoModelForSequenceClassification`. Any other model is saved as is.

    critic: a PPO critic (a `ValueHead` on `model`'s trunk, or a `CausalLMWithValueHead`),
    saved beside it in `out_dir/critic` as a sequence classifier too.
    """
    from rftengine.methods.hf_export import scalar_model_classifier, value_head_classifier
    from rftengine.methods.modeling import CausalLMWithValueHead, RewardModel, ValueHead
    from rftengine.model_card import model_card

    if merge_lora and _is_peft(model):
        model = model.merge_and_unload()
    require_finite_weights(model, str(out_dir))
    pad_id = getattr(tokenizer, "pad_token_id", None)
    kind, base = "causal_lm", None
    if isinstance(model, (RewardModel, CausalLMWithValueHead)):
        kind, (model, offset) = "reward", scalar_model_classifier(model, pad_id)
        if offset:  # a value head built with a bias (rftengine's reward heads have none)
            warnings.warn(f"{out_dir}: the reward model's value-head bias {offset:.6g} has no place in the "
                          f"bias-free score layer of {type(model).__name__}: its scores are rftengine's minus "
                          "that constant (score differences, what a reward model ranks by, are unchanged)",
                          stacklevel=2)
    elif _is_peft(model):
        kind, base = "adapter", model.peft_config["default"].base_model_name_or_path
    critic_export = None
    if isinstance(critic, ValueHead):
        critic_export = value_head_classifier(model, critic, pad_id)
    elif isinstance(critic, CausalLMWithValueHead):
        critic_export = scalar_model_classifier(critic, pad_id)
    elif critic is not None:
        raise ValueError(f"critic must be a ValueHead or a CausalLMWithValueHead, got {type(critic).__name__}")
    card = model_card(out_dir, kind, base=base, critic_offset=critic_export.offset if critic_export else None,
                      pad_is_eos=pad_id is not None and pad_id == getattr(tokenizer, "eos_token_id", None))

    def write(tmp: Path) -> None:
        save_model_dir(tmp, model, tokenizer)
        if critic_export is not None:
            save_model_dir(tmp / CRITIC_DIR, critic_export.model, tokenizer)
        (tmp / README).write_text(card, encoding="utf-8")  # replaces the template card peft writes

    return _write_atomically(Path(out_dir), write)
