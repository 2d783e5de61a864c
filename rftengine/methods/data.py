"""Text -> token batches for every method.

One batch layout everywhere (rollouts, preference pairs, reward-model pairs): each row is a
left-padded prompt followed by a right-padded response,

    input_ids      [N, P+T]   pad .. pad p0 p1 .. p_k | r0 r1 .. r_m EOS pad .. pad
    attention_mask [N, P+T]   0 on pads, 1 elsewhere
    response_mask  [N, T]     True on response tokens r0..EOS, False on pads

so the response slice starts at the same column P in every row, the hidden states that score
it are ``hidden[:, P-1:-1]`` and the lm head never runs over prompt positions. Prompt and pad
positions are masked out; a response's EOS is inside the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rftengine.chat import (  # noqa: F401 (has_chat_template, render_prompt: part of this module's API)
    Message,
    PromptLike,
    check_messages,
    encode_prompt,
    has_chat_template,
    render_prompt,
    require_chat_template,
)
from rftengine.methods.loop import track


@dataclass
class SequenceBatch:
    """Prompt+response token batch (module docstring has the layout).

    Fields:
        input_ids: ``[N, P+T]`` int64.
        attention_mask: ``[N, P+T]`` int64 0/1.
        response_mask: ``[N, T]`` bool, True where a response token (EOS included) sits.
        prompt_length: ``P``, the column where responses start.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_length: int

    @property
    def response_ids(self) -> torch.Tensor:
        """``[N, T]`` the response tokens (pads where ``response_mask`` is False)."""
        return self.input_ids[:, self.prompt_length:]

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(
            self.input_ids.to(device), self.attention_mask.to(device),
            self.response_mask.to(device), self.prompt_length,
        )

    def select(self, rows: torch.Tensor | Sequence[int]) -> SequenceBatch:
        """The rows ``rows`` (index tensor or list), same columns."""
        rows = torch.as_tensor(rows, device=self.input_ids.device)
        return SequenceBatch(
            self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows],
            self.prompt_length,
        )


class SampledText(str):
    """A sampled response: its decoded text (no special tokens), the token ids the model
    sampled (EOS included when the model ended the response) and ``finished`` (False: cut at
    ``max_new_tokens``). It is a ``str`` everywhere text is read (judges, templates, pairs);
    ``encode_response`` trains on ``token_ids`` as they are.
    """

    token_ids: tuple[int, ...]
    finished: bool

    def __new__(cls, text: str, token_ids: Sequence[int], finished: bool):
        obj = super().__new__(cls, text)
        obj.token_ids = tuple(int(t) for t in token_ids)
        obj.finished = bool(finished)
        return obj

    def __reduce__(self):
        return SampledText, (str(self), list(self.token_ids), self.finished)


@dataclass
class PreferenceExample:
    """One tokenised preference pair (prompt shared by both responses)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None = None


# ----------------------------------------------------------------------------- tokenizer facts


def require_eos(tokenizer) -> int:
    """The tokenizer's EOS id; ValueError when it has none (responses could never end)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            "tokenizer has no EOS token (tokenizer.eos_token_id is None): responses could never "
            "end and the response mask needs one; set tokenizer.eos_token"
        )
    return int(eos)


