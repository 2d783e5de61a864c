"""Text in and out of `Generator.generate`: prompts as strings or chat messages (encoded with the
tokenizer and its chat template), response texts beside the ids, and vLLM's
``RequestOutput``/``CompletionOutput`` grouping as a view of a `GenerationOutput`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rftengine.chat import encode_prompt, is_messages
from rftengine.generation.outputs import GenerationOutput

__all__ = ["CompletionOutput", "RequestOutput", "encode_prompt", "is_text_prompt", "request_outputs", "response_texts"]


def is_text_prompt(prompt) -> bool:
    """A string or a list of chat messages (``{"role", "content"}`` mappings), as opposed to
    token ids."""
    return isinstance(prompt, str) or is_messages(prompt)


def response_texts(out: GenerationOutput, tokenizer, *, stops=None, first_sequence: int = 0,
                   skip_special_tokens: bool = True) -> tuple[str, ...]:
    """Each row's response text: the kept tokens decoded, or, for a row cut at a stop string,
    the text cut exactly there (``stops.cut``; see `rftengine.generation.stop`)."""
    ids, mask = out.responses.cpu(), out.response_mask.cpu()
    texts = []
    for r in range(ids.shape[0]):
        cut = stops.cut(first_sequence + r) if stops is not None else None
        texts.append(cut[1] if cut is not None
                     else tokenizer.decode(ids[r][mask[r]].tolist(), skip_special_tokens=skip_special_tokens))
    return tuple(texts)


@dataclass
class CompletionOutput:
    """One response (vLLM's fields). ``finish_reason``: ``"eos"`` (a stop token id; vLLM says
    ``"stop"``), ``"stop"`` (a stop string) or ``"length"``. ``logprobs``: the sampled tokens'
    log-probs when asked for (``SamplingParams.logprobs`` not None), else None."""

    index: int
    text: str | None
    token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[float] | None
    finish_reason: str


@dataclass
class RequestOutput:
    """One prompt's ``n`` responses."""

    prompt: object
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


def request_outputs(out: GenerationOutput, num_samples, prompts: Sequence | None = None,
                    with_logprobs: bool = False) -> list[RequestOutput]:
    """``out`` grouped per prompt, vLLM-style (one host transfer).

    ``num_samples``: responses per prompt, or the call's `SamplingParams` (its ``n``; its
    ``logprobs`` not None also lists each token's log-prob, as ``with_logprobs`` does).
    ``prompts``: what to show as each ``RequestOutput.prompt`` (default None)."""
    if hasattr(num_samples, "logprobs"):  # a SamplingParams (not imported: params imports this module)
        with_logprobs = with_logprobs or num_samples.logprobs is not None
        num_samples = num_samples.n
    rows = out.sequences.shape[0]
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1 or rows % num_samples:
        raise ValueError(f"num_samples must be an int >= 1 dividing the {rows} rows, got {num_samples!r}")
    if prompts is not None and len(prompts) * num_samples != rows:
        raise ValueError(f"prompts must hold one entry per prompt ({rows // num_samples}), got {len(prompts)}")
    ids, mask = out.responses.cpu(), out.response_mask.cpu()
    prompt_ids, prompt_mask = out.sequences[:, :out.prompt_length].cpu(), out.prompt_mask.cpu()
    logp = out.logprobs.cpu()
    texts = out.texts
    result = []
    for b in range(rows // num_samples):
        completions = []
        for s in range(num_samples):
            r = b * num_samples + s
            token_logp = logp[r][mask[r]]
            completions.append(CompletionOutput(
                index=s, text=texts[r] if texts is not None else None, token_ids=ids[r][mask[r]].tolist(),
                cumulative_logprob=float(token_logp.sum()),
                logprobs=token_logp.tolist() if with_logprobs else None, finish_reason=out.finish_reasons[r],
            ))
        first = b * num_samples
        result.append(RequestOutput(
            prompt=prompts[b] if prompts is not None else None,
            prompt_token_ids=prompt_ids[first][prompt_mask[first]].tolist(), outputs=completions,
        ))
    return result
