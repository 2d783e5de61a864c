"""The shape every method config shares: fields declared once, checked by one validator.

A config is a ``@dataclass`` subclass of ``ConfigBase`` built from the field groups every
method uses (``OptimFields``, ``LoopFields``, ``SamplingFields``) plus its own fields. Each
field is declared once with ``option(default, help, min=..., max=...)``: its type is the
annotation (``int``, ``float``, ``bool``, ``str``, ``Literal[...]`` for choices, ``X | None``
when it may be null, ``tuple[float, float]``), its limits and help text are field metadata.
``check_fields`` reads them all (types, choices, ranges, finiteness) and names
``Config.field``, what was expected and what was given; rules across fields stay in a small
``validate`` hook of each config, run after it.

``config_from_dict`` is the one ``from_dict`` (unknown keys get "did you mean"), and
``stage_config`` the one merger of nested stage configs (RLAIF's ``ppo``/``dpo``, CAI's
``sft``/``dpo``/``rl``). ``describe_config`` lists every field with default, limits and help.
The YAML stays flat: field groups are plain dataclass fields of the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

PRECISIONS = ("fp32", "bf16-mixed", "bf16", "fp16-mixed")
"""The ``precision`` values: "fp32" (fp32 weights and compute), "bf16-mixed" (fp32 master
weights and AdamW states, bf16 compute under ``torch.autocast``), "bf16" (bf16 weights and
compute), "fp16-mixed" (fp32 master weights, fp16 autocast, dynamic loss scaling). None: the
device's default (``resolve_precision``)."""

LR_SCHEDULERS = ("constant", "linear", "cosine")
"""``lr_scheduler`` values: transformers' schedules of those names, after ``warmup_steps`` of
linear warmup (``common.make_scheduler``)."""


def option(default=dataclasses.MISSING, help: str = "", *, min: float | None = None,
           max: float | None = None, exclusive_min: bool = False, exclusive_max: bool = False,
           items: tuple[float, float] | None = None, default_factory=dataclasses.MISSING,
           **metadata: Any):
    """A config field: ``default``, a one-line ``help``, and the limits ``check_fields``
    enforces (``min``/``max``, exclusive when asked; ``items``: the [min, max) range of each
    element of a tuple field); ``why=`` (integers) gives the reason for the limit in its
    message; ``resume=True``: ``rftengine train --resume`` may change it (applied from the
    next step)."""
    meta = {"help": help, "min": min, "max": max, "exclusive_min": exclusive_min,
            "exclusive_max": exclusive_max, "items": items, **metadata}
    return field(default=default, default_factory=default_factory, metadata=meta)


def stage(cls: type, help: str, bound: Mapping[str, str] | None = None):
    """A nested stage config field (None, a ``cls`` or a mapping of its options, kept as
    given); ``bound``: the stage's fields that the owner sets from its own (inner -> outer
    name). ``stage_config`` builds the merged stage config."""
    return field(default=None, metadata={"help": help, "stage": cls, "bound": dict(bound or {})})


def resumable_fields(*groups: type) -> tuple[str, ...]:
    """The fields of ``groups`` declared with ``resume=True``, in declaration order."""
    return tuple(f.name for g in groups for f in dataclasses.fields(g) if f.metadata.get("resume"))


def redefault(group: type, name: str, default):
    """Field ``name`` of ``group`` with another default (its limits and help kept): a method
    whose usual value differs, e.g. PPO's learning rate of 1e-6."""
    spec = group.__dataclass_fields__[name]
    return field(default=default, metadata=spec.metadata)


# ----------------------------------------------------------------------------- validation


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _split_optional(tp) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def _limits_text(meta: Mapping[str, Any]) -> str:
    parts = []
    if meta.get("min") is not None:
        parts.append(f"{'>' if meta['exclusive_min'] else '>='} {meta['min']}")
    if meta.get("max") is not None:
        parts.append(f"{'<' if meta['exclusive_max'] else '<='} {meta['max']}")
    return ", ".join(parts)


def _check_range(where: str, value, meta: Mapping[str, Any]) -> None:
    low, high = meta.get("min"), meta.get("max")
    if meta.get("why"):             # a limit with a reason says it whole: "an integer >= 2 (why)"
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"{where} must be an integer {_limits_text(meta)} ({meta['why']}), got {value!r}")
    if low is not None and (value <= low if meta["exclusive_min"] else value < low):
        raise ValueError(f"{where} must be {'>' if meta['exclusive_min'] else '>='} {low}, got {value}")
    if high is not None and (value >= high if meta["exclusive_max"] else value > high):
        raise ValueError(f"{where} must be {'<' if meta['exclusive_max'] else '<='} {high}, got {value}")