def pad_token_id(tokenizer) -> int:
    """The pad id, falling back to EOS (padding is always masked, so any id works)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else require_eos(tokenizer)


# ----------------------------------------------------------------------------- rendering


def render_response(tokenizer, prompt: PromptLike, response: str | Sequence[Message]) -> str:
    """A response as text. A message list (e.g. ``[{"role": "assistant", ...}]``) is rendered
    as the continuation of the chat-rendered prompt (the suffix the template adds, end-of-turn
    token included: ``encode_response`` then adds no second one)."""
    if isinstance(response, str):
        return response
    check_messages(response, "response")
    require_chat_template(tokenizer, "response")
    prompt_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    head = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        prompt_messages + list(response), tokenize=False, add_generation_prompt=False
    )
    if not full.startswith(head):
        # Templates that rewrite earlier turns: fall back to the assistant contents.
        return "".join(m["content"] for m in response)
    return full[len(head):]


# ----------------------------------------------------------------------------- encoding


def encode_response(
    tokenizer, text: str, max_length: int | None = None, append_eos: bool = True
) -> list[int]:
    """Token ids of a response ending in exactly one EOS (``_end_turn``); a response cut at
    ``max_length`` gets no EOS (it did not end). A ``SampledText`` gives its sampled ids
    unchanged (its EOS only if the model produced one), cut to ``max_length``."""
    eos = require_eos(tokenizer)
    if isinstance(text, SampledText):
        ids = list(text.token_ids)
    else:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if append_eos:
            ids = _end_turn(tokenizer, ids, eos)
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length]
    return ids


def _end_turn(tokenizer, ids: list[int], eos: int) -> list[int]:
    """``ids`` ending the turn with EOS, added only when the text does not end the turn already.

    A chat template ends an assistant turn itself (ChatML: ``Blue.<|im_end|>\n``, EOS
    ``<|im_end|>``): the ids stop at that EOS, and the whitespace the template puts after it
    (which generation never produces, as it stops at EOS) is dropped. Anything else after the
    last EOS, or no EOS, gets one appended."""
    if eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        if not tokenizer.decode(ids[last + 1:]).strip():
            return ids[:last + 1]
    return ids + [eos]


def split_prompt_columns(data: Sequence[Any]) -> tuple[list[PromptLike], dict[str, list[Any]]]:
    """Prompt data -> (prompts, columns): the items are strings, message lists or rows
    ``{"prompt": ..., <column>: ...}``; ``columns`` maps every other key of the rows to one value
    per item (None where an item lacks it), leaving out columns that are None throughout. The
    columns reach TRL-style reward functions (``methods.rewards``)."""
    prompts, rows = [], []
    for i, item in enumerate(data):
        if isinstance(item, Mapping) and "role" not in item:
            if "prompt" not in item:
                raise ValueError(f"prompt data item {i} has no 'prompt' field (keys: {sorted(item)})")
            prompts.append(item["prompt"])
            rows.append(item)
        else:
            prompts.append(item)
            rows.append({})
    names = dict.fromkeys(k for row in rows for k in row if k != "prompt")
    columns = {k: [row.get(k) for row in rows] for k in names}
    return prompts, {k: v for k, v in columns.items() if any(x is not None for x in v)}


def split_prompt_data(data: Sequence[Any]) -> tuple[list[PromptLike], list[Any] | None]:
    """Prompt data (strings, message lists or dicts with "prompt" and optional "reference")
    -> (prompts, references or None)."""
    prompts, columns = split_prompt_columns(data)
    return prompts, columns.get("reference")


def encode_preferences(
    tokenizer,
    pairs: Sequence[Mapping[str, Any]],
    *,
    max_prompt_length: int | None = None,
    max_response_length: int | None = None,
) -> list[PreferenceExample]:
    """Tokenise ``[{"prompt", "chosen", "rejected"[, "margin"]}, ...]`` (strings or messages).

    Errors name the pair index and the missing field.
    """
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, Mapping):
            raise ValueError(f"preference pair {i} must be a dict, got {type(pair).__name__}")
        for key in ("prompt", "chosen", "rejected"):
            if key not in pair:
                raise ValueError(f"preference pair {i} has no {key!r} field (keys: {sorted(pair)})")
        prompt = pair["prompt"]
        out.append(PreferenceExample(
            prompt_ids=encode_prompt(tokenizer, prompt, max_prompt_length),
            chosen_ids=encode_response(tokenizer, render_response(tokenizer, prompt, pair["chosen"]),
                                       max_response_length),
            rejected_ids=encode_response(tokenizer, render_response(tokenizer, prompt, pair["rejected"]),
                                         max_response_length),
            margin=float(pair["margin"]) if pair.get("margin") is not None else None,
        ))
    return out


# ----------------------------------------------------------------------------- batching


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Left-pad token lists -> (ids ``[N, L]`` int64, attention_mask ``[N, L]`` int64)."""
    length = max(len(s) for s in seqs) if length is None else length
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, length - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, length - len(s):] = 1
    return ids, mask


def make_sequence_batch(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
) -> SequenceBatch:
    """Left-padded prompts + right-padded responses (module docstring has the layout)."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(
            f"response_ids must have one entry per prompt ({len(prompt_ids)}), got {len(response_ids)}"
        )
    p_ids, p_mask = left_pad(prompt_ids, pad_id)
    t = max(1, max(len(r) for r in response_ids))
    r_ids = torch.full((len(response_ids), t), pad_id, dtype=torch.long)
    r_mask = torch.zeros((len(response_ids), t), dtype=torch.bool)
    for i, r in enumerate(response_ids):
        if len(r):
            r_ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            r_mask[i, :len(r)] = True
    return SequenceBatch(
        input_ids=torch.cat([p_ids, r_ids], dim=1),
        attention_mask=torch.cat([p_mask, r_mask.long()], dim=1),
        response_mask=r_mask,
        prompt_length=p_ids.shape[1],
    )


def collate_preferences(examples: Sequence[PreferenceExample], pad_id: int) -> SequenceBatch:
    """Pairs -> one batch of 2B rows: ``[0:B]`` chosen, ``[B:2B]`` rejected (the fused DPO and
    reward-model convention)."""
    prompts = [e.prompt_ids for e in examples]
    responses = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    return make_sequence_batch(prompts + prompts, responses, pad_id)


def pair_values(
    examples: Sequence[PreferenceExample],
    pad_id: int,
    row_values: Callable[[SequenceBatch], torch.Tensor],
    *,
    batch_size: int,
    device: torch.device | str,
    progress: bool = False,
    desc: str = "pairs",
) -> torch.Tensor:
    """``[N, 2]`` fp32 CPU values of preference pairs, columns (chosen, rejected).

    The pairs go in ``collate_preferences`` batches of ``batch_size`` on ``device``;
    ``row_values(batch)`` returns one value per row (``[2B]``: chosen rows, then rejected).
    """
    out = []
    for start in track(range(0, len(examples), batch_size), progress, desc=desc):
        chunk = examples[start:start + batch_size]
        values = row_values(collate_preferences(chunk, pad_id).to(device)).float().cpu()
        out.append(torch.stack([values[:len(chunk)], values[len(chunk):]], dim=1))
    return torch.cat(out) if out else torch.zeros(0, 2)


def decode_responses(tokenizer, batch: SequenceBatch) -> list[str]:
    """Response texts without padding and special tokens (EOS included)."""
    ids = batch.response_ids.cpu()
    mask = batch.response_mask.cpu()
    return [
        tokenizer.decode(ids[i][mask[i]].tolist(), skip_special_tokens=True)
        for i in range(ids.shape[0])
    ]
