"""The run's resolved config (run_config.yaml, in output_dir and in every checkpoint) and what
a resumed run may change against it; a resume from an older checkpoint moves the newer ones
aside."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import yaml

from rftengine.checkpoint import PREFIX, Checkpoint, list_checkpoints
from rftengine.config import RESUME_RUN_KEYS, RESUME_TRAIN_KEYS, RunConfig, yaml_load
from rftengine.errors import UserError
from rftengine.metrics import CSV_NAME, JSONL_NAME


RUN_CONFIG = "run_config.yaml"  # the fully resolved config, in output_dir and in every checkpoint


ABANDONED_DIR = "abandoned"  # output_dir/abandoned/<time>/: checkpoints of a run a resume branched from


PATH_KEYS = ("model", "data", "tokenizer", "reference", "reward", "judge", "constitution")


def _plain(value):
    """Config values as YAML-safe plain data: dataclasses as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resolved_run_config(cfg: RunConfig, method_cfg) -> dict:
    """The run's config with every default filled in, run level and method section alike: a
    nested stage section (CAI's sft/dpo/rl, RLAIF's ppo/dpo) is the stage config it builds
    (`<name>_config`); one its mode does not use stays as given."""
    out = _plain(cfg)
    train = _plain(method_cfg)
    for name in train:
        builder = f"{name}_config"
        if isinstance(getattr(type(method_cfg), builder, None), property):
            try:
                train[name] = _plain(getattr(method_cfg, builder))
            except ValueError:
                pass  # a stage this configuration does not train (RLAIF's dpo under algorithm ppo)
    out["train"] = train
    return out


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def _same_setting(key: str, then, now) -> bool:
    if then == now:
        return True
    if isinstance(then, float) and isinstance(now, float) and then != then and now != now:
        return True  # NaN
    if key in PATH_KEYS and isinstance(then, str) and isinstance(now, str):
        return Path(then).resolve() == Path(now).resolve()  # the same file, written another way
    return False


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def resume_changes(checkpoint: Path, resolved: dict) -> list[str]:
    """The settings this run changes from the run that wrote `checkpoint`, as "key: old -> new"
    lines; a UserError when one is not among those a resumed run may change (RESUME_RUN_KEYS,
    RESUME_TRAIN_KEYS at any depth of train): the others change what the checkpoint's training
    means, or live in its state (the KL controller, cached reference log-probs, generated data),
    where a new value would be silently ignored."""
    recorded_path = checkpoint / RUN_CONFIG
    if not recorded_path.is_file():
        print(f"rftengine train: note: {checkpoint} records no {RUN_CONFIG} (an older rftengine wrote it): "
              "settings changed since its run are not checked", flush=True)
        return []
    try:
        recorded = yaml_load(recorded_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError, OSError) as exc:
        raise UserError(f"{recorded_path}: unreadable ({exc})") from None
    then, now = _flatten(recorded), _flatten(resolved)
    missing = object()
    # lora is checked against the checkpoint's own adapter_config.json when the policy loads
    # (`load_adapters`), which also covers checkpoints that record no run config.
    changed = [k for k in {**then, **now} if k.split(".")[0] != "lora"
               and not _same_setting(k, then.get(k, missing), now.get(k, missing))]

    def allowed(key: str) -> bool:
        parts = key.split(".")
        return key in RESUME_RUN_KEYS or (parts[0] == "train" and parts[-1] in RESUME_TRAIN_KEYS)

    refused = [k for k in changed if not allowed(k)]
    if refused:
        key = refused[0]
        more = f" (and {', '.join(refused[1:])})" if refused[1:] else ""
        show = lambda v: "unset" if v is missing else _show(v)  # noqa: E731
        raise UserError(
            f"--resume: {checkpoint} was trained with {key} = {show(then.get(key, missing))}, this run sets "
            f"{show(now.get(key, missing))}{more}. A resumed run may change only {', '.join(RESUME_RUN_KEYS)} "
            f"and, under train, {', '.join(RESUME_TRAIN_KEYS)}: resume with the checkpoint's settings, or "
            "start a new run in another output_dir"
        )
    return [f"{k}: {_show(then.get(k))} -> {_show(now.get(k))}" for k in changed]


def abandon_newer(output_dir: Path, checkpoint: Checkpoint) -> None:
    """Resuming from a checkpoint older than the newest in output_dir starts a new branch: the
    newer checkpoints belong to the run being abandoned, and a later --resume (after a crash of
    the new branch) must not pick them. They are moved, with a copy of that run's metrics, to
    output_dir/abandoned/<time>/, where neither --resume nor keep_last pruning looks."""
    newer = [p for p in list_checkpoints(output_dir) if int(p.name[len(PREFIX):]) > checkpoint.step]
    if not newer:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = output_dir / ABANDONED_DIR / stamp
    suffix = 1
    while dest.exists():
        suffix += 1
        dest = output_dir / ABANDONED_DIR / f"{stamp}-{suffix}"
    dest.mkdir(parents=True)
    for name in (JSONL_NAME, CSV_NAME):
        if (output_dir / name).is_file():
            shutil.copy2(output_dir / name, dest / name)
    for path in newer:
        os.replace(path, dest / path.name)
    names = ", ".join(p.name for p in newer)
    verb = "are" if len(newer) > 1 else "is"
    print(f"rftengine train: {names} {verb} newer than {checkpoint.path.name}: resuming from it starts a new "
          f"branch, so they were moved to {dest} (with that run's metrics)", flush=True)
