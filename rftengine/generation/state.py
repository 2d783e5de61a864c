"""The fixed device buffers one rollout writes, and `record_token`, the per-step bookkeeping.

A CUDA graph replays kernels on fixed addresses, so everything a decode step reads or writes
lives here, allocated once for the largest batch: the step's input tokens, the cache slot and RoPE
positions (advanced on the device), the done mask, and the outputs written one column per step.
"""

from __future__ import annotations

import torch

from rftengine.generation.sampling import SamplingParams, noise_keys, sample


class RolloutState:
    """Buffers for up to ``rows`` sequences of up to ``columns`` generated tokens.

    Attributes (device tensors):
        tokens: ``[rows]`` int64, the last sampled token (the next step's input).
        slot: ``[1]`` int64, the cache column the next decode step writes.
        positions: ``[rows]`` int64, the RoPE position of the next step's input token.
        step: ``[1]`` int64, the output column the next sampled token goes to (also the decode
            step that keys the sampling noise).
        seed: ``[1]`` int64, the rollout's seed.
        sequence_ids: ``[rows]`` int64, each row's global sequence index: with ``seed`` and
            ``step`` it alone decides the row's sampling noise (``sampling.noise_keys``).
        done: ``[rows]`` bool, True once a row has sampled an EOS token.
        pad: ``[1]`` int64, the id written after EOS.
        eos: ``[n_eos]`` int64 ids that end a sequence (may be empty).
        out_tokens ``[rows, columns]`` int64, out_logp / out_truncated ``[rows, columns]`` float32,
        out_mask ``[rows, columns]`` bool: the rollout's outputs, valid up to the current step.
        nonfinite: ``[1]`` bool, True once a live row's sampled log-prob was NaN or inf, that is
            its logits held a NaN or +inf (read by the host with ``done``, after the rollout).
    """

    def __init__(self, rows: int, columns: int, device: torch.device, with_truncated: bool, n_eos: int):
        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.tokens = zeros(rows)
        self.slot = zeros(1)
        self.positions = zeros(rows)
        self.step = zeros(1)
        self.seed = zeros(1)
        self.sequence_ids = zeros(rows)
        self.done = zeros(rows, dtype=torch.bool)
        self.pad = zeros(1)
        self.eos = zeros(n_eos)
        self.out_tokens = zeros(rows, columns)
        self.out_logp = zeros(rows, columns, dtype=torch.float32)
        self.out_truncated = zeros(rows, columns, dtype=torch.float32) if with_truncated else None
        self.out_mask = zeros(rows, columns, dtype=torch.bool)
        self.nonfinite = zeros(1, dtype=torch.bool)

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def with_truncated(self) -> bool:
        return self.out_truncated is not None

    def start(
        self, rows_used: int, slot: int, positions: torch.Tensor, pad: int, eos: torch.Tensor,
        seed: int, sequence_offset: int,
    ) -> None:
        """Reset for a rollout whose first decode step writes cache column ``slot``.

        ``positions`` ``[rows_used]`` is each row's prompt length. Row i is global sequence
        ``sequence_offset + i``. Rows past ``rows_used`` (CUDA-graph bucket padding) start done,
        so they only ever write pad tokens (their noise, keyed by the indices that follow, is unused).
        """
        self.slot.fill_(slot)
        self.step.zero_()
        self.seed.fill_(seed)
        torch.arange(sequence_offset, sequence_offset + self.rows, out=self.sequence_ids)
        self.positions.zero_()
        self.positions[:rows_used].copy_(positions)
        self.tokens.fill_(pad)
        self.done.fill_(True)
        self.done[:rows_used] = False
        self.pad.fill_(pad)
        self.eos.copy_(eos)
        self.out_mask.zero_()
        self.nonfinite.zero_()


def record_token(state: RolloutState, logits: torch.Tensor, params: SamplingParams) -> None:
    """Sample from ``logits`` ``[n, V]`` for rows ``0 .. n-1`` and write column ``state.step``.

    Row i's noise is keyed by (``seed``, ``sequence_ids[i]``, ``step``), so its token does not
    depend on which rows share the step.

    Rows already done get the pad id, log-prob 0 and mask False; a sampled EOS is kept (mask True)
    and marks its row done. No host sync: capturable in a CUDA graph.
    """
    n = logits.shape[0]
    keys = noise_keys(state.seed, state.sequence_ids[:n], state.step)
    tokens, logp, truncated = sample(logits, params, keys, state.with_truncated)
    alive = ~state.done[:n]
    tokens = torch.where(alive, tokens, state.pad)
    column = state.step
    state.out_tokens[:n].index_copy_(1, column, tokens[:, None])
    state.out_logp[:n].index_copy_(1, column, torch.where(alive, logp, 0.0)[:, None])
    if truncated is not None:
        state.out_truncated[:n].index_copy_(1, column, torch.where(alive, truncated, 0.0)[:, None])
    state.out_mask[:n].index_copy_(1, column, alive[:, None])
    # a flag on the device, no sync: the log-prob of the sampled token is NaN/inf exactly when
    # its row's logits hold a NaN or +inf (a -inf logit alone is a legitimate "never")
    state.nonfinite.logical_or_((alive & ~torch.isfinite(logp)).any(0, keepdim=True))
    if state.eos.numel():
        state.done[:n].logical_or_((tokens[:, None] == state.eos).any(-1))
    state.tokens[:n].copy_(tokens)
    state.step.add_(1)


def advance(state: RolloutState) -> None:
    """After a decode step: the next one writes the next cache column at the next position."""
    state.slot.add_(1)
    state.positions.add_(1)
