"""Stop strings: find them in the decoded responses and cut each response exactly there.

`StopChecker` is the Generator's ``stop_checker`` hook: at each done-check point it gets the live
sequences' response ids so far, decodes only what is new (plus the previous chunk, for the
tokenizer's context), and returns, per sequence, None (go on) or the number of response tokens
to keep. A stop string may span several tokens and several checks.

Where the cut falls (c = the stop string's start, or its end with ``include_stop``):
    text: cut exactly at c (vLLM's output text).
    tokens: the fewest response tokens whose decoded text reaches c, so that the log-probs the
        trainer uses are those of exactly the kept tokens, and the kept tokens are a prefix of
        what the model sampled. When c falls inside a token (a stop string starting, or with
        ``include_stop`` ending, mid-token), that token is kept: its few characters past c are
        in the ids but not in the text. A response is never cut to zero tokens (a stop string
        at the very start keeps the first token; the text is then empty or the stop string).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rftengine.generation.outputs import GenerationOutput

__all__ = ["StopChecker", "apply_stops"]


@dataclass
class _Decoded:
    """One sequence's incremental decode: ``text`` = decode(ids[:read]); ``prefix`` starts the
    chunk decoded again as context for the next one (vLLM's prefix/read offsets)."""

    text: str = ""
    prefix: int = 0
    read: int = 0


class StopChecker:
    """Callable ``(sequence_ids: list[int], responses: list[list[int]]) -> list[int | None]``.

    Args:
        tokenizer: a Hugging Face tokenizer (``decode``).
        stops: the stop strings (non-empty).
        include_stop: keep the stop string at the end of the text (and its tokens).
        skip_special_tokens: decode without special tokens (as the output texts are).

    After a cut, ``cut(sequence)`` gives ``(tokens kept, text)``.
    """

    def __init__(self, tokenizer, stops: Sequence[str], *, include_stop: bool = False,
                 skip_special_tokens: bool = True):
        if not stops or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stops must be non-empty strings, got {stops!r}")
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self._longest = max(len(s) for s in self.stops)
        self._decoded: dict[int, _Decoded] = {}
        self._cuts: dict[int, tuple[int, str]] = {}

    def __call__(self, sequence_ids: Sequence[int], responses: Sequence[Sequence[int]]) -> list[int | None]:
        return [self.check(s, r) for s, r in zip(sequence_ids, responses, strict=True)]

    def cut(self, sequence: int) -> tuple[int, str] | None:
        """``(tokens kept, text)`` of a sequence cut at a stop string, else None."""
        return self._cuts.get(sequence)

    def check(self, sequence: int, ids: Sequence[int]) -> int | None:
        """Tokens to keep of ``sequence`` (its response ids so far), or None: no stop string yet."""
        if sequence in self._cuts:
            return self._cuts[sequence][0]
        state = self._decoded.setdefault(sequence, _Decoded())
        old = len(state.text)
        self._extend(state, list(ids))
        # Only the new text and the stop-length-minus-one characters before it can hold a
        # first occurrence: earlier text was searched at earlier checks.
        window = state.text[max(0, old - self._longest + 1):]
        if len(state.text) == old or not any(s in window for s in self.stops):
            return None
        # A hit: decode the whole response once (the ground truth the token search uses).
        text = self._decode(ids)
        hits = [(i, len(s)) for s in self.stops if (i := text.find(s)) >= 0]
        if not hits:
            return None
        start, length = min(hits)
        end = start + length if self.include_stop else start
        keep = self._tokens_reaching(ids, end)
        self._cuts[sequence] = (keep, text[:end])
        self._decoded.pop(sequence)
        return keep

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def _extend(self, state: _Decoded, ids: list[int]) -> None:
        if len(ids) <= state.read:
            return
        before = self._decode(ids[state.prefix:state.read])
        after = self._decode(ids[state.prefix:])
        if after.endswith("\ufffd"):
            return  # a multi-byte character still incomplete: wait for its last token
        state.text += after[len(before):]
        state.prefix, state.read = state.read, len(ids)

    def _tokens_reaching(self, ids: Sequence[int], end: int) -> int:
        """The fewest tokens (>= 1) whose decoded text is at least ``end`` characters long:
        a binary search over prefixes (text length grows with the prefix)."""
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._decode(ids[:mid])) >= end:
                hi = mid
            else:
                lo = mid + 1
        return lo


def apply_stops(out: GenerationOutput, checker: StopChecker, first_sequence: int, pad_id: int) -> GenerationOutput:
    """``out`` with every response cut at its first stop string.

    The Generator calls the checker at its done-check points only; a response that ended (EOS
    or length) between two checks is checked here, and so is any response when the Generator
    was run without the hook. Cut rows get finish reason ``"stop"``, the pad id and a False
    mask after the kept tokens, and zero log-probs there. Row r is sequence ``first_sequence + r``.
    """
    ids = out.responses.cpu()
    mask = out.response_mask.cpu()
    lengths = mask.sum(1).tolist()
    reasons = list(out.finish_reasons)
    cuts = {}
    for r, length in enumerate(lengths):
        keep = checker.check(first_sequence + r, ids[r, :length].tolist())
        if keep is not None and (keep < length or reasons[r] != "stop"):
            cuts[r] = keep
            reasons[r] = "stop"
    if not cuts:
        return out
    cut_mask = out.response_mask.clone()
    columns = torch.arange(cut_mask.shape[1], device=cut_mask.device)
    for r, keep in cuts.items():
        cut_mask[r] &= columns < keep
    plen = out.prompt_length
    sequences = out.sequences.clone()
    sequences[:, plen:] = torch.where(cut_mask, sequences[:, plen:], pad_id)
    truncated = out.truncated_logprobs
    return out._replace(
        sequences=sequences,
        response_mask=cut_mask,
        logprobs=out.logprobs.masked_fill(~cut_mask, 0.0),
        truncated_logprobs=truncated.masked_fill(~cut_mask, 0.0) if truncated is not None else None,
        finish_reasons=tuple(reasons),
    )
