"""What a rollout returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class GenerationOutput(NamedTuple):
    """One rollout of ``N = B * num_samples`` sequences; row ``b * num_samples + s`` is sample s of
    prompt b. Prompts are left-padded to the batch's longest prompt P; responses start at column P.

    sequences: ``[N, P + T]`` int64: prompt (left-padded with the pad id), then T generated
        tokens; after a row's end (EOS, limit or stop cut) the pad id. T is the longest
        response's length (<= the largest max_new_tokens).
    prompt_mask: ``[N, P]`` bool, True at real prompt tokens.
    response_mask: ``[N, T]`` bool, True for generated tokens up to and including the EOS.
    logprobs: ``[N, T]`` float32, ``log softmax(logits / temperature)[token]`` over the full
        vocabulary (``rftengine.ops.token_logprobs``, as in training); 0 where the mask is False.
    truncated_logprobs: ``[N, T]`` float32 log-prob under the top-k/top-p distribution that was
        actually sampled from (None unless asked for); 0 where the mask is False.
    finish_reasons: N strings, ``"eos"`` (sampled an EOS id), ``"length"`` (hit its
        max_new_tokens) or ``"stop"`` (cut by the stop checker, e.g. at a stop string).
    texts: N decoded responses when a tokenizer was given (``Generator(tokenizer=)`` or
        ``generate(tokenizer=)``), cut exactly at a stop string; else None.
    """

    sequences: torch.Tensor
    prompt_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    truncated_logprobs: torch.Tensor | None
    finish_reasons: tuple[str, ...]
    texts: tuple[str, ...] | None = None

    @property
    def prompt_length(self) -> int:
        """P: the column where responses start."""
        return self.prompt_mask.shape[1]

    @property
    def responses(self) -> torch.Tensor:
        """``[N, T]`` the generated tokens (pad id after EOS)."""
        return self.sequences[:, self.prompt_length:]

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[N, P + T]`` bool, True at real prompt and response tokens: the trainer's input mask."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        """``[N, P + T]`` int64 positions the rollout used: 0 at each row's first real token."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp_(min=0)

    @property
    def response_lengths(self) -> torch.Tensor:
        """``[N]`` int64 generated tokens per row, EOS included."""
        return self.response_mask.sum(-1)
