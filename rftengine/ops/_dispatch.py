"""Which implementation an op runs: the Triton kernel or the plain-torch reference.

One rule for every op: CUDA tensors go to Triton, anything else to the torch reference.
`RFTENGINE_BACKEND=triton|torch` forces one path (read at each call, so tests can flip it);
forcing `triton` on CPU tensors is only meaningful with `TRITON_INTERPRET=1`, which runs the
kernels in Triton's interpreter.
"""

from __future__ import annotations

import os

import torch

_BACKENDS = ("auto", "triton", "torch")


def backend_override() -> str:
    """The value of RFTENGINE_BACKEND, validated ('auto' when unset)."""
    value = os.environ.get("RFTENGINE_BACKEND", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(
            f"RFTENGINE_BACKEND must be one of {', '.join(_BACKENDS)}, got {value!r}"
        )
    return value


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the op should launch its Triton kernel for these inputs."""
    choice = backend_override()
    if choice == "torch":
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if choice == "triton":
        if not on_cuda and not triton_interpreted():
            raise ValueError(
                "RFTENGINE_BACKEND=triton was set for CPU tensors; Triton runs on CPU only "
                "with TRITON_INTERPRET=1 (set it before importing rftengine)"
            )
        return True
    return on_cuda