def check_value(where: str, tp, value, meta: Mapping[str, Any] | None = None):
    """``value`` checked against the annotation ``tp`` and the limits in ``meta``; returns it
    (a list becomes a tuple for tuple fields, YAML having no tuples). ValueError naming
    ``where`` (``Config.field``), the expected and the given value otherwise."""
    meta = meta or {}
    tp, optional = _split_optional(tp)
    if value is None and optional:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be {'true, false or null' if optional else 'true or false'}, got {value!r}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            expected = f"an integer {_limits_text(meta)} ({meta['why']})" if meta.get("why") else "an integer"
            raise ValueError(f"{where} must be {expected}, got {value!r}")
        _check_range(where, value, meta)
        return value
    if tp is float:
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        _check_range(where, value, meta)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        low, high = meta.get("items") or (-math.inf, math.inf)
        if (not isinstance(value, (list, tuple)) or len(value) != len(args)
                or not all(_is_number(v) and math.isfinite(v) and low <= v < high for v in value)):
            raise ValueError(f"{where} must be {len(args)} numbers in [{low}, {high}), got {value!r}")
        return tuple(value)
    raise TypeError(f"{where}: check_value has no rule for the annotation {tp!r}")


def check_fields(config) -> None:
    """Check (and normalise: lists to tuples) every init field of dataclass ``config`` against
    its annotation and ``option`` metadata; stage fields must be None, their config class or a
    mapping (``stage_config`` checks their content)."""
    owner = type(config).__name__
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        stage_cls = f.metadata.get("stage")
        if stage_cls is not None:
            if value is not None and not isinstance(value, (stage_cls, Mapping)):
                raise ValueError(f"{owner}.{f.name} must be a {stage_cls.__name__}, a mapping of its options "
                                 f"or None, got {type(value).__name__}")
            continue
        checked = check_value(f"{owner}.{f.name}", hints[f.name], value, f.metadata)
        if checked is not value:
            setattr(config, f.name, checked)


class ConfigBase:
    """What every method config does on construction: ``check_fields``, then the config's
    ``validate`` hook (rules across fields, defaults that depend on other fields)."""

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Rules that involve more than one field; the default has none."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        return config_from_dict(cls, data)


# ----------------------------------------------------------------------------- field groups


@dataclass
class OptimFields:
    """The optimizer, schedule, precision and memory fields of every config that trains."""

    learning_rate: float = option(1e-5, "AdamW learning rate", min=0.0, exclusive_min=True, resume=True)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay", min=0.0, resume=True)
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW (beta1, beta2)", items=(0, 1), resume=True)
    max_grad_norm: float | None = option(1.0, "clip the global gradient norm to this (null: no clipping)",
                                         min=0.0, exclusive_min=True, resume=True)
    max_skipped_steps: int = option(3, "optimizer steps with a non-finite loss or gradient norm are "
                                       "skipped and counted; this many in a row stop the run", min=1, resume=True)
    warmup_steps: int = option(0, "steps of linear warmup from 0 to learning_rate", min=0, resume=True)
    lr_scheduler: Literal[LR_SCHEDULERS] = option("constant", "the rate after warmup (transformers' "
                                                  "get_scheduler): constant, linear or cosine decay to 0", resume=True)
    precision: Literal[PRECISIONS] | None = option(None, "fp32, bf16-mixed (fp32 master weights, bf16 "
                                                   "compute), bf16 or fp16-mixed; null: bf16-mixed on "
                                                   "CUDA, fp32 on CPU")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step (or set micro_batch_size)",
                                              min=1)
    micro_batch_size: int | None = option(None, "examples per forward/backward (null: the step's rows / "
                                          "gradient_accumulation_steps)", min=1)
    gradient_checkpointing: bool = option(False, "recompute each decoder layer in backward (less memory)")
    packing: bool = option(False, "padding-free trunk forwards: sequences packed into rows "
                                  "(rftengine.methods.packed)")


@dataclass
class LoopFields:
    """The training-loop fields of every ``train_*`` config."""

    batch_size: int = option(8, "examples (prompts or pairs) per optimizer step, per process", min=1)
    num_epochs: int = option(1, "passes over the data (max_steps, when set, wins)", min=1, resume=True)
    max_steps: int | None = option(None, "stop after this many optimizer steps (null: num_epochs)", min=1, resume=True)
    shuffle: bool = option(True, "a new seeded order of the data each epoch")
    seed: int = option(0, "every random choice derives from it (data order, sampling)", min=0)
    save_every: int = option(0, "checkpoint every this many steps (0: only after the last)", min=0, resume=True)


@dataclass
class SamplingFields:
    """The generation fields of the configs that sample (PPO, RLAIF, CAI)."""

    max_prompt_length: int = option(256, "prompts are cut to this many tokens (from the left)", min=1)
    max_new_tokens: int = option(64, "sampled tokens per response", min=1)
    temperature: float = option(1.0, "sampling temperature", min=0.0, exclusive_min=True)
    top_k: int = option(0, "sample among the k most likely tokens (0: all)", min=0)
    top_p: float = option(1.0, "nucleus sampling mass", min=0.0, max=1.0, exclusive_min=True)


@dataclass
class LengthFields:
    """The truncation lengths of the configs that train on (prompt, response) pairs."""

    max_prompt_length: int | None = option(256, "prompts are cut to this many tokens, from the left "
                                           "(null: no limit)", min=1)
    max_response_length: int | None = option(256, "responses are cut to this many tokens (null: no limit)",
                                             min=1)


