"""The shape every method config shares: fields declared once, checked by one validator.

A config is a ``@dataclass`` subclass of ``ConfigBase`` built from the field groups every
method uses (``OptimFields``, ``LoopFields``, ``SamplingFields``) plus its own fields. Each
field is declared once with ``option(default, help, min=..., max=...)``: its type is the
annotation (``int``, ``float``, ``bool``, ``str``, ``Literal[...]`` for choices, ``X | None``
when it may be null, ``tuple[float, float]``), its limits and help text are field metadata.
``check_fields`` reads them all (types, choices, ranges, finiteness) and names
``Config.field``, what was expected and what was given; rules across fields stay in a small
``validate`` hook of each config, run after it.

``config_from_dict`` is the one ``from_dict`` (unknown keys get "did you mean" for typos;
other libraries' names, the ``aliases`` of a field, are taken with a notice), and
``stage_config`` the one merger of nested stage configs (RLAIF's ``ppo``/``dpo``, CAI's
``sft``/``dpo``/``rl``). ``describe_config`` lists every field with default, limits and help.
The YAML stays flat: field groups are plain dataclass fields of the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from rftengine.methods import trl_names

PRECISIONS = ("fp32", "bf16-mixed", "bf16", "fp16-mixed")
"""The ``precision`` values: "fp32" (fp32 weights and compute), "bf16-mixed" (fp32 master
weights and AdamW states, bf16 compute under ``torch.autocast``), "bf16" (bf16 weights and
compute), "fp16-mixed" (fp32 master weights, fp16 autocast, dynamic loss scaling). None: the
device's default (``resolve_precision``)."""

LR_SCHEDULERS = ("constant", "linear", "cosine")
"""``lr_scheduler`` values: transformers' schedules of those names, after ``warmup_steps`` of
linear warmup (``optimization.make_scheduler``)."""


logger = logging.getLogger("rftengine")


@dataclass(frozen=True)
class Alias:
    """Another library's name for a config field, declared in the field's ``aliases``
    metadata: ``from_dict`` takes ``name`` for the field, with a one-line notice.
    ``convert(value, options)`` turns its value into the field's (``options``: the config's
    other options resolved so far, over the class defaults), or raises a ValueError saying
    why there is no equivalent; None: the value is the same."""

    name: str
    convert: Callable[[Any, Mapping[str, Any]], Any] | None = None
    library: str = "TRL"


def trl(name: str, convert: Callable[[Any, Mapping[str, Any]], Any] | None = None) -> Alias:
    """TRL's (or transformers' TrainingArguments') name for a field (``rftengine.methods.trl_names``
    holds the conversions)."""
    return Alias(name, convert)


