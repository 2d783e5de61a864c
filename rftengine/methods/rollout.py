"""The one sampling path of every method: prompts -> Generator -> ``Rollout``.

PPO/GRPO/RLOO train on a ``Rollout`` directly; online DPO (RLAIF) and Constitutional AI take
its ``sampled_texts()``: the decoded texts for the judge and the templates, each carrying the
token ids the model sampled and whether it ended them. ``encode_response`` trains on those ids
as they are, so a response cut at ``max_new_tokens`` never gets an EOS the model did not
produce, and the trained ids are the sampled ones (decoding and re-tokenising need not give
them back).

The Generator is called through the vLLM-shaped API (`SamplingParams`, `run_request`). Stop
strings (the configs' ``stop``) end a response with the stop string kept, so the model is trained
to write it: the text ends right after it, the trained ids are the sampled ids up to the token
that completes it, and the log-probs are those of exactly those ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rftengine import distributed
from rftengine.generation.params import SamplingParams, run_request
from rftengine.methods.data import (
    PromptLike,
    SampledText,
    SequenceBatch,
    encode_prompt,
    pad_token_id,
    require_eos,
)
from rftengine.methods.modeling import require_positions


@dataclass
class Rollout:
    """Sampled responses of one Generator call (rows group-contiguous: prompt i owns rows
    ``[i*G, (i+1)*G)``).

    Fields:
        prompts: ``N`` prompts (each repeated ``group_size`` times).
        responses: ``N`` decoded response texts (no special tokens).
        columns: the prompt data's extra columns (``{"answer": [...]}``), each ``N`` values
            (a prompt's value repeated for each of its samples); None or {} when it has none.
        batch: ``SequenceBatch`` ``[N, P+T]`` (left-padded prompt | the sampled response ids).
        logprobs: ``[N, T]`` fp32 rollout log-probs (temperature-scaled, full vocabulary).
        eos: ``[N]`` bool, the response ended: with an EOS id or at a stop string (False = cut
            at max_new_tokens).
        group_size: G.
    """

    prompts: list[Any]
    responses: list[str]
    columns: dict[str, list[Any]] | None
    batch: SequenceBatch
    logprobs: torch.Tensor
    eos: torch.Tensor
    group_size: int

    def sampled_texts(self) -> list[SampledText]:
        """``N`` response texts, each with its sampled token ids (EOS included when the model
        ended it) and finish flag; one host transfer."""
        ids = self.batch.response_ids.cpu()
        mask = self.batch.response_mask.cpu()
        finished = self.eos.cpu().tolist()
        return [SampledText(text, ids[i][mask[i]].tolist(), finished[i])
                for i, text in enumerate(self.responses)]


@torch.no_grad()
def sample_rollout(
    generator,
    tokenizer,
    prompts: Sequence[PromptLike],
    *,
    num_samples: int,
    max_new_tokens: int,
    max_prompt_length: int | None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    stop: Sequence[str] | None = None,
    seed: int,
    columns: Mapping[str, Sequence[Any]] | None = None,
    length_fields: str = "max_prompt_length or max_new_tokens",
    sequence_offset: int | None = None,
) -> Rollout:
    """Sample ``num_samples`` responses per prompt in one ``generator.generate`` call.

    Prompts are strings or chat-message lists (rendered with the chat template), truncated
    from the left to ``max_prompt_length``. A prompt + ``max_new_tokens`` longer than the
    model's ``max_position_embeddings`` is refused before sampling (the message names
    ``length_fields``, the config fields to lower). ``columns``: the prompts' extra data
    columns (one value per prompt each), carried to ``Rollout.columns`` per sample.
    ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``stop``: see `SamplingParams`; a response
    ends at the model's EOS ids and the tokenizer's, or right after a ``stop`` string.

    Each response's sampling noise is keyed by (``seed``, its global sequence index, step):
    response s of prompt p is sequence ``sequence_offset + p * num_samples + s``. The default
    offset takes ``prompts`` as this rank's contiguous share of a global batch, every rank
    holding as many (``distributed.shard_batch``): rank r starts at ``r * len(prompts) *
    num_samples``, so N ranks sample exactly the responses one process samples for the whole
    batch with the same seed (up to the logits' last bits, see ``Generator``). Pass 0 for
    prompts that are not such a share (every rank sampling the same prompts).
    """
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt, got 0")
    for name, values in (columns or {}).items():
        if len(values) != len(prompts):
            raise ValueError(f"column {name!r} must have one entry per prompt ({len(prompts)}), got {len(values)}")
    require_eos(tokenizer)
    params = SamplingParams(
        n=num_samples, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
        max_tokens=max_new_tokens, stop=stop, include_stop_str_in_output=True,
    )
    prompt_ids = [encode_prompt(tokenizer, p, max_prompt_length) for p in prompts]
    model = getattr(generator, "model", None)
    if model is not None:
        longest = max(len(p) for p in prompt_ids)
        require_positions(model, longest + max_new_tokens,
                          f"the longest prompt + max_new_tokens, {longest} + {max_new_tokens}", length_fields)
    if sequence_offset is None:
        sequence_offset = distributed.rank() * len(prompts) * num_samples
    # A model sharded over the ranks (FSDP2) rolls out over its gathered full weights, and the
    # Generator's cache and graphs, which point into them, are freed before training.
    with distributed.gathered(model) as sharded:
        out = run_request(generator, prompt_ids, params, tokenizer=tokenizer,
                          pad_token_id=pad_token_id(tokenizer), sequence_offset=sequence_offset)
        if sharded:
            generator.free()
    batch = SequenceBatch(
        input_ids=out.sequences,
        attention_mask=out.attention_mask.long(),
        response_mask=out.response_mask.bool(),
        prompt_length=out.prompt_length,
    )
    finished = torch.tensor([r != "length" for r in out.finish_reasons], dtype=torch.bool,
                            device=out.sequences.device)
    return Rollout(
        prompts=[p for p in prompts for _ in range(num_samples)],
        responses=list(out.texts),
        columns={name: [v for v in values for _ in range(num_samples)] for name, values in (columns or {}).items()},
        batch=batch,
        logprobs=out.logprobs.float(),
        eos=finished,
        group_size=num_samples,
    )
