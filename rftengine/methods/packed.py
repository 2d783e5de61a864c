"""Padding-free forwards: the real tokens of a padded batch packed into rows for the trunk.

Every method builds padded batches (``data.SequenceBatch``: left-padded prompts, right-padded
responses). With ``packing`` on, the trunk instead runs on the real tokens only, laid out by the
C++ packer (``rftengine.packing``):

- masked attention (``sdpa``, ``eager``): sequences packed first-fit-decreasing into rows of the
  padded batch's own width (the token budget: no row is longer than the padded rows, so the
  attention mask per row costs what a padded row costs, and there are at most as many rows),
  ``position_ids`` restarting at 0 per sequence and ``attention_mask=None``. transformers then
  finds the sequence boundaries from the position_ids (``masking_utils.find_packed_sequence_indices``)
  and builds a block-diagonal causal mask, so attention stays within each sequence. Row tails
  hold position 0 each: every pad slot is its own one-token sequence, read by nobody.
- flash-attn (``flash_attention_2``/``_3``): HF's padding-free path wants one flat row, so every
  sequence goes end to end (``pack_flat``) and ``cu_seq_lens_q/k`` and ``max_length_q/k`` are
  passed down to the varlen kernel (no per-layer host sync to infer them from position_ids).

``index`` maps every padded position back to its packed slot, so the callers gather exactly the
hidden states they read (the response-scoring positions ``P-1 .. L-2``, the last token) and the
fused heads see the same ``[N, T, H]`` tensors as in the padded forward. Exactness is verified
(tests/methods/test_packed.py) for the model families in ``PACKED_MODEL_TYPES``; any other
family or attention implementation runs padded with a warning, never silently wrong. The fused
heads compact the masked response positions out, so they too read only the response tokens.

``packing`` defaults to False in every config (as TRL's ``padding_free``): it is exact, and on
a CPU it halves the step time of a batch that is half padding (a 4-layer Qwen2, 16 rows of
8-200 tokens: 1.47 s padded, 0.82 s packed), but it is not yet measured on a GPU, where each
packed forward costs one host sync (the mask is read to lay out the rows) and the explicit
block-diagonal mask keeps sdpa off its flash kernel.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from rftengine.packing import pack_flat, pack_sequences

# Decoder families whose every layer mixes tokens only through attention masks built by
# transformers' create_causal_mask / create_sliding_window_causal_mask from position_ids, with
# positions read from position_ids (RoPE or learned): packed = padded, checked by the tests.
# Not here on purpose: hybrid/linear-attention or recurrent families (their token mixers do not
# read the mask) and anything untested.
PACKED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "gpt2"})
# Attention implementations whose mask comes from create_causal_mask (block-diagonal when packed).
MASKED_ATTENTION = frozenset({"sdpa", "eager"})
# Attention implementations that take cu_seqlens (HF's flash-attn varlen path, one flat row).
VARLEN_ATTENTION = frozenset({"flash_attention_2", "flash_attention_3"})


class PackedInputs(NamedTuple):
    """A padded ``[N, L]`` batch packed for the trunk. R = packed rows, S = their width.

    input_ids:        ``[R, S]`` int64 on the batch's device (L-wide rows; one row for varlen).
    position_ids:     ``[R, S]`` int64, 0, 1, ... within each sequence, 0 on row tails.
    index:            ``[N, L]`` int64: padded position ``(n, c)`` is packed slot ``index[n, c]``
                      of the flattened ``[R * S]`` rows; 0 where ``attention_mask`` is 0.
    attention_kwargs: for varlen attention, ``cu_seq_lens_q``/``_k`` (``[N + 1]`` int32) and
                      ``max_length_q``/``_k`` (int); else empty.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    index: torch.Tensor
    attention_kwargs: dict[str, Any]


def padding_fraction(attention_mask: torch.Tensor) -> torch.Tensor:
    """The share of the padded batch's token slots that are padding (the work packing avoids):
    ``1 - Σ mask / mask.numel()``, a detached fp32 scalar."""
    return (attention_mask.detach() == 0).float().mean()


def packing_problem(model: nn.Module) -> str | None:
    """Why a packed forward of ``model`` would not be exact (None when it is): the model family
    (``config.model_type``) or the attention implementation is not one verified to keep
    attention within each packed sequence."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKED_MODEL_TYPES:
        return (f"packing is not exact for model_type {model_type!r} (verified for "
                f"{', '.join(sorted(PACKED_MODEL_TYPES))})")
    impl = getattr(config, "_attn_implementation", None)
    if impl not in MASKED_ATTENTION | VARLEN_ATTENTION:
        return (f"packing is not exact for attention implementation {impl!r} (supported: "
                f"{', '.join(sorted(MASKED_ATTENTION | VARLEN_ATTENTION))})")
    return None


def pack_for(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedInputs | None:
    """``pack_padded`` in the layout ``model``'s attention needs, or None (with a UserWarning
    naming the reason) when ``packing_problem(model)``: the caller then runs padded."""
    problem = packing_problem(model)
    if problem is not None:
        warnings.warn(f"{problem}; this forward runs padded (set packing: false to silence)", stacklevel=3)
        return None
    varlen = model.config._attn_implementation in VARLEN_ATTENTION
    return pack_padded(input_ids, attention_mask, varlen=varlen)


def pack_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, varlen: bool = False) -> PackedInputs:
    """Packs the real tokens (``attention_mask`` 1) of each row of a padded batch.

    input_ids, attention_mask: ``[N, L]``; the real tokens of a row need not be contiguous
    (they are compacted, as the padded forward's ``cumsum(mask) - 1`` positions do).
    varlen: one flat row with cu_seqlens (flash-attn) instead of rows of width L.
    Returns ``PackedInputs`` (shapes there). One host transfer (the mask), the layout is built
    on the CPU by ``rftengine._C`` and the token ids are gathered on the batch's device.
    """
    if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask must have the shape of input_ids, a 2-D [N, L], got "
            f"{tuple(attention_mask.shape)} and {tuple(input_ids.shape)}"
        )
    n, width = input_ids.shape
    real = attention_mask.detach().to("cpu", torch.bool).numpy()
    # The packer moves "tokens" around; packing the flat padded positions of the real tokens
    # gives, for every packed slot, where its token comes from (-1 on row tails).
    src = np.flatnonzero(real)
    sequences = np.split(src, np.cumsum(real.sum(1))[:-1])
    kwargs: dict[str, Any] = {}
    device = input_ids.device
    if varlen:
        flat = pack_flat(sequences)
        rows, positions = flat.input_ids[None], flat.position_ids[None]
        cu = torch.from_numpy(flat.cu_seqlens).to(device)
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                  "max_length_q": flat.max_seqlen, "max_length_k": flat.max_seqlen}
    else:
        batch = pack_sequences(sequences, width, pad_id=-1)
        rows, positions = batch.input_ids, batch.position_ids
    slots = rows.reshape(-1)
    filled = np.flatnonzero(slots >= 0)
    index = np.zeros(n * width, np.int64)
    index[slots[filled]] = filled
    src_rows = torch.from_numpy(rows).to(device)
    return PackedInputs(
        input_ids=input_ids.reshape(-1)[src_rows.clamp(min=0)],
        position_ids=torch.from_numpy(positions).to(device),
        index=torch.from_numpy(index).view(n, width).to(device),
        attention_kwargs=kwargs,
    )