def option(default=dataclasses.MISSING, help: str = "", *, min: float | None = None,
           max: float | None = None, exclusive_min: bool = False, exclusive_max: bool = False,
           items: tuple[float, float] | None = None, default_factory=dataclasses.MISSING,
           **metadata: Any):
    """A config field: ``default``, a one-line ``help``, and the limits ``check_fields``
    enforces (``min``/``max``, exclusive when asked; ``items``: the [min, max) range of each
    element of a tuple field); ``why=`` (integers) gives the reason for the limit in its
    message; ``resume=True``: ``rftengine train --resume`` may change it (applied from the
    next step); ``aliases``: other libraries' names for it (``Alias``, ``trl``)."""
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
    if origin is list:   # a list of any length (e.g. one weight per reward function)
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return [check_value(f"{where}[{i}]", item, v) for i, v in enumerate(value)]
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
    adam_betas: tuple[float, float] = option(
        (0.9, 0.999), "AdamW (beta1, beta2)", items=(0, 1), resume=True,
        aliases=tuple(trl(f"adam_beta{i}", trl_names.refuse("rftengine takes both AdamW betas as one option: "
                                                               "adam_betas: [beta1, beta2]")) for i in (1, 2)))
    max_grad_norm: float | None = option(1.0, "clip the global gradient norm to this (null: no clipping)",
                                         min=0.0, exclusive_min=True, resume=True)
    max_skipped_steps: int = option(3, "optimizer steps with a non-finite loss or gradient norm are "
                                       "skipped and counted; this many in a row stop the run", min=1, resume=True)
    warmup_steps: int = option(0, "steps of linear warmup from 0 to learning_rate", min=0, resume=True,
                               aliases=(trl("warmup_ratio", trl_names.warmup_ratio),))
    lr_scheduler: Literal[LR_SCHEDULERS] = option("constant", "the rate after warmup (transformers' "
                                                  "get_scheduler): constant, linear or cosine decay to 0", resume=True,
                                                  aliases=(trl("lr_scheduler_type", trl_names.scheduler_type),))
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

    batch_size: int = option(8, "examples per optimizer step, all ranks together: prompts (ppo/grpo/rloo/"
                                "rlaif/cai, each sampled group_size times; TRL's per_device_train_batch_size "
                                "counts the completions, per device) or pairs (dpo, reward)", min=1,
                             aliases=(trl("per_device_train_batch_size", trl_names.per_device_batch),))
    num_epochs: int = option(1, "passes over the data (max_steps, when set, wins)", min=1, resume=True,
                             aliases=(trl("num_train_epochs"),))
    max_steps: int | None = option(None, "stop after this many optimizer steps (null: num_epochs)", min=1, resume=True)
    shuffle: bool = option(True, "a new seeded order of the data each epoch")
    seed: int = option(0, "every random choice derives from it (data order, sampling)", min=0)
    save_every: int = option(0, "checkpoint every this many steps (0: only after the last)", min=0, resume=True,
                             aliases=(trl("save_steps"),))
    eval_every: int = option(0, "evaluate on the eval data every this many steps and after the last "
                                "(0: only after the last)", min=0, resume=True)
    eval_batch_size: int | None = option(None, "pairs, examples or prompts per evaluation forward or "
                                         "generation call (null: batch_size)", min=1, resume=True)
    logging_steps: int = option(10, "without progress bars (progress off, or output not a terminal): "
                                    "one console line of metrics every this many steps", min=1, resume=True)


@dataclass
class SamplingFields:
    """The generation fields of the configs that sample (PPO, RLAIF, CAI)."""

    max_prompt_length: int = option(256, "prompts are cut to this many tokens (from the left)", min=1)
    max_new_tokens: int = option(64, "sampled tokens per response", min=1, aliases=(trl("max_completion_length"),))
    temperature: float = option(1.0, "sampling temperature", min=0.0, exclusive_min=True)
    top_k: int = option(0, "sample among the k most likely tokens (0: all)", min=0)
    top_p: float = option(1.0, "nucleus sampling mass", min=0.0, max=1.0, exclusive_min=True)
    min_p: float = option(0.0, "drop tokens less likely than min_p times the most likely one (0: off)",
                          min=0.0, max=1.0)
    stop: list[str] | None = option(None, "strings that end a response (kept at its end, cut exactly there; "
                                          "null: none)")


@dataclass
class LengthFields:
    """The truncation lengths of the configs that train on (prompt, response) pairs."""

    max_prompt_length: int | None = option(256, "prompts are cut to this many tokens, from the left "
                                           "(null: no limit)", min=1)
    max_response_length: int | None = option(256, "responses are cut to this many tokens (null: no limit)",
                                             min=1, aliases=(trl("max_completion_length"),))


@dataclass
class LogprobFields:
    """The fused log-prob head's setting, for the configs that score responses through it."""

    logprob_chunk_size: int | None = option(None, "token rows per chunk of the fused log-prob head (null: "
                                            "chosen from the vocabulary size and the device)", min=1)


# ----------------------------------------------------------------------------- dicts


def aliases_of(cls: type) -> dict[str, tuple[Alias, str]]:
    """Every alias of ``cls``'s init fields: alias name -> (Alias, field name)."""
    return {a.name: (a, f.name) for f in dataclasses.fields(cls) if f.init for a in f.metadata.get("aliases", ())}


