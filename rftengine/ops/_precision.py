"""The one precision rule of rftengine.ops: accumulate in fp32 whatever the input dtype.

float64 inputs stay float64, so the same code serves as a float64 test oracle.
"""

from __future__ import annotations

import torch


def accumulation_dtype(*items: torch.Tensor | torch.dtype | None) -> torch.dtype:
    """float64 if any given tensor (or dtype) is float64, else float32."""
    dtypes = (i if isinstance(i, torch.dtype) else i.dtype for i in items if i is not None)
    return torch.float64 if torch.float64 in set(dtypes) else torch.float32
