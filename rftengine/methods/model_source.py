"""Where a model or tokenizer comes from, resolved in one place for every loader and for the
CLI's early checks. rftengine never downloads: a ``model`` (``reference``, ``judge``, ``reward``,
``tokenizer``) is

- a local Hugging Face directory (config.json and weights);
- a hub id (``org/name``) already in the local Hugging Face cache (``HF_HUB_CACHE``, by
  default ``~/.cache/huggingface/hub``), read offline;
- a PEFT adapter directory (adapter_config.json and adapter weights, rftengine's own LoRA
  export included) whose base, ``base_model_name_or_path``, is itself a local directory or a
  cached hub id. Loading it gives the base with the adapters merged in
  (``modeling.load_causal_lm``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes beside the adapter weights
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# `name` or `org/name` as the hub spells repository ids; anything else is only ever a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: ``path``, the local directory holding its files (a cache snapshot for
    a hub id); ``spec``, what the user wrote; ``base``, for an adapter directory, its resolved
    base model (None otherwise)."""

    path: Path
    spec: str
    base: ModelSource | None = None

    @property
    def is_adapter(self) -> bool:
        return self.base is not None


def looks_like_hub_id(spec: str) -> bool:
    """``name`` or ``org/name`` (not ``./x``, ``/x``, ``~/x``, ``a/b/c``)."""
    return bool(_HUB_ID.fullmatch(spec)) and not spec.endswith((".", "-"))


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot directory of hub model ``repo_id`` in the Hugging Face cache (its
    ``main`` revision), None when it is not cached. Offline: nothing is fetched."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _local_or_cached(spec: str, what: str, *, hub: bool) -> Path:
    """The directory ``spec`` names: itself when it exists, else its hub cache snapshot."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{what} must be a model directory or a hub id, got a file: {spec}")
        return path
    if hub and looks_like_hub_id(spec):
        snapshot = cached_snapshot(spec)
        if snapshot is not None:
            return snapshot
        raise ValueError(
            f"{what} {spec!r} not found: no such local directory (in {os.getcwd()}), and no hub model {spec!r} "
            f"in the local Hugging Face cache ({_cache_dir()}). rftengine does not download models: fetch it "
            f"first with `hf download {spec}`, or give a local directory (`rftengine toy-model DIR` writes a "
            "small one to try the examples with)"
        )
    raise ValueError(f"{what} directory not found: {spec} is not a directory")


def _adapter_base(path: Path, what: str, depth: int = 0, weights: bool = False) -> ModelSource:
    """The base model an adapter directory names in adapter_config.json, resolved: as written
    (a directory from the working directory, or a cached hub id), else relative to the adapter."""
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (ValueError, AttributeError, OSError) as exc:
        raise ValueError(f"{what} {path}: unreadable {ADAPTER_CONFIG} ({exc})") from None
    if not isinstance(base, str) or not base:
        raise ValueError(
            f"{what} {path} is a PEFT adapter directory whose {ADAPTER_CONFIG} names no base model "
            f"(base_model_name_or_path is {base!r}); set it to the base model's directory or hub id"
        )
    beside = path / base
    if not Path(base).expanduser().exists() and beside.is_dir():
        base = str(beside)
    if depth >= _MAX_ADAPTER_DEPTH:
        raise ValueError(f"{what} {path}: more than {_MAX_ADAPTER_DEPTH} adapter directories stacked on one "
                         "another (do they name each other as base?)")
    return _resolve(base, f"{what} {path}: base model", hub=True, adapters=True, weights=weights, depth=depth + 1)


def resolve_model(spec: str | os.PathLike, what: str = "model", *, hub: bool = True,
                  adapters: bool = True, weights: bool = False) -> ModelSource:
    """Resolve a model given as a local directory, a cached hub id or a PEFT adapter directory,
    and check its files: config.json and weights, or adapter_config.json, adapter weights and a
    base that resolves in turn (itself possibly an adapter directory); with ``weights``, every
    safetensors file whole too (headers read: what a loader or the CLI's early check wants).
    The one model-directory check, for the loaders and the CLI alike. ``hub=False``: paths
    only; ``adapters=False``: an adapter directory's files are checked, its base is not
    resolved (``base`` stays None; a checkpoint of a LoRA run).

    ValueError naming ``what`` and saying what is missing (for an uncached hub id: that
    rftengine does not download, and the command that fetches it)."""
    return _resolve(os.fspath(spec), what, hub=hub, adapters=adapters, weights=weights, depth=0)


_MAX_ADAPTER_DEPTH = 8


def _resolve(spec: str, what: str, *, hub: bool, adapters: bool, weights: bool, depth: int) -> ModelSource:
    path = _local_or_cached(spec, what, hub=hub)
    if (path / ADAPTER_CONFIG).is_file():
        if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
            raise ValueError(f"{what} directory {path} has {ADAPTER_CONFIG} but no adapter weights "
                             f"({' or '.join(ADAPTER_WEIGHTS)})")
        source = ModelSource(path, spec, _adapter_base(path, what, depth, weights) if adapters else None)
        if weights:  # after the base: a missing base is the first thing to say
            _check_safetensors(path)
        return source
    if not (path / "config.json").is_file():
        raise ValueError(f"{what} directory {path} has no config.json: not a Hugging Face model directory")
    if not any(any(path.glob(pattern)) for pattern in MODEL_WEIGHTS):
        raise ValueError(
            f"{what} directory {path} has no weights (expected model.safetensors, a sharded "
            "model-*.safetensors with its index, or pytorch_model.bin)"
        )
    if weights:
        _check_safetensors(path)
    return ModelSource(path, spec)


def _check_safetensors(directory: Path) -> None:
    """ValueError unless every ``*.safetensors`` file in ``directory`` is whole: its header
    parses and covers the file (reads the headers only), so that a truncated copy or an
    interrupted write is named before any loading starts."""
    from safetensors import safe_open

    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(path, "pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: the file is unusable either way
            raise ValueError(f"{path} is truncated or not a safetensors file ({exc})") from None


def has_tokenizer_files(path: Path) -> bool:
    """Whether directory ``path`` holds a tokenizer of its own (any of ``TOKENIZER_FILES``)."""
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def resolve_tokenizer_dir(spec: str | os.PathLike, what: str = "tokenizer") -> Path:
    """The directory holding the tokenizer ``spec`` names (a local directory or a cached hub
    id); an adapter directory without tokenizer files gives its base's. ValueError otherwise."""
    spec = os.fspath(spec)
    path = _local_or_cached(spec, what, hub=True)
    if has_tokenizer_files(path):
        return path
    if (path / ADAPTER_CONFIG).is_file():
        return resolve_tokenizer_dir(_adapter_base(path, what).path, what)
    raise ValueError(f"{what} directory {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
