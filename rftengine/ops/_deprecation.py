"""Old call forms of the public ops, kept for one release behind a DeprecationWarning."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings

_OPS_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _warn(message: str) -> None:
    """DeprecationWarning attributed to the first caller outside rftengine.ops (the ops call
    each other and are wrapped by decorators, so a fixed stacklevel would blame the library)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_OPS_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DeprecationWarning, stacklevel=level)


def deprecated_call_forms(
    *, positional: tuple[str, ...] = (), renamed: dict[str, str] | None = None,
    old_defaults: dict | None = None,
):
    """Decorator that maps deprecated call forms of an op onto its current signature.

    `positional`: keyword-only arguments the op used to take positionally, in their old order
    after the current positional parameters (``fn(a, b, m)`` -> ``fn(a, b, mask=m)``).
    `renamed`: ``{old keyword: new keyword}``.
    `old_defaults`: ``{new keyword: value}`` for arguments whose default changed with the
    rename: a caller that uses an old keyword and leaves such an argument out gets its old
    default, so the deprecated call form keeps its old result.
    Either form warns (DeprecationWarning, attributed to the caller's line); giving
    both the old and the new form of one argument is a TypeError, as for any duplicate.
    """
    renamed, old_defaults = dict(renamed or {}), dict(old_defaults or {})

    def wrap(fn):
        params = inspect.signature(fn).parameters.values()
        n_positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        name = fn.__name__

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if len(args) > n_positional:
                extra = args[n_positional:]
                if len(extra) > len(positional):
                    raise TypeError(
                        f"{name}() takes at most {n_positional + len(positional)} positional "
                        f"arguments, got {len(args)}"
                    )
                moved = positional[: len(extra)]
                for key, value in zip(moved, extra):
                    if key in kwargs:
                        raise TypeError(f"{name}() got multiple values for argument {key!r}")
                    kwargs[key] = value
                args = args[:n_positional]
                keywords = ", ".join(f"{key}=..." for key in moved)
                _warn(
                    f"{name}(): passing {', '.join(moved)} positionally is deprecated and will be "
                    f"removed in the next release; pass it by keyword ({keywords})")
            used = [old for old in renamed if old in kwargs]
            for old in used:
                new = renamed[old]
                if new in kwargs:
                    raise TypeError(f"{name}() got both {old!r} (deprecated) and {new!r}; pass only {new!r}")
                kwargs[new] = kwargs.pop(old)
            if used:
                for key, value in old_defaults.items():
                    kwargs.setdefault(key, value)
                for old in used:
                    _warn(
                        f"{name}(): argument {old!r} is renamed {renamed[old]!r}; the old name "
                        f"will be removed in the next release")
            return fn(*args, **kwargs)

        return inner

    return wrap


def required_with_old_default(op: str, argument: str, value, old_default):
    """`value` if the caller gave one (not None), else `old_default` with a DeprecationWarning
    saying the argument becomes required (for arguments whose default differed between ops)."""
    if value is not None:
        return value
    _warn(
        f"{op}(): {argument} will be required in the next release (the ops disagreed on its "
        f"default); pass {argument}={old_default!r} to keep the current behaviour")
    return old_default
