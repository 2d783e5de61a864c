"""The fixed device buffers one rollout writes, and `record_token`, the per-step bookkeeping.

A CUDA graph replays kernels on fixed addresses, so everything a decode step reads or writes
lives here, allocated once for the largest batch: each row's input token, cache column (= RoPE
position), output column and token limit (all advanced on the device), the done mask, and the
outputs written one column per row and step. Rows are independent: a row can be (re)filled with a
new sequence (`admit`) or moved (`move_rows`) between steps while the others go on.
"""

from __future__ import annotations

import torch

from rftengine.generation.sampling import SamplerSettings, noise_keys, sample


class RolloutState:
    """Buffers for up to ``rows`` sequences of up to ``columns`` generated tokens.

    Attributes (device tensors):
        tokens: ``[rows]`` int64, the last sampled token (the next step's input).
        positions: ``[rows]`` int64, the position of the next step's input token: its RoPE
            position and the cache column it is written to (prompts start at column 0).
        step: ``[rows]`` int64, tokens the row has generated: the output column its next token
            goes to, and the step that keys its sampling noise.
        limit: ``[rows]`` int64, the row's max_new_tokens: it is done once ``step == limit``.
        seed: ``[1]`` int64, the rollout's seed.
        sequence_ids: ``[rows]`` int64, each row's global sequence index: with ``seed`` and
            ``step`` it alone decides the row's sampling noise (``sampling.noise_keys``).
        done: ``[rows]`` bool, True once a row has sampled an EOS token or reached its limit
            (and for free rows).
        eos_hit: ``[rows]`` bool, True once a row has sampled an EOS token.
        pad: ``[1]`` int64, the id written after EOS.
        eos: ``[n_eos]`` int64 ids that end a sequence (may be empty).
        out_tokens ``[rows, columns]`` int64, out_logp / out_truncated ``[rows, columns]`` float32,
        out_mask ``[rows, columns]`` bool: the outputs of each row's sequence, valid in columns
            ``[0, step)``.
        nonfinite: ``[1]`` bool, True once a live row's sampled log-prob was NaN or inf, that is
            its logits held a NaN or +inf (read by the host with ``done``).
    """

    def __init__(self, rows: int, columns: int, device: torch.device, with_truncated: bool, n_eos: int):
        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.tokens = zeros(rows)
        self.positions = zeros(rows)
        self.step = zeros(rows)
        self.limit = zeros(rows)
        self.seed = zeros(1)
        self.sequence_ids = zeros(rows)
        self.done = torch.ones(rows, dtype=torch.bool, device=device)
        self.eos_hit = zeros(rows, dtype=torch.bool)
        self.pad = zeros(1)
        self.eos = zeros(n_eos)
        # one spare column: a row that is done keeps writing (pad, mask False) at column `limit`
        self.out_tokens = zeros(rows, columns + 1)
        self.out_logp = zeros(rows, columns + 1, dtype=torch.float32)
        self.out_truncated = zeros(rows, columns + 1, dtype=torch.float32) if with_truncated else None
        self.out_mask = zeros(rows, columns + 1, dtype=torch.bool)
        self.nonfinite = zeros(1, dtype=torch.bool)

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def columns(self) -> int:
        return self.out_tokens.shape[1] - 1

    @property
    def with_truncated(self) -> bool:
        return self.out_truncated is not None

    def per_row(self) -> list[torch.Tensor]:
        """The ``[rows]`` tensors that describe a row (moved with it)."""
        return [self.tokens, self.positions, self.step, self.limit, self.sequence_ids, self.done, self.eos_hit]

    def outputs(self) -> list[torch.Tensor]:
        """The ``[rows, columns + 1]`` output buffers."""
        return [t for t in (self.out_tokens, self.out_logp, self.out_truncated, self.out_mask) if t is not None]

    def start(self, pad: int, eos: torch.Tensor, seed: int) -> None:
        """Reset for a rollout: every row free (done), the rollout's pad id, EOS ids and seed."""
        self.seed.fill_(seed)
        self.pad.fill_(pad)
        self.eos.copy_(eos)
        self.free(0)
        self.nonfinite.zero_()

    def free(self, row0: int) -> None:
        """Mark rows ``row0 ..`` free: done, at position 0 and output column 0, so a step that runs
        them (CUDA-graph bucket padding) writes only harmless pads there."""
        self.done[row0:] = True
        self.positions[row0:] = 0
        self.step[row0:] = 0
        self.tokens[row0:] = self.pad

    def admit(
        self, row0: int, lengths: torch.Tensor, sequence_ids: torch.Tensor, limits: torch.Tensor
    ) -> None:
        """Start sequences in rows ``row0 .. row0 + m - 1`` whose prompts (``lengths`` ``[m]``
        int64 tokens) are in the cache from column 0; the first token comes from `record_token`
        on the prefill logits. ``sequence_ids`` / ``limits`` ``[m]`` int64."""
        rows = slice(row0, row0 + lengths.shape[0])
        self.positions[rows] = lengths
        self.step[rows] = 0
        self.limit[rows] = limits
        self.sequence_ids[rows] = sequence_ids
        self.done[rows] = False
        self.eos_hit[rows] = False

    def move_rows(self, target: torch.Tensor, source: torch.Tensor, columns: int) -> None:
        """Copy rows ``source`` to rows ``target`` (``[k]`` int64 device tensors, disjoint);
        outputs: columns ``[0, columns)`` only."""
        for t in self.per_row():
            t[target] = t[source]
        for t in self.outputs():
            t[target, :columns] = t[source, :columns]


