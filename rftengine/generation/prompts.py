"""Turning a batch of prompts into left-padded device tensors, with input checks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rftengine.ops._checks import as_mask, check_integer, check_ndim


def _as_id_list(i: int, prompt) -> list[int]:
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1:
            raise ValueError(f"prompts[{i}] must be a 1-D sequence of token ids, got shape {tuple(prompt.shape)}")
        check_integer(f"prompts[{i}]", prompt)
        return prompt.tolist()
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
        raise ValueError(f"prompts[{i}] must be a sequence of token ids, got {type(prompt).__name__}")
    ids = list(prompt)
    for tok in ids:
        if isinstance(tok, bool) or not isinstance(tok, int):
            raise ValueError(f"prompts[{i}] must hold ints (token ids), got {type(tok).__name__}")
    return ids


def left_pad(
    prompts, attention_mask: torch.Tensor | None, *, device: torch.device, vocab: int, pad: int
):
    """Left-align a batch of prompts.

    Args:
        prompts: a list of token-id sequences, or a ``[B, L]`` integer tensor padded on either side.
        attention_mask: with a tensor, ``[B, L]`` bool or 0/1 (True = real token); None = all real.
            Real tokens keep their order; any padding (left, right or holes) is moved left.
        vocab: ids must lie in ``[0, vocab)``.
        pad: the id written at padding positions.

    Returns:
        ``ids [B, P]`` int64 and ``mask [B, P]`` bool on ``device``, P = the longest prompt, each
        row right-aligned (padding first).
    """
    if isinstance(prompts, torch.Tensor):
        check_integer("prompts", prompts)
        check_ndim("prompts", prompts, (2,), "[batch, length] token ids")
        ids = prompts.to(device=device, dtype=torch.long)
        if attention_mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            mask = as_mask("attention_mask", attention_mask.to(device), ids.shape, ids.device)
        # A stable sort on the mask moves padding (False) in front of the tokens, in order.
        order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices
        ids, mask = ids.gather(1, order), mask.gather(1, order)
        lengths = mask.sum(1).tolist()
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask is only accepted with a padded prompt tensor, got a list of prompts")
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError(
                f"prompts must be a list of token-id sequences or a [B, L] tensor, got {type(prompts).__name__}"
            )
        rows = [_as_id_list(i, p) for i, p in enumerate(prompts)]
        lengths = [len(r) for r in rows]
        width = max(lengths, default=0)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], dtype=torch.bool)
        ids, mask = ids.reshape(len(rows), width).to(device), mask.reshape(len(rows), width).to(device)
    if not lengths:
        raise ValueError("prompts must hold at least one prompt, got an empty batch")
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise ValueError(f"every prompt needs at least one token, got empty prompt(s) at index {empty[:8]}")
    plen = max(lengths)
    ids, mask = ids[:, ids.shape[1] - plen:], mask[:, mask.shape[1] - plen:]
    bad = mask & ((ids < 0) | (ids >= vocab))
    if bool(bad.any()):
        raise ValueError(f"prompt token ids must lie in [0, {vocab}), got {ids[bad][:8].tolist()}")
    return torch.where(mask, ids, pad), mask
