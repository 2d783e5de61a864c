"""Reward functions as the methods call them: one or several sources with weights, each called
in the convention its signature asks for, their scores combined and summarised per function.

Two calling conventions, told apart by the signature (``uses_trl_convention``):

- TRL's: ``f(prompts=..., completions=..., completion_ids=..., **columns)`` — every keyword is a
  list with one entry per sample: the prompts, the completions (the response text, or for chat
  prompts ``[{"role": "assistant", "content": text}]``), the sampled token ids, and each extra
  column of the prompt data (``answer=[...]``), plus ``trainer_state`` (a ``RewardState``). A
  function gets the keywords it names, or all of them when it takes ``**kwargs``. A function
  whose parameters include ``completions`` or ``completion_ids`` (and not ``responses``), or
  that takes only ``**kwargs``, is called so.
- rftengine's positional form: ``f(prompts, responses, **kw)``, as every ``RewardScorer`` and
  ``Judge`` is; the data's ``reference`` column arrives as ``references=`` (required when the
  data has one), other columns and ``trainer_state``/``completion_ids`` when named (or
  ``**kwargs``).

Each source returns one score per sample: a list of numbers or ``None`` (the function does not
apply to that sample), a tensor or a numpy array. Several sources are combined as TRL combines
them: ``reward = nansum_f(weight_f * score_f)``, a ``None`` counting as NaN, so a sample that no
function scored gets 0. NaN or inf returned as a number is an error (a bug, not "does not
apply": return None for that).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rftengine import distributed

RewardFn = Callable[..., Any]
"""``f(prompts, responses, **kw)`` or TRL's ``f(prompts=, completions=, completion_ids=, **columns)``
-> one score per sample: ``Tensor[N]``, an array, or a list of numbers / None."""


@dataclass(frozen=True)
class RewardState:
    """The read-only view of the run given to a reward function that asks for ``trainer_state``
    (the fields TRL's ``TrainerState`` has under the same names).

    Fields:
        global_step: optimizer steps done before this rollout (0 on the first step).
        max_steps: the run's total number of steps.
        epoch: passes over the prompt data done before this rollout (a float: 0.5 = half).
    """

    global_step: int
    max_steps: int
    epoch: float


class NamedReward:
    """``fn`` under another name in the per-function metrics (``rewards/<name>/mean``), e.g. a
    reward model or judge directory's name. Calls go to ``fn``; its signature, which chooses
    the convention, is read through ``__wrapped__``."""

    def __init__(self, fn: RewardFn, name: str):
        if not callable(fn):
            raise ValueError(f"reward function {name!r} must be callable, got {type(fn).__name__}")
        self.fn, self.name, self.__wrapped__ = fn, name, fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"NamedReward({self.name!r})"


def _callable_name(fn) -> str:
    """``module:qualname`` of a function, method or callable object (its class); a
    ``NamedReward``'s name."""
    if isinstance(fn, NamedReward):
        return fn.name
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", repr(fn))
    return f"{module}:{name}" if module else name


def reward_name(fn: RewardFn) -> str:
    """The name of ``fn`` in the metrics: a ``NamedReward``'s name, a function's ``__name__``
    (the wrapped function's for ``functools.partial``), else the class name."""
    if isinstance(fn, NamedReward):
        return fn.name
    target = getattr(fn, "func", fn)          # functools.partial
    return getattr(target, "__name__", None) or type(fn).__name__


def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):            # builtins and some C callables: let the call decide
        return None


def uses_trl_convention(fn: RewardFn) -> bool:
    """True when ``fn`` is called TRL's way (all keywords): it has no ``responses`` parameter
    and a ``completions`` or ``completion_ids`` parameter that can be passed by name, or takes
    no positional parameter but ``**kwargs``."""
    signature = _signature(fn)
    if signature is None:
        return False
    params = list(signature.parameters.values())
    if any(p.name == "responses" for p in params):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)
    if any(p.name in ("completions", "completion_ids") and p.kind is not inspect.Parameter.POSITIONAL_ONLY
           for p in params):
        return True
    return (any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
            and not any(p.kind in positional for p in params))


