"""Input validation shared by every op.

Each check raises ValueError naming the argument, what was expected and what was given.
Checks that need a value from the device (index ranges, NaN scans) are skipped while a CUDA
graph is being captured: a host sync there would break the capture, and captured callers
(the rollout loop) only pass values they produced themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(name: str, t: torch.Tensor) -> None:
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )


def check_integer(name: str, t: torch.Tensor) -> None:
    check_tensor(name, t)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of token ids, got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{hint}, got {tuple(t.shape)}")


def check_ndim(name: str, t: torch.Tensor, allowed: Sequence[int], layout: str) -> None:
    if t.dim() not in allowed:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for k, d in devices.items():
        if d != first:
            raise ValueError(
                f"{k} must be on the same device as {first_name} ({first}), got {d}"
            )
    return first


def check_number(name: str, value: float, *, allow_inf: bool = False, bound: str = "") -> None:
    """A Python int or float (not bool), never NaN, and finite unless `allow_inf`.

    Every scalar coefficient of the ops goes through here: a NaN or inf coefficient would
    otherwise pass comparisons such as ``value > 0`` and poison the loss silently.
    `bound` (e.g. "> 0") only completes the message.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or math.isnan(value) or (math.isinf(value) and not allow_inf):
        kind = "a number" if allow_inf else "a finite number"
        raise ValueError(f"{name} must be {kind}{' ' + bound if bound else ''}, got {value!r}")


def check_positive(name: str, value: float, *, allow_inf: bool = False) -> None:
    check_number(name, value, allow_inf=allow_inf, bound="> 0")
    if not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def check_non_negative(name: str, value: float) -> None:
    check_number(name, value, bound=">= 0")
    if not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_binary_mask(name: str, mask: torch.Tensor) -> None:
    """A bool tensor, or an integer/floating one holding only 0 and 1.

    `mask != 0` would read 2 or -1 as True: a mask built by arithmetic (a sum of masks, a
    shifted one) then silently counts the wrong positions. One host sync for non-bool masks;
    skipped during CUDA-graph capture. Shared by every op and by the Generator's attention_mask.
    """
    check_tensor(name, mask)
    if mask.dtype == torch.bool:
        return
    if mask.dtype.is_complex:
        raise ValueError(f"{name} must be a bool or 0/1 integer/floating tensor, got {mask.dtype}")
    if capturing() or mask.numel() == 0:
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise ValueError(
            f"{name} must hold only 0/1 (or bool) values, got {mask[bad].flatten()[0].item()!r} "
            f"({int(bad.sum())} entries other than 0 and 1)"
        )


def as_mask(name: str, mask: torch.Tensor | None, shape: Sequence[int], device: torch.device):
    """Validate a keep-mask (True/1 = position counts) and return it as bool, or None."""
    if mask is None:
        return None
    check_tensor(name, mask)
    check_shape(name, mask, shape, "one entry per position")
    if mask.device != device:
        raise ValueError(f"{name} must be on {device}, got {mask.device}")
    check_binary_mask(name, mask)
    if mask.dtype == torch.bool:
        return mask
    return mask != 0


def check_index_range(
    name: str, index: torch.Tensor, high: int, keep: torch.Tensor | None = None
) -> None:
    """Every kept entry of `index` must lie in [0, high). One host sync; skipped in capture."""
    if capturing() or index.numel() == 0:
        return
    bad = (index < 0) | (index >= high)
    if keep is not None:
        bad &= keep
    if bool(bad.any()):
        vals = index[bad]
        raise ValueError(
            f"{name} must lie in [0, {high}) at unmasked positions, got values in "
            f"[{int(vals.min())}, {int(vals.max())}] ({int(bad.sum())} out of range)"
        )


def check_finite(name: str, t: torch.Tensor) -> None:
    """Reject NaN/inf in small per-sequence or per-token inputs (one host sync)."""
    if capturing() or t.numel() == 0:
        return
    if not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} must be finite, got {n_bad} NaN/inf value(s)")
