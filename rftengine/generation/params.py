"""`SamplingParams`: vLLM's request shape for `Generator.generate`, and the rules that turn it into
the Generator's own arguments (the hashable `SamplerSettings`, EOS ids, per-prompt token limits).

    gen = Generator(model, tokenizer=tok, max_batch_size=64, max_seq_len=1024)
    out = gen.generate(["2 + 2 ="], SamplingParams(n=4, temperature=0.8, max_tokens=64, stop=["\\n"]))
    out.texts, out.finish_reasons
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from rftengine.generation.sampling import SamplerSettings
from rftengine.generation.stop import StopChecker, apply_stops
from rftengine.generation.text import encode_prompt, is_text_prompt, response_texts

__all__ = ["SamplingParams", "model_eos_ids", "request_params", "run_request", "same_request"]


def _int_field(name: str, value, low: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        tail = " or None" if allow_none else ""
        raise ValueError(f"SamplingParams.{name} must be an int >= {low}{tail}, got {value!r}")
    return value


def _number_field(name: str, value, rule: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"SamplingParams.{name} must be a number {rule}, got {value!r}")
    return float(value)


def _bool_field(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"SamplingParams.{name} must be True or False, got {value!r}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How to sample the responses of one `Generator.generate` call, in vLLM's shape.

    Fields (vLLM's names, defaults and meaning unless said otherwise):
        n: responses per prompt (>= 1).
        temperature: >= 0; 0 is greedy decoding (then top_k/top_p/min_p do not matter and the
            log-probs are those of the unscaled logits, temperature 1).
        top_p: nucleus mass in (0, 1]; 1 keeps every token.
        top_k: keep the k most likely tokens; 0 or -1 keeps all (both spellings accepted).
        min_p: keep tokens with probability >= min_p x the most likely one's, in [0, 1].
        seed: with each sequence's index and step, decides its sampling noise; None draws one.
        stop: a string or strings that end a response, matched in the decoded text at the
            Generator's done-check points and cut exactly (see `rftengine.generation.stop`);
            finish reason ``"stop"``. Needs a tokenizer.
        stop_token_ids: token ids that end a response besides the model's EOS ids (kept in the
            response, finish reason ``"eos"``).
        ignore_eos: do not stop at the model's EOS ids (only at ``stop_token_ids`` and
            ``stop``); with neither, every response is exactly ``max_tokens`` long.
        max_tokens: most tokens per response (>= 1); None: as many as the prompt leaves of
            ``max_seq_len`` and the model's ``max_position_embeddings``. A list of SamplingParams
            (one per prompt) may differ in ``max_tokens`` only.
        logprobs: None or 0. The sampled token's log-prob is always computed (it is what the
            trainer needs): ``GenerationOutput.logprobs`` holds it for every call, and
            `RequestOutput` lists carry it per token when ``logprobs`` is not None. The top
            alternatives (``logprobs > 0``) are not computed: refused.
        include_stop_str_in_output: keep the matched stop string at the end of the text (and
            its tokens in the response).
        skip_special_tokens: drop special tokens from the output texts.

    The model's EOS ids are taken, in this order, from ``model.generation_config.eos_token_id``
    (an int or a list), else ``model.config.eos_token_id``, and the tokenizer's
    ``eos_token_id`` is added when a tokenizer is given (chat models end a turn with it).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalise in place once, here
        _int_field("n", self.n, 1)
        put(self, "temperature", _number_field("temperature", self.temperature, ">= 0 (0 = greedy)",
                                               lambda t: t >= 0 and t != float("inf")))
        put(self, "top_p", _number_field("top_p", self.top_p, "in (0, 1] (1 = no top-p)",
                                         lambda p: 0 < p <= 1))
        put(self, "min_p", _number_field("min_p", self.min_p, "in [0, 1] (0 = no min-p)",
                                         lambda p: 0 <= p <= 1))
        _int_field("top_k", self.top_k, -1)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"SamplingParams.seed must be an int in [0, 2**63) or None, got {self.seed!r}")
        put(self, "stop", _stop_strings(self.stop))
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise ValueError(f"SamplingParams.stop_token_ids must be a list of token ids (ints >= 0) "
                                 f"or None, got {ids!r}")
            put(self, "stop_token_ids", tuple(ids))
        _int_field("max_tokens", self.max_tokens, 1, allow_none=True)
        if self.logprobs not in (None, 0) or isinstance(self.logprobs, bool):
            raise ValueError(
                "SamplingParams.logprobs must be None or 0: the sampled token's log-prob is always "
                f"returned, the top alternatives are not computed; got {self.logprobs!r}"
            )
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _bool_field(name, getattr(self, name))

    @property
    def sampler_settings(self) -> SamplerSettings:
        """The Generator's hashable sampler tuple: greedy (temperature 0) is ``top_k=1`` at
        temperature 1; top_k -1 is 0."""
        if self.temperature == 0:
            return SamplerSettings(1.0, 1, 1.0, 0.0)
        return SamplerSettings(self.temperature, max(self.top_k, 0), self.top_p, self.min_p).validate()


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    values = [stop] if isinstance(stop, str) else stop
    if not isinstance(values, Sequence) or not all(isinstance(s, str) and s for s in values):
        raise ValueError(f"SamplingParams.stop must be a non-empty string, a list of them or None, got {stop!r}")
    return tuple(values)


def same_request(params: Sequence[SamplingParams]) -> SamplingParams:
    """The one SamplingParams a list shares; ValueError naming the first field (other than
    ``max_tokens``) that differs: one call samples every row the same way."""
    first = params[0]
    for i, p in enumerate(params[1:], start=1):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")
        for f in fields(SamplingParams):
            if f.name != "max_tokens" and getattr(p, f.name) != getattr(first, f.name):
                raise ValueError(
                    f"sampling_params[{i}].{f.name} ({getattr(p, f.name)!r}) differs from sampling_params[0]'s "
                    f"({getattr(first, f.name)!r}): a list of SamplingParams may differ in max_tokens only"
                )
    return first


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def model_eos_ids(model, tokenizer=None) -> list[int]:
    """The ids that end a response by default: ``generation_config.eos_token_id`` (int or list),
    else ``config.eos_token_id``, plus the tokenizer's ``eos_token_id`` when given; in that
    order, without repeats."""
    generation_config = getattr(model, "generation_config", None)
    ids = _ids(getattr(generation_config, "eos_token_id", None))
    if not ids:
        ids = _ids(getattr(getattr(model, "config", None), "eos_token_id", None))
    if tokenizer is not None:
        ids += _ids(getattr(tokenizer, "eos_token_id", None))
    return list(dict.fromkeys(ids))


def _room(generator, length: int, where: str) -> int:
    """Most new tokens after a prompt of ``length`` (``max_tokens=None``)."""
    limit = generator.max_seq_len
    positions = getattr(generator.model.config, "max_position_embeddings", None)
    if isinstance(positions, int):
        limit = min(limit, positions)
    if length >= limit:
        raise ValueError(f"{where} has {length} tokens, leaving no room for max_tokens=None "
                         f"(max_seq_len / max_position_embeddings: {limit})")
    return limit - length


def run_request(generator, prompts, sampling_params, *, tokenizer=None, attention_mask=None,
                pad_token_id=None, sequence_offset: int = 0, return_truncated_logprobs: bool = False):
    """`Generator.generate` with a SamplingParams (or one per prompt) and/or text prompts: the
    prompts encoded, the SamplingParams turned into the Generator's arguments, stop strings
    cut, texts attached (when a tokenizer is given). ``sampling_params`` None: the defaults.
    ``pad_token_id`` None: the tokenizer's pad id, else the model config's, else the first EOS
    id, else 0. ``generator``: anything with ``generate`` taking the Generator's keywords,
    ``model``, ``max_seq_len`` (for ``max_tokens=None``)."""
    tensor_prompts = isinstance(prompts, torch.Tensor)
    count = prompts.shape[0] if tensor_prompts else len(prompts)
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != count:
            raise ValueError(f"sampling_params must be one SamplingParams or one per prompt ({count}), "
                             f"got a list of {len(sampling_params)}")
        if not sampling_params or not isinstance(sampling_params[0], SamplingParams):
            raise ValueError("sampling_params must hold SamplingParams")
        per_prompt = list(sampling_params)
    elif sampling_params is None or isinstance(sampling_params, SamplingParams):
        per_prompt = [sampling_params or SamplingParams()] * count
    else:
        raise ValueError(f"sampling_params must be a SamplingParams, a list of them or None, "
                         f"got {type(sampling_params).__name__}")
    params = same_request(per_prompt)
    if not tensor_prompts:
        if isinstance(prompts, (str, bytes)):
            raise ValueError("prompts must be a list (of strings, chat-message lists or token-id lists), "
                             "got a str")
        if any(is_text_prompt(p) for p in prompts) and tokenizer is None:
            raise ValueError("text prompts need a tokenizer: Generator(model, tokenizer=...) or "
                             "generate(..., tokenizer=...)")
        prompts = [encode_prompt(tokenizer, p, where=f"prompts[{i}]") if is_text_prompt(p) else p
                   for i, p in enumerate(prompts)]
    if params.stop and tokenizer is None:
        raise ValueError("SamplingParams.stop needs a tokenizer to decode the responses: "
                         "Generator(model, tokenizer=...) or generate(..., tokenizer=...)")
    eos = [] if params.ignore_eos else model_eos_ids(generator.model, tokenizer)
    eos = list(dict.fromkeys(eos + list(params.stop_token_ids or ())))
    if pad_token_id is None:
        pad_token_id = next((p for p in (getattr(tokenizer, "pad_token_id", None),
                                         getattr(generator.model.config, "pad_token_id", None))
                             if isinstance(p, int)), eos[0] if eos else 0)
    if tensor_prompts:
        lengths = (attention_mask.sum(1).tolist() if attention_mask is not None
                   else [prompts.shape[1]] * count)
    else:
        lengths = [len(p) for p in prompts]
    max_tokens = [p.max_tokens if p.max_tokens is not None else _room(generator, n, f"prompts[{i}]")
                  for i, (p, n) in enumerate(zip(per_prompt, lengths))]
    settings = params.sampler_settings
    stops = (StopChecker(tokenizer, params.stop, include_stop=params.include_stop_str_in_output,
                         skip_special_tokens=params.skip_special_tokens) if params.stop else None)
    out = generator.generate(
        prompts, attention_mask=attention_mask, num_samples=params.n,
        max_new_tokens=max_tokens[0] if len(set(max_tokens)) == 1 else max_tokens,
        temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, min_p=settings.min_p,
        eos_token_ids=eos, pad_token_id=pad_token_id, seed=params.seed, sequence_offset=sequence_offset,
        return_truncated_logprobs=return_truncated_logprobs, stop_checker=stops,
    )
    if stops is not None:
        # The hook already cut what it saw; this cuts for a generate without the hook (a
        # stand-in generator) and costs one read of the response ids otherwise.
        out = apply_stops(out, stops, sequence_offset, pad_token_id)
    if tokenizer is not None:
        out = out._replace(texts=response_texts(out, tokenizer, stops=stops, first_sequence=sequence_offset,
                                                skip_special_tokens=params.skip_special_tokens))
    return out


# Generate's sampling keywords and their defaults: given together with sampling_params, a keyword
# off its default is a conflict. ``eos_token_ids="model"``: the model's EOS ids (`model_eos_ids`).
KEYWORD_DEFAULTS = {"num_samples": 1, "max_new_tokens": None, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                    "min_p": 0.0, "eos_token_ids": "model", "seed": None}


def _is_default(value, default) -> bool:
    return value is default or (type(value) is type(default) and value == default)


def request_params(sampling_params, **keywords):
    """The SamplingParams (or list) of a `Generator.generate` call: ``sampling_params`` as given,
    or built from generate's keywords (``KEYWORD_DEFAULTS``); ValueError when both are given."""
    given = [k for k, v in keywords.items() if not _is_default(v, KEYWORD_DEFAULTS[k])]
    if sampling_params is not None:
        if given:
            raise ValueError("pass the sampling settings either as sampling_params or as keyword arguments, "
                             f"not both: got sampling_params and {', '.join(given)}")
        return sampling_params
    max_new = keywords["max_new_tokens"]
    if max_new is None:
        raise ValueError("max_new_tokens is required (or pass sampling_params=SamplingParams(max_tokens=...))")
    eos = keywords["eos_token_ids"]
    model_eos = isinstance(eos, str) and eos == "model"
    common = dict(
        n=keywords["num_samples"], temperature=keywords["temperature"], top_k=keywords["top_k"],
        top_p=keywords["top_p"], min_p=keywords["min_p"], seed=keywords["seed"],
        stop_token_ids=None if model_eos else _ids(eos), ignore_eos=not model_eos,
    )
    if isinstance(max_new, Sequence):
        return [SamplingParams(max_tokens=m, **common) for m in max_new]
    return SamplingParams(max_tokens=max_new, **common)