def _accepted(signature: inspect.Signature | None, offered: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``offered`` that ``signature`` takes by keyword (all of it with ``**kwargs``
    or no signature)."""
    if signature is None or any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return dict(offered)
    names = {p.name for p in signature.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in offered.items() if k in names}


def _completions(prompts: Sequence[Any], responses: Sequence[str]) -> list[Any]:
    """TRL's completions: the text, or one assistant message for a chat prompt."""
    return [[{"role": "assistant", "content": r}] if isinstance(p, (list, tuple)) else r
            for p, r in zip(prompts, responses)]


def call_reward_fn(
    reward_fn: RewardFn,
    prompts: Sequence[Any],
    responses: Sequence[str],
    *,
    columns: Mapping[str, Sequence[Any]] | None = None,
    completion_ids: Sequence[Sequence[int]] | Callable[[], list[list[int]]] | None = None,
    trainer_state: RewardState | None = None,
) -> torch.Tensor:
    """``reward_fn`` on N samples, in the convention its signature asks for (module docstring),
    as ``[N]`` fp32 scores with NaN where it returned None (on the device it returned them on).

    Args:
        prompts: N prompts (strings or chat-message lists), one per sample.
        responses: N response texts.
        columns: extra data columns, each a list of N values (``{"answer": [...]}``).
        completion_ids: N lists of sampled token ids, or a function that makes them (called
            only when ``reward_fn`` takes them).
        trainer_state: passed when ``reward_fn`` names ``trainer_state`` or takes ``**kwargs``
            (TRL convention), or names it (positional form).

    A function that cannot take these arguments, returns something that is not a tensor,
    array or list of numbers/None, returns the wrong number of scores, or NaN/inf, gets a
    ValueError naming it (``module:qualname``), what was expected and what it gave.
    """
    name = _callable_name(reward_fn)
    columns = dict(columns or {})
    signature = _signature(reward_fn)
    n = len(responses)
    for key, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {key!r} must have one value per sample ({n}), got {len(values)}")

    def ids():
        return completion_ids() if callable(completion_ids) else completion_ids

    if uses_trl_convention(reward_fn):
        offered = {"prompts": list(prompts), "completions": _completions(prompts, responses), **columns}
        kwargs = _accepted(signature, offered)
        takes = signature.parameters
        if completion_ids is not None and _accepted(signature, {"completion_ids": 0}):
            kwargs["completion_ids"] = ids()
        if trainer_state is not None and _accepted(signature, {"trainer_state": 0}):
            kwargs["trainer_state"] = trainer_state
        missing = [p.name for p in takes.values() if p.default is p.empty and p.name not in kwargs
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if missing:
            raise ValueError(
                f"reward function {name} needs {', '.join(repr(m) for m in missing)}, which the prompt data "
                f"does not have (columns: {', '.join(sorted(columns)) or 'none'}; always given: prompts, "
                "completions, completion_ids, trainer_state)"
            )
        raw = reward_fn(**kwargs)
    else:
        references = columns.pop("reference", None)
        named = {"trainer_state": trainer_state, "completion_ids": completion_ids}
        kwargs = _accepted(signature, columns)
        if signature is not None:
            explicit = {p.name for p in signature.parameters.values()}
            kwargs.update({k: v for k, v in named.items() if v is not None and k in explicit})
            if "completion_ids" in kwargs:
                kwargs["completion_ids"] = ids()
        if references is not None:
            if signature is not None and not _accepted(signature, {"references": 0}):
                raise ValueError(
                    f"the prompt data has 'reference' fields but reward function {name} does not accept a "
                    "references= keyword argument"
                )
            kwargs["references"] = list(references)
        if signature is not None:
            try:
                signature.bind(list(prompts), list(responses), **kwargs)
            except TypeError:
                expected = "(prompts, responses" + "".join(f", {k}=..." for k in kwargs) + ")"
                raise ValueError(
                    f"reward function {name} must accept {expected} or TRL's (prompts=, completions=, "
                    f"**kwargs), but its signature is {signature}"
                ) from None
        raw = reward_fn(list(prompts), list(responses), **kwargs)
    return _as_scores(raw, n, name)


def _as_scores(raw: Any, n: int, name: str) -> torch.Tensor:
    """``[n]`` fp32 from what a reward function returned (None -> NaN), checked."""
    expected = ("must return a tensor or a list of numbers, one per response (None for a sample it "
                "does not apply to)")
    if isinstance(raw, (list, tuple)):
        bad = [x for x in raw if x is not None and not isinstance(x, numbers.Real)
               and not (isinstance(x, torch.Tensor) and x.numel() == 1)]
        if bad:
            raise ValueError(f"reward function {name} {expected}; got a {type(raw).__name__} holding "
                             f"{type(bad[0]).__name__} ({bad[0]!r:.40})")
        if any(x is not None and not math.isfinite(float(x)) for x in raw):
            raise ValueError(f"reward function {name} returned NaN or inf scores (return None for a sample "
                             "the function does not apply to)")
        raw = [math.nan if x is None else float(x) for x in raw]
    elif isinstance(raw, torch.Tensor) or type(raw).__module__ == "numpy":
        raw = torch.as_tensor(raw)
        if not bool(torch.isfinite(raw).all()):
            raise ValueError(f"reward function {name} returned NaN or inf scores (return None for a sample "
                             "the function does not apply to)")
    else:
        raise ValueError(f"reward function {name} {expected}; got {type(raw).__name__} ({raw!r:.40})")
    scores = torch.as_tensor(raw, dtype=torch.float32).detach().reshape(-1)
    if scores.shape[0] != n:
        raise ValueError(f"reward function {name} must return one score per response ({n}), got {scores.shape[0]}")
    return scores


@dataclass
class RewardOutput:
    """What ``RewardFunctions`` returns for N samples.

    Fields:
        scores: ``[N]`` fp32, ``nansum_f(weight_f * per_function[f])`` (0 where no function scored).
        per_function: ``[F, N]`` fp32 raw scores, NaN where a function returned None.
        names: the F names (``rewards/<name>/...`` metrics).
    """

    scores: torch.Tensor
    per_function: torch.Tensor
    names: list[str]

    def stats(self) -> dict[str, torch.Tensor]:
        """``rewards/<name>/mean`` and ``rewards/<name>/std`` (population std) of each function's
        scores over the samples it scored, over every rank's samples; NaN when none did."""
        scored = ~torch.isnan(self.per_function)                                   # [F, N]
        x = torch.where(scored, self.per_function, torch.zeros_like(self.per_function)).double()
        sums = distributed.all_reduce_sum(torch.stack([scored.double().sum(1), x.sum(1), (x * x).sum(1)]))
        count, total, squares = sums.unbind()                                      # [F] each
        mean = total / count
        std = (squares / count - mean * mean).clamp(min=0).sqrt()
        stats = {}
        for i, name in enumerate(self.names):
            stats[f"rewards/{name}/mean"] = mean[i].float()
            stats[f"rewards/{name}/std"] = std[i].float()
        return stats


class RewardFunctions:
    """One or several reward sources with weights, called as one (``__call__``).

    Args:
        reward_fns: a reward function, or a list of them (functions, ``RewardScorer``,
            ``Judge``, ``NamedReward``); names for the metrics from ``reward_name``, made
            unique with ``_2``, ``_3`` suffixes.
        weights: one finite weight per function (TRL's ``reward_weights``); None = all 1.
    """

    def __init__(self, reward_fns: RewardFn | Sequence[RewardFn], weights: Sequence[float] | None = None):
        fns = list(reward_fns) if isinstance(reward_fns, (list, tuple)) else [reward_fns]
        if not fns:
            raise ValueError("reward_fn must hold at least one reward function, got an empty list")
        for fn in fns:
            if not callable(fn):
                raise ValueError(f"reward_fn must be a function or a list of functions, got {type(fn).__name__}")
        if weights is None:
            weights = [1.0] * len(fns)
        weights = list(weights)
        if len(weights) != len(fns):
            raise ValueError(f"reward_weights must have one weight per reward function ({len(fns)}), "
                             f"got {len(weights)}")
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise ValueError(f"reward_weights[{i}] must be a finite number, got {w!r}")
        self.fns, self.weights = fns, [float(w) for w in weights]
        self.names: list[str] = []
        for fn in fns:
            base = name = reward_name(fn)
            k = 2
            while name in self.names:
                name, k = f"{base}_{k}", k + 1
            self.names.append(name)

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str], *, device: torch.device | str = "cpu",
                 **kwargs: Any) -> RewardOutput:
        """Every function on the N samples (``call_reward_fn``'s keywords: ``columns``,
        ``completion_ids``, ``trainer_state``), combined on ``device`` (the device the
        metrics' all-reduce runs on under torchrun: the rollout's)."""
        if callable(kwargs.get("completion_ids")):
            kwargs["completion_ids"] = functools.cache(kwargs["completion_ids"])   # made once for all
        per_function = torch.stack([call_reward_fn(fn, prompts, responses, **kwargs).to(device) for fn in self.fns])
        weights = torch.tensor(self.weights, dtype=torch.float32, device=device).unsqueeze(1)
        scores = torch.nansum(per_function * weights, dim=0)
        return RewardOutput(scores, per_function, self.names)