def config_keys(cls: type) -> list[str]:
    """The keys ``from_dict`` of ``cls`` takes: its init fields, then their aliases."""
    return [f.name for f in dataclasses.fields(cls) if f.init] + list(aliases_of(cls))


@functools.cache
def announce(text: str) -> None:
    """Log ``text`` (a warning of the "rftengine" logger: stderr unless logging is set up)
    once per process, on rank 0 only: an alias is resolved each time a stage config is built."""
    from rftengine import distributed

    # RANK too: torchrun's ranks read the run file before the process group starts.
    if distributed.is_main_process() and os.environ.get("RANK", "0") == "0":
        logger.warning(text)


def resolve_aliases(cls: type, data: Mapping[str, Any], prefix: str = "train.",
                    context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``data`` with other libraries' names (``Alias`` in the fields' metadata) replaced by
    ``cls``'s fields, each announced once: "train.num_generations is TRL's name for
    train.group_size; using it". Plain renames first, then the conversions in field order,
    each seeing the options resolved before it (over ``context``, then the class defaults).
    An alias given with its field, or two aliases of one field, is an error; so is a value a
    conversion refuses."""
    aliases = aliases_of(cls)
    given = [k for k in data if k in aliases]
    if not given:
        return dict(data)
    out = {k: v for k, v in data.items() if k not in aliases}
    for key in given:
        target = aliases[key][1]
        if target in out or any(aliases[k][1] == target for k in given if k != key):
            other = target if target in out else next(k for k in given if k != key and aliases[k][1] == target)
            raise ValueError(f"{prefix}{key} is {aliases[key][0].library}'s name for {prefix}{target}; "
                             f"give only one of {prefix}{key} and {prefix}{other}")
    order = {f.name: i for i, f in enumerate(dataclasses.fields(cls))}
    given.sort(key=lambda k: (aliases[k][0].convert is not None, order[aliases[k][1]]))
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    for key in given:
        alias, target = aliases[key]
        value = data[key]
        text = f"{prefix}{key} is {alias.library}'s name for {prefix}{target}; using it"
        if alias.convert is not None:
            try:
                value = alias.convert(value, {**defaults, **(context or {}), **out})
            except ValueError as exc:
                raise ValueError(f"{prefix}{key} ({alias.library}'s name for {prefix}{target}): {exc}") from None
            if value != data[key]:
                text += f" as {target}={value!r}"
        out[target] = value
        announce(text)
    return out


def closest_name(key, names, cutoff: float = 0.6) -> str | None:
    """The valid name closest to a mistyped ``key`` (difflib ratio >= ``cutoff``), or None.
    Only a typo is corrected: each ``_``-separated word must be close to the name's word in its
    place (or, with words run together or split, the whole names very close), so that another
    library's name for another thing (``per_device_eval_batch_size``, ``adam_epsilon``) is
    not pointed to a field that merely shares words with it."""
    key = str(key)
    for name in difflib.get_close_matches(key, list(names), n=5, cutoff=cutoff):
        if _typo_of(key, name):
            return name
    return None


def did_you_mean(key, names) -> str:
    """`` (did you mean 'NAME'?)`` for the name in ``names`` that a mistyped ``key`` was meant to
    be (``closest_name``), or "" when none is close: the phrase the run file's errors end with."""
    match = closest_name(key, names)
    return f" (did you mean '{match}'?)" if match else ""


def _typo_of(key: str, name: str, word_cutoff: float = 0.7, joined_cutoff: float = 0.95) -> bool:
    key_words, name_words = key.lower().split("_"), name.lower().split("_")
    if len(key_words) == len(name_words):
        # close words, or the same letters swapped ("dop" for "dpo")
        return all(difflib.SequenceMatcher(None, a, b).ratio() >= word_cutoff or sorted(a) == sorted(b)
                   for a, b in zip(key_words, name_words))
    return difflib.SequenceMatcher(None, "".join(key_words), "".join(name_words)).ratio() >= joined_cutoff


