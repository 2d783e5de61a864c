"""Decode attention over the static KV cache: flash-attn's kv-cache kernel where it applies, SDPA otherwise.

Both read the first ``live`` cache columns only (``live`` = the written length rounded up to the
cache block, one CUDA graph per value). Inside that slice SDPA still computes every column and
masks the padding; flash-attn skips it: row r reads columns ``[leftpad_r, slot]`` and nothing else.

Layout: the cache is stored ``[rows, length, kv_heads, head_dim]``, the layout
``flash_attn_with_kvcache`` takes as is (it needs only the last dim contiguous; a ``[:n, :live]``
slice keeps that), so the flash path passes the cache tensors themselves and the SDPA path takes
``transpose(1, 2)`` views. Nothing is copied or stored twice.

Why the two lengths flash-attn gets are right (flash-attn >= 2.6, ``cache_leftpad``): it attends to
the cache columns ``[cache_leftpad[r], cache_seqlens[r])`` of row r. A decode step writes column
``slot[r]`` of row r (each row its own column; a ``[1]`` slot is shared by all rows), and the real
keys of a row are contiguous and end there (a left-padded prompt: ``[P - len_r, slot]``; the
Generator's right-padded prompts: ``[0, slot]``): ``cache_seqlens = slot + 1`` and ``cache_leftpad =
cache_seqlens - (number of valid columns)``. Both are computed on the device from ``slot`` and
``cache.valid`` each step (no host sync), so a captured graph replays with the current values.
Its sliding window keeps keys j with ``i - j <= window_size[0]`` (i = the query's column), the
same set as SDPA's ``i - j < window``; grouped-query heads map query head h to kv head
``h // (heads / kv_heads)`` in both, as in transformers' ``repeat_kv``.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from rftengine.generation.kv_cache import StaticKVCache
from rftengine.ops._checks import check_choice

ATTENTION_CHOICES = ("auto", "sdpa", "flash")


@functools.cache
def _flash_kvcache():
    """``flash_attn.flash_attn_with_kvcache`` when a flash-attn 2 with ``cache_leftpad`` imports, else None."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    if "cache_leftpad" not in inspect.signature(flash_attn_with_kvcache).parameters:
        return None
    return flash_attn_with_kvcache


def flash_unusable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the flash-attn decode path cannot run this rollout (None when it can)."""
    if _flash_kvcache() is None:
        return "flash-attn >= 2.6 (flash_attn_with_kvcache with cache_leftpad) is not installed"
    if device.type != "cuda":
        return f"flash-attn needs a CUDA device, the model is on {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs a float16 or bfloat16 rollout dtype, got {dtype}"
    # Other head sizes make flash-attn pad a copy of the whole cache at every call.
    if head_dim % 8 or head_dim > 256:
        return f"flash-attn needs head_dim a multiple of 8 and <= 256, got {head_dim}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"flash-attn needs an Ampere or newer GPU, got {torch.cuda.get_device_name(device)}"
    return None


def select_attention(attention: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Resolve the ``attention`` argument to the backend decode steps use: ``"sdpa"`` or ``"flash"``.

    ``"auto"`` takes flash-attn when it is installed and applies (CUDA, fp16/bf16, head_dim a
    multiple of 8 up to 256, Ampere or newer), else SDPA; ``"flash"`` raises ValueError saying why
    it cannot run; ``"sdpa"`` always works.
    """
    check_choice("attention", attention, ATTENTION_CHOICES)
    if attention == "sdpa":
        return "sdpa"
    reason = flash_unusable_reason(device, dtype, head_dim)
    if attention == "flash" and reason is not None:
        raise ValueError(f"attention='flash' cannot be used: {reason} (use attention='auto' or 'sdpa')")
    return "sdpa" if reason is not None else "flash"


class DecodeAttention:
    """The attention of one decode step, every layer: set up once per step, called per layer.

    Args:
        backend: ``"sdpa"`` or ``"flash"`` (from `select_attention`).
        cache: the static cache; this step's keys/values are already written at column ``slot``
            and ``cache.valid[:n, slot]`` is already True.
        n: rows of this step (cache rows ``0 .. n-1``).
        slot: ``[n]`` int64 device tensor, each row's cache column of this step (or ``[1]``, one
            column for every row).
        live: columns read, ``cache.live_length(max(slot))`` (a Python int, static per graph).
    """

    def __init__(self, backend: str, cache: StaticKVCache, n: int, slot: torch.Tensor, live: int):
        self.backend, self.cache, self.n, self.live = backend, cache, n, live
        valid = cache.valid[:n, :live]
        if backend == "flash":
            self.flash = _flash_kvcache()
            self.seqlens = (slot.view(-1) + 1).to(torch.int32).expand(n).contiguous()
            self.leftpad = self.seqlens - valid.sum(1, dtype=torch.int32)
        else:
            self.valid, self.slot = valid, slot.view(-1, 1)
            self.masks: dict[int | None, torch.Tensor] = {}

    def __call__(self, layer: int, q: torch.Tensor, window: int | None, scale: float) -> torch.Tensor:
        """Attention output ``[n, heads * head_dim]`` for the queries ``q`` ``[n, heads, head_dim]``
        of ``layer``: ``softmax(scale * q k^T) v`` over the row's real keys, the last ``window``
        columns only when ``window`` is set."""
        n, heads, head_dim = q.shape
        cache = self.cache
        if self.backend == "flash":
            out = self.flash(
                q[:, None], cache.keys[layer][:n, :self.live], cache.values[layer][:n, :self.live],
                cache_seqlens=self.seqlens, cache_leftpad=self.leftpad, softmax_scale=scale,
                causal=True, window_size=(-1, -1) if window is None else (window - 1, 0),
            )
            return out.reshape(n, heads * head_dim)
        if window not in self.masks:
            mask = self.valid
            if window is not None:
                cols = torch.arange(self.live, device=mask.device)
                mask = mask & (cols > self.slot - window)
            self.masks[window] = mask[:, None, None, :]
        keys, values = cache.view(layer, n, self.live)
        kv_heads = keys.shape[1]
        # The G query heads sharing a kv head go to SDPA as G query positions of that head:
        # grouped-query attention without repeating the cache.
        out = F.scaled_dot_product_attention(
            q.view(n, kv_heads, heads // kv_heads, head_dim), keys, values,
            attn_mask=self.masks[window], scale=scale,
        )
        return out.reshape(n, heads * head_dim)
