"""The one precision rule of rftengine.ops: accumulate in fp32 whatever the input dtype.

float64 inputs stay float64, so the same code serves as a float64 test oracle.
"""

from __future__ import annotations

import torch


def accumulation_dtype(*items: torch.Tensor | torch.dtype | None) -> torch.dtype:
    """float64 if any given tensor (or dtype) is float64, else float32."""
    dtypes = (i if isinstance(i, torch.dtype) else i.dtype for i in items if i is not None)
    return torch.float64 if torch.float64 in set(dtypes) else torch.float32


def autocast_operands(*names: str):
    """Decorator of the lm-head ops for callers that run under ``torch.autocast``: the named
    floating arguments (hidden states, head weight and bias) are cast to the autocast dtype,
    the operands a torch matmul would get, and the op itself runs with autocast off, so its
    own fp32 accumulation and fp32 log-prob math are not lowered to bf16/fp16. Gradients flow
    back through the casts to the fp32 master weights. Without autocast: the op as is.
    float64 arguments are never cast (the test oracle)."""
    import functools
    import inspect

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            first = args[0] if args else kwargs.get(names[0])
            device_type = first.device.type if isinstance(first, torch.Tensor) else None
            if device_type is None or not torch.is_autocast_enabled(device_type):
                return fn(*args, **kwargs)
            dtype = torch.get_autocast_dtype(device_type)
            bound = signature.bind(*args, **kwargs)
            for name in names:
                t = bound.arguments.get(name)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                    bound.arguments[name] = t.to(dtype)
            with torch.autocast(device_type, enabled=False):
                return fn(*bound.args, **bound.kwargs)

        return inner

    return wrap