@dataclass
class LogprobFields:
    """The fused log-prob head's setting, for the configs that score responses through it."""

    logprob_chunk_size: int | None = option(None, "token rows per chunk of the fused log-prob head (null: "
                                            "chosen from the vocabulary size and the device)", min=1)


# ----------------------------------------------------------------------------- dicts


def closest_name(key, names, cutoff: float = 0.6) -> str | None:
    """The valid name closest to a mistyped ``key`` (difflib ratio >= ``cutoff``), or None."""
    close = difflib.get_close_matches(str(key), list(names), n=1, cutoff=cutoff)
    return close[0] if close else None


def config_from_dict(cls: type, data: Mapping[str, Any]):
    """Build config dataclass ``cls`` from a mapping, rejecting unknown keys with the closest
    valid key. Values go through ``cls.__init__``, so its validation applies."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__} expects a mapping of options, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = closest_name(key, names)
        hint = f"; did you mean {close!r}?" if close else f"; valid keys: {', '.join(names)}"
        raise ValueError(f"unknown {cls.__name__} key {key!r}{hint}")
    return cls(**dict(data))


def config_to_dict(config) -> dict[str, Any]:
    """A plain-dict copy of a config dataclass for YAML/JSON: tuples become lists, nested
    stage configs their options as given (``config_from_dict`` of it rebuilds the config)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("stage") is not None and value is not None:
            value = _given_options(value, f.metadata["bound"])
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _given_options(given, bound: Mapping[str, str]) -> dict[str, Any]:
    """The options a stage field holds: a mapping as is; a config object whole when nothing
    is bound, else the fields that differ from the defaults it resolved for its own bound
    fields (so an object made for algorithm "ppo" does not carry ppo's KL defaults into a
    "grpo" owner)."""
    if isinstance(given, Mapping):
        return dict(given)
    data = config_to_dict(given)
    if not bound:
        return data
    resolved = config_to_dict(type(given)(**{k: data[k] for k in bound}))
    return {k: v for k, v in data.items() if v != resolved[k]}


def stage_config(owner, name: str, defaults: Mapping[str, Any] | None = None):
    """The stage config in field ``name`` of ``owner``: its given options (``_given_options``)
    over ``defaults`` (the owner's sizing of the stage), with the field's ``bound`` fields set
    from the owner. A bound field given in the stage with a non-default value that disagrees
    with the owner is an error naming both; so is any invalid or unknown stage option
    (prefixed ``Owner.name:``)."""
    spec = next(f for f in dataclasses.fields(owner) if f.name == name)
    cls, bound = spec.metadata["stage"], spec.metadata["bound"]
    given = getattr(owner, name)
    if isinstance(given, cls) and not bound:
        return given                # an object is the stage config itself when nothing is bound
    owner_name = type(owner).__name__
    data = {**(defaults or {}), **({} if given is None else _given_options(given, bound))}
    class_defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for inner, outer in bound.items():
        value = getattr(owner, outer)
        if inner in data and data[inner] != class_defaults[inner] and data[inner] != value:
            raise ValueError(
                f"{owner_name}.{name}.{inner}={data[inner]!r} conflicts with {owner_name}.{outer}={value!r}; "
                f"set {owner_name}.{outer} (it drives the {owner_name.removesuffix('Config')} loop)"
            )
        data[inner] = value
    try:
        return config_from_dict(cls, data)
    except ValueError as exc:
        raise ValueError(f"{owner_name}.{name}: {exc}") from None


# ----------------------------------------------------------------------------- help


def describe_config(cls: type) -> str:
    """Every field of config class ``cls``, one per line: name, type, default, limits, help
    (what ``rftengine train --help-config METHOD`` prints)."""
    hints = _hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = f.metadata
        if meta.get("stage") is not None:
            kind = f"{meta['stage'].__name__} options"
        else:
            kind = _type_text(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        limits = _limits_text(meta) if meta.get("min") is not None or meta.get("max") is not None else ""
        if meta.get("items"):
            limits = "each in [{}, {})".format(*meta["items"])
        text = meta.get("help", "")
        default_text = ("null" if default is None else str(default).lower() if isinstance(default, bool)
                        else repr(list(default) if isinstance(default, tuple) else default))
        if len(default_text) > 40:
            default_text = default_text[:37] + "..."
        rows.append((f.name, kind, default_text, limits, text))
    width = max(len(r[0]) for r in rows)
    lines = [f"{cls.__name__} (the train: section)"]
    for name, kind, default_text, limits, text in rows:
        detail = "; ".join(x for x in (kind, f"default {default_text}", limits) if x)
        lines.append(f"  {name:<{width}}  {detail}" + (f"\n  {'':<{width}}    {text}" if text else ""))
    return "\n".join(lines)


def _type_text(tp) -> str:
    tp, optional = _split_optional(tp)
    if typing.get_origin(tp) is Literal:
        text = "|".join(map(str, typing.get_args(tp)))
    elif typing.get_origin(tp) is tuple:
        text = f"list of {len(typing.get_args(tp))} numbers"
    else:
        text = {int: "integer", float: "number", bool: "true/false", str: "text"}.get(tp, str(tp))
    return text + (" or null" if optional else "")
