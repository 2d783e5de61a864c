"""The eager fallback: the Hugging Face model's own forward with its own (dynamic) cache.

Used for families the static runner does not implement. Correct for any causal LM that takes
`attention_mask`, `position_ids` and a cache (`cache`, or `past_key_values` before transformers
5.2x), and slower: one host-driven forward per
token, no CUDA graph. It shares the sampling and bookkeeping (`record_token`) with the fast path.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


class HFRunner:
    """Prefill once per prompt, then decode one token per row against the model's cache."""

    def __init__(self, model: nn.Module):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self._keep_arg = "logits_to_keep" in params
        # transformers >= 5.2x names the cache `cache` (argument and output) and deprecates
        # `past_key_values`; earlier versions, and remote-code models, know only the latter.
        self._cache_name = "cache" if "cache" in params else "past_key_values"
        self._cache = None
        self._mask = None

    def _forward(self, ids, mask, positions, cache):
        extra = {"logits_to_keep": 1} if self._keep_arg else {}
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions,
            use_cache=True, **{self._cache_name: cache}, **extra,
        )
        return out.logits[:, -1], getattr(out, self._cache_name)

    def prefill(self, ids: torch.Tensor, prompt_mask: torch.Tensor, copies: int | torch.Tensor) -> torch.Tensor:
        """ids/prompt_mask ``[b, P]`` left-padded; prompt i gets ``copies`` rows (or ``copies[i]``,
        a ``[b]`` int64 tensor); returns last-token logits ``[rows, V]``."""
        mask = prompt_mask.long()
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        logits, cache = self._forward(ids, mask, positions, None)
        if isinstance(copies, torch.Tensor):
            cache.batch_select_indices(torch.arange(ids.shape[0], device=ids.device).repeat_interleave(copies))
        elif copies > 1:
            cache.batch_repeat_interleave(copies)
        self._cache = cache
        self._mask = mask.repeat_interleave(copies, dim=0)
        return logits.repeat_interleave(copies, dim=0)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens/positions ``[n]``; returns next-token logits ``[n, V]``."""
        self._mask = torch.cat([self._mask, self._mask.new_ones(tokens.shape[0], 1)], dim=1)
        logits, self._cache = self._forward(tokens[:, None], self._mask, positions[:, None], self._cache)
        return logits

    def release(self) -> None:
        self._cache = None
        self._mask = None