def unknown_key_hint(cls: type, key) -> str:
    """What to say of an unknown key of ``cls``: the closest field or alias (an alias is named
    with its field), or the valid keys when nothing is close."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    aliases = aliases_of(cls)
    close = closest_name(key, names + list(aliases))
    if close in aliases:
        alias, target = aliases[close]
        return f"; did you mean {target!r} ({alias.library}: {close!r})?"
    return f"; did you mean {close!r}?" if close else f"; valid keys: {', '.join(names)}"


def config_from_dict(cls: type, data: Mapping[str, Any], prefix: str = "train."):
    """Build config dataclass ``cls`` from a mapping, rejecting unknown keys with the closest
    valid key; other libraries' names are taken for their fields (``resolve_aliases``;
    ``prefix``: where the options sit, for its notices). Values go through ``cls.__init__``,
    so its validation applies."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__} expects a mapping of options, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    aliases = aliases_of(cls)
    unknown = [k for k in data if k not in names and k not in aliases]
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key {unknown[0]!r}{unknown_key_hint(cls, unknown[0])}")
    return cls(**resolve_aliases(cls, data, prefix))


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
    context = {**(defaults or {}), **{inner: getattr(owner, outer) for inner, outer in bound.items()}}
    try:
        options = resolve_aliases(cls, {} if given is None else _given_options(given, bound), f"train.{name}.", context)
    except ValueError as exc:
        raise ValueError(f"{owner_name}.{name}: {exc}") from None
    data = {**(defaults or {}), **options}
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


def describe_config(cls: type, title: str | None = None) -> str:
    """Every field of config class ``cls``, one per line: name, type, default, limits, then
    its help and other libraries' names for it (what ``rftengine config METHOD`` prints);
    ``title``: the first line (default: the class as the train: section)."""
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
        limits = _limits_text(meta) if meta.get("min") is not None or meta.get("max") is not None else ""
        if meta.get("items"):
            limits = "each in [{}, {})".format(*meta["items"])
        text = meta.get("help", "")
        aliases = meta.get("aliases", ())
        for library in dict.fromkeys(a.library for a in aliases):
            text += f" ({library}: {', '.join(a.name for a in aliases if a.library == library)})"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            default_text = "required"
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default_text = "default " + ("null" if default is None
                                         else str(default).lower() if isinstance(default, bool)
                                         else repr(list(default) if isinstance(default, tuple) else default))
        if len(default_text) > 48:
            default_text = default_text[:45] + "..."
        rows.append((f.name, kind, default_text, limits, text))
    width = max(len(r[0]) for r in rows)
    lines = [title or f"{cls.__name__} (the train: section)"]
    for name, kind, default_text, limits, text in rows:
        detail = "; ".join(x for x in (kind, default_text, limits) if x)
        lines.append(f"  {name:<{width}}  {detail}" + (f"\n  {'':<{width}}    {text}" if text else ""))
    return "\n".join(lines)


def _type_text(tp) -> str:
    tp, optional = _split_optional(tp)
    if typing.get_origin(tp) is Literal:
        text = "|".join(map(str, typing.get_args(tp)))
    elif typing.get_origin(tp) is tuple:
        text = f"list of {len(typing.get_args(tp))} numbers"
    elif typing.get_origin(tp) is list:
        item = _type_text(typing.get_args(tp)[0])
        text = "list of " + {"integer": "integers", "number": "numbers", "text": "texts"}.get(item, item)
    elif typing.get_origin(tp) in (typing.Union, types.UnionType):
        text = " or ".join(_type_text(a) for a in typing.get_args(tp))
    elif dataclasses.is_dataclass(tp):
        text = f"{tp.__name__} options"
    elif typing.get_origin(tp) in (dict, Mapping):
        text = "mapping"
    else:
        text = {int: "integer", float: "number", bool: "true/false", str: "text"}.get(tp, str(tp))
    return text + (" or null" if optional else "")