def record_token(state: RolloutState, logits: torch.Tensor, params: SamplerSettings, row0: int = 0) -> None:
    """Sample from ``logits`` ``[n, V]`` for rows ``row0 .. row0 + n - 1``; row r writes its column
    ``step[r]``.

    Row r's noise is keyed by (``seed``, ``sequence_ids[r]``, ``step[r]``), so its token does not
    depend on which rows share the step, nor on where the row sits.

    Rows already done get the pad id, log-prob 0 and mask False (at their column ``step``, which no
    longer advances); a sampled EOS is kept (mask True) and marks its row done, as does reaching
    ``limit`` tokens. No host sync: capturable in a CUDA graph.
    """
    n = logits.shape[0]
    rows = slice(row0, row0 + n)
    step = state.step[rows]
    keys = noise_keys(state.seed, state.sequence_ids[rows], step)
    tokens, logp, truncated = sample(logits, params, keys, state.with_truncated)
    alive = ~state.done[rows]
    tokens = torch.where(alive, tokens, state.pad)
    column = step[:, None]
    state.out_tokens[rows].scatter_(1, column, tokens[:, None])
    state.out_logp[rows].scatter_(1, column, torch.where(alive, logp, 0.0)[:, None])
    if truncated is not None:
        state.out_truncated[rows].scatter_(1, column, torch.where(alive, truncated, 0.0)[:, None])
    state.out_mask[rows].scatter_(1, column, alive[:, None])
    # a flag on the device, no sync: the log-prob of the sampled token is NaN/inf exactly when
    # its row's logits hold a NaN or +inf (a -inf logit alone is a legitimate "never")
    state.nonfinite.logical_or_((alive & ~torch.isfinite(logp)).any(0, keepdim=True))
    step.add_(alive)
    finished = step >= state.limit[rows]
    if state.eos.numel():
        hit = alive & (tokens[:, None] == state.eos).any(-1)
        state.eos_hit[rows].logical_or_(hit)
        finished |= hit
    state.done[rows].logical_or_(finished)
    state.tokens[rows].copy_(tokens)


def advance(state: RolloutState, n: int) -> None:
    """After a decode step's forward on rows ``0 .. n-1``: the rows that were live move on to the
    next position (and cache column); a done row stays put, rewriting its last column."""
    state.positions[:n].add_(~state.done[:n])
