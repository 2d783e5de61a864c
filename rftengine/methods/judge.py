"""An AI judge for RLAIF: any causal LM plus a prompt template, scoring or comparing responses.

Pointwise (Lee et al. 2023, "RLAIF"): the judge reads the template filled with a prompt and a
response and the score is the expected rating under its next-token distribution restricted to
the rating tokens ``r_1..r_K`` (values ``v_1..v_K``):

    p_k = softmax_k(z[r_k])          z: the judge's next-token logits at the end of the template
    score = Σ_k p_k · v_k

Pairwise: ``P(A ≻ B)`` from the choice tokens ("A", "B") is judged with the two responses in
both slots and averaged, so a judge that prefers a slot regardless of content cancels out:

    d_xy = z_first - z_second  with x in the first slot;  σ(d) = ½ + ½·tanh(d/2)
    pref(a, b) = ½·(σ(d_ab) + 1 - σ(d_ba)) = ½ + ¼·(tanh(d_ab/2) - tanh(d_ba/2))

so ``pref(a, b) = 1 - pref(b, a)`` and ``pref(a, a) = ½``. Both orders of a pair always run in
the same forward batch, in the same rows whichever order the caller gave, so the symmetry holds
to the last rounding of the final sum.

Only the rating/choice rows of the lm head are multiplied (``[N, H] x [H, K]``), never the full
vocabulary. A ``Judge`` is a ``reward_fn(prompts, responses) -> Tensor[B]``.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rftengine.methods.loop import track
from rftengine.methods.data import (
    PromptLike,
    encode_prompt,
    left_pad,
    pad_token_id,
    render_prompt,
)
from rftengine.methods.modeling import disable_dropout, eval_mode, final_hidden, output_head

DEFAULT_CRITERIA = "helpful, correct and clear"
JUDGE_MODES = ("pointwise", "pairwise")

POINTWISE_TEMPLATE = (
    "Rate how {criteria} the response to the request is, from {lowest} (worst) to {highest} (best).\n"
    "Request: {prompt}\n"
    "Response: {response}\n"
    "Rating: "
)

PAIRWISE_TEMPLATE = (
    "Which response to the request is more {criteria}? Answer {first} or {second}.\n"
    "Request: {prompt}\n"
    "Response {first}: {response_a}\n"
    "Response {second}: {response_b}\n"
    "Better response: "
)

# Placeholders every template may use, filled from the Judge's own settings.
_SHARED_FIELDS = {"prompt", "criteria", "lowest", "highest", "first", "second"}
_POINTWISE_FIELDS = {"response"}
_PAIRWISE_FIELDS = {"response_a", "response_b"}


def _template_fields(name: str, template: str) -> set[str]:
    if not isinstance(template, str):
        raise ValueError(f"{name} must be a string, got {type(template).__name__}")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ValueError(f"{name} is not a valid format string ({exc}); write literal braces as {{{{ }}}}") from None
    if any(f == "" or not f.isidentifier() for f in fields):
        raise ValueError(f"{name} must use named placeholders such as {{prompt}}, got {sorted(fields)}")
    return fields


def _check_template(name: str, template: str, required: set[str]) -> None:
    fields = _template_fields(name, template)
    missing = required - fields
    if missing:
        raise ValueError(f"{name} must contain the placeholders {sorted(required)}; missing {sorted(missing)}")
    unknown = fields - required - _SHARED_FIELDS
    if unknown:
        raise ValueError(
            f"{name} has unknown placeholders {sorted(unknown)}; allowed: {sorted(required | _SHARED_FIELDS)}"
        )


def single_token_id(tokenizer, text: str, what: str,
                    fix: str = "pick tokens the tokenizer keeps whole (e.g. ' 1' with a leading space)") -> int:
    """The id of ``text`` when it encodes to exactly one token; ValueError otherwise (``fix``:
    what its message tells the user to do)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"{what} {text!r} must encode to exactly one token of the judge's tokenizer, got {len(ids)} "
            f"tokens {ids}; {fix}"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and text != getattr(tokenizer, "unk_token", None):
        raise ValueError(
            f"{what} {text!r} is not in the judge tokenizer's vocabulary (it encodes to the unknown token); {fix}"
        )
    return int(ids[0])


def _option_token_ids(tokenizer, texts: Sequence[str], option: str) -> list[int]:
    """The ids of the Judge's ``option`` ("ratings" or "choices"), each one token; where one is
    not, the error gives a spelling of all of them that this tokenizer keeps whole, as the
    run file's ``judge_options`` entry."""
    what = option.removesuffix("s")
    try:
        return [single_token_id(tokenizer, t, what) for t in texts]
    except ValueError:
        spelled = _single_token_spelling(tokenizer, texts, reword=option == "choices")
        fix = (f"use judge_options.{option}=[{', '.join(map(repr, spelled))}] (one token each for this tokenizer)"
               if spelled else f"set judge_options.{option} to texts that this tokenizer keeps as one token each")
        for text in texts:
            single_token_id(tokenizer, text, what, fix)
        raise


def _single_token_spelling(tokenizer, texts: Sequence[str], reword: bool) -> list[str] | None:
    """The first way of writing all ``texts`` (as given, stripped and, with ``reword`` (labels,
    not ratings whose text is their value), their first or last word or first character; each
    with and without a leading space) in which each is one known token and the tokens differ;
    None if there is none."""
    unk = getattr(tokenizer, "unk_token_id", None)
    words = [t.split() or [""] for t in texts]
    kinds = ([t for t in texts], [t.strip() for t in texts], [w[0] for w in words], [w[-1] for w in words],
             [t.strip()[:1] for t in texts])
    for kind in kinds if reword else kinds[:2]:
        for spelled in (kind, [" " + k.lstrip() for k in kind]):
            ids = [tokenizer(k, add_special_tokens=False)["input_ids"] if k.strip() else [] for k in spelled]
            if all(len(i) == 1 and i[0] != unk for i in ids) and len({i[0] for i in ids}) == len(ids):
                return list(spelled)
    return None


class Judge:
    """A causal LM that rates responses (pointwise) or compares them (pairwise).

    Args:
        model: any Hugging Face causal LM (its trunk and lm head are used; no logits over the
            full vocabulary are formed). Dropout is disabled; weights are never changed here.
        tokenizer: the judge's tokenizer.
        template: pointwise template with ``{response}``; may also use ``{prompt}``,
            ``{criteria}``, ``{lowest}``, ``{highest}``, ``{first}``, ``{second}``. The rating is
            read from the next token after the filled template.
        pairwise_template: with ``{response_a}`` and ``{response_b}`` (same optional fields);
            the choice is read from the next token.
        ratings: the rating tokens, each one token of ``tokenizer`` (default "1".."5"). The
            default templates end with a space, so a digit is the next token as Qwen2 and
            Llama-3 tokenizers split "Rating: 4"; where a space and a digit merge into one
            token (GPT-2 style), drop the trailing space and use ratings " 1".." 5".
        rating_values: the value of each rating (default: ``float(token)``, else 1..K).
        choices: the two answer tokens of the pairwise template (first slot, second slot).
        criteria: text filled into ``{criteria}`` (e.g. a list of principles for RL-CAI).
        chat: wrap the filled template as one user message rendered with the tokenizer's chat
            template (generation prompt added), for instruction-tuned judges.
        batch_size: rows per judge forward (a pairwise comparison takes two rows).
        max_length: judge inputs longer than this many tokens keep their last ``max_length``
            tokens (the end holds the question the rating answers).
        progress: show a tqdm bar (``leave=False``) while scoring; every scoring method also
            takes ``progress=`` to override this for one call.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        template: str = POINTWISE_TEMPLATE,
        *,
        pairwise_template: str = PAIRWISE_TEMPLATE,
        ratings: Sequence[str] = ("1", "2", "3", "4", "5"),
        rating_values: Sequence[float] | None = None,
        choices: tuple[str, str] = ("A", "B"),
        criteria: str = DEFAULT_CRITERIA,
        chat: bool = False,
        batch_size: int = 16,
        max_length: int | None = 1024,
        progress: bool = False,
    ):
        _check_template("template", template, _POINTWISE_FIELDS)
        _check_template("pairwise_template", pairwise_template, _PAIRWISE_FIELDS)
        if isinstance(ratings, str) or len(ratings) < 2:
            raise ValueError(f"ratings must be a sequence of at least 2 rating tokens, got {ratings!r}")
        ratings = [str(r) for r in ratings]
        if rating_values is None:
            try:
                rating_values = [float(r) for r in ratings]
            except ValueError:
                rating_values = [float(i + 1) for i in range(len(ratings))]
        if len(rating_values) != len(ratings):
            raise ValueError(
                f"rating_values must have one value per rating ({len(ratings)}), got {len(rating_values)}"
            )
        if len(choices) != 2 or choices[0] == choices[1]:
            raise ValueError(f"choices must be two different tokens, got {choices!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be None or an integer >= 1, got {max_length!r}")
        if not isinstance(criteria, str):
            raise ValueError(f"criteria must be a string, got {type(criteria).__name__}")

        self.model = disable_dropout(model)
        self.tokenizer = tokenizer
        self.template = template
        self.pairwise_template = pairwise_template
        self.ratings = ratings
        self.rating_ids = _option_token_ids(tokenizer, ratings, "ratings")
        if len(set(self.rating_ids)) != len(ratings):
            raise ValueError(f"ratings {ratings} must map to distinct tokens, got ids {self.rating_ids}")
        self.rating_values = torch.tensor([float(v) for v in rating_values], dtype=torch.float32)
        self.choices = (str(choices[0]), str(choices[1]))
        self.choice_ids = _option_token_ids(tokenizer, self.choices, "choices")
        if self.choice_ids[0] == self.choice_ids[1]:
            raise ValueError(f"choices {choices} must map to distinct tokens")
        self.criteria = criteria
        self.chat = chat
        self.batch_size = batch_size
        self.max_length = max_length
        self.progress = bool(progress)
        self._pad = pad_token_id(tokenizer)

    # ------------------------------------------------------------------ text

    def _shared_fields(self) -> dict[str, str]:
        return {
            "criteria": self.criteria, "lowest": self.ratings[0], "highest": self.ratings[-1],
            "first": self.choices[0], "second": self.choices[1],
        }

    def _prompt_text(self, prompt: PromptLike) -> str:
        return render_prompt(self.tokenizer, prompt) if not isinstance(prompt, str) else prompt

    def pointwise_text(self, prompt: PromptLike, response: str) -> str:
        """The filled pointwise template for one (prompt, response)."""
        return self.template.format(
            **self._shared_fields(), prompt=self._prompt_text(prompt), response=response)

    def pairwise_text(self, prompt: PromptLike, response_a: str, response_b: str) -> str:
        """The filled pairwise template with ``response_a`` in the first slot."""
        return self.pairwise_template.format(
            **self._shared_fields(), prompt=self._prompt_text(prompt),
            response_a=response_a, response_b=response_b)

    def _encode(self, text: str) -> list[int]:
        item: PromptLike = [{"role": "user", "content": text}] if self.chat else text
        return encode_prompt(self.tokenizer, item, self.max_length)

    # ------------------------------------------------------------------ forward

    @torch.no_grad()
    def token_logprobs(
        self, texts: Sequence[str], token_ids: Sequence[int], *, batch_size: int | None = None,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """``[N, K]`` fp32 (CPU) log-probs of ``token_ids`` as the next token after each text,
        normalised over those K tokens only."""
        batch_size = batch_size or self.batch_size
        weight, bias = output_head(self.model)
        rows = torch.as_tensor(list(token_ids), device=weight.device)
        w = weight[rows].float()                                   # [K, H]
        b = bias[rows].float() if bias is not None else None
        starts = track(range(0, len(texts), batch_size), self._show(progress), desc="judging")
        out = []
        with eval_mode(self.model):
            for start in starts:
                ids = [self._encode(t) for t in texts[start:start + batch_size]]
                input_ids, mask = left_pad(ids, self._pad)
                hidden = final_hidden(self.model, input_ids.to(weight.device), mask.to(weight.device))
                logits = hidden[:, -1].float() @ w.T                # left padding: last column is real
                if b is not None:
                    logits = logits + b
                out.append(torch.log_softmax(logits, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(token_ids))

    def _show(self, progress: bool | None) -> bool:
        return self.progress if progress is None else bool(progress)

    # ------------------------------------------------------------------ pointwise

    def rating_logprobs(
        self, prompts: Sequence[PromptLike], responses: Sequence[str], *, progress: bool | None = None
    ) -> torch.Tensor:
        """``[B, K]`` fp32 log-probs over the rating tokens for each (prompt, response)."""
        _check_lengths(prompts, responses)
        texts = [self.pointwise_text(p, r) for p, r in zip(prompts, responses)]
        return self.token_logprobs(texts, self.rating_ids, progress=progress)

    def score(
        self, prompts: Sequence[PromptLike], responses: Sequence[str], *, progress: bool | None = None
    ) -> torch.Tensor:
        """``[B]`` fp32 expected rating ``Σ_k p_k·v_k`` (between the lowest and highest value)."""
        return self.rating_logprobs(prompts, responses, progress=progress).exp() @ self.rating_values

    def __call__(
        self, prompts: Sequence[PromptLike], responses: Sequence[str], *, progress: bool | None = None, **_: Any
    ) -> torch.Tensor:
        """``reward_fn`` form of ``score`` (extra keywords such as ``references=`` are ignored)."""
        return self.score(prompts, responses, progress=progress)

    # ------------------------------------------------------------------ pairwise

    def prefer(
        self, prompts: Sequence[PromptLike], responses_a: Sequence[str], responses_b: Sequence[str], *,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """``[B]`` fp32 probability that ``responses_a[i]`` is better than ``responses_b[i]``,
        judged in both slot orders and averaged (module docstring); ``prefer(p, a, b) = 1 -
        prefer(p, b, a)``."""
        _check_lengths(prompts, responses_a, "responses_a")
        _check_lengths(prompts, responses_b, "responses_b")
        texts, flips = [], []
        for p, a, b in zip(prompts, responses_a, responses_b):
            # Canonical order: the same two rows in the same places whichever order was asked.
            flip = b < a
            x, y = (b, a) if flip else (a, b)
            texts += [self.pairwise_text(p, x, y), self.pairwise_text(p, y, x)]
            flips.append(flip)
        # An even batch size keeps both rows of a pair in one forward batch.
        even = max(2, self.batch_size - self.batch_size % 2)
        logp = self.token_logprobs(texts, self.choice_ids, batch_size=even, progress=progress).double()
        d = logp[:, 0] - logp[:, 1]                                 # first slot vs second slot
        half = 0.25 * (torch.tanh(d[0::2] / 2) - torch.tanh(d[1::2] / 2))   # pref(x, y) - ½
        flip = torch.tensor(flips, dtype=torch.bool)
        return (0.5 + torch.where(flip, -half, half)).float()

    # ------------------------------------------------------------------ groups of candidates

    def candidate_scores(
        self, prompts: Sequence[PromptLike], candidates: Sequence[Sequence[str]], *, mode: str = "pointwise",
        progress: bool | None = None,
    ) -> list[list[float]]:
        """A strength for each of ``>= 2`` candidate responses per prompt.

        Pointwise: the expected rating (``score``). Pairwise: the mean probability of beating
        each other candidate of its prompt (``prefer`` over every unordered pair, in both slot
        orders), in [0, 1]; a group's strengths average to 1/2.
        """
        _check_mode(mode)
        _check_lengths(prompts, candidates, "candidates")
        for i, group in enumerate(candidates):
            if isinstance(group, str) or len(group) < 2:
                raise ValueError(f"candidates[{i}] must hold at least 2 responses to compare, got {group!r:.80}")
        if mode == "pointwise":
            flat = self.score([p for p, g in zip(prompts, candidates) for _ in g],
                              [r for g in candidates for r in g], progress=progress).tolist()
            out, pos = [], 0
            for group in candidates:
                out.append(flat[pos:pos + len(group)])
                pos += len(group)
            return out
        idx = [(g, i, j) for g, group in enumerate(candidates)
               for i in range(len(group)) for j in range(i + 1, len(group))]
        probs = self.prefer(
            [prompts[g] for g, _, _ in idx],
            [candidates[g][i] for g, i, _ in idx],
            [candidates[g][j] for g, _, j in idx],
            progress=progress,
        ).tolist()
        wins = [[0.0] * len(group) for group in candidates]
        for (g, i, j), p_ij in zip(idx, probs):
            wins[g][i] += p_ij
            wins[g][j] += 1.0 - p_ij
        return [[w / (len(group) - 1) for w in row] for row, group in zip(wins, candidates)]

    def group_scores(
        self, prompts: Sequence[PromptLike], responses: Sequence[str], group_size: int, *,
        mode: str = "pairwise", progress: bool | None = None,
    ) -> torch.Tensor:
        """``[N]`` fp32 ``candidate_scores`` of rollouts laid out group-contiguously (rows
        ``[i*G, (i+1)*G)`` answer the same prompt, as the Generator and ``ppo.rollout`` emit)."""
        _check_lengths(prompts, responses)
        if not isinstance(group_size, int) or group_size < 2 or len(responses) % group_size:
            raise ValueError(
                f"group_size must be an integer >= 2 that divides the {len(responses)} responses, got {group_size!r}"
            )
        starts = range(0, len(responses), group_size)
        scores = self.candidate_scores([prompts[s] for s in starts],
                                       [list(responses[s:s + group_size]) for s in starts], mode=mode,
                                       progress=progress)
        return torch.tensor([x for row in scores for x in row], dtype=torch.float32)

    def group_reward(self, group_size: int, *, mode: str = "pairwise", progress: bool | None = None) -> GroupReward:
        """A ``reward_fn`` that scores each rollout against the others of its group
        (``group_scores``): the pairwise judge as the reward of GRPO/RLOO/PPO."""
        return GroupReward(self, group_size, mode, progress=progress)

    def as_reward_fn(self, mode: str = "pointwise", *, group_size: int | None = None,
                     progress: bool | None = None):
        """The judge as the ``reward_fn`` of PPO/GRPO/RLOO: pointwise, the judge itself (its
        expected rating); pairwise, ``group_reward(group_size)`` (each rollout against the
        others of its group). ``progress`` None follows ``self.progress``."""
        _check_mode(mode)
        if mode == "pairwise":
            return self.group_reward(group_size, mode="pairwise", progress=progress)
        return self if progress is None else functools.partial(self, progress=progress)

    # ------------------------------------------------------------------ pairs for DPO

    def preference_pairs(
        self,
        prompts: Sequence[PromptLike],
        candidates: Sequence[Sequence[str]],
        *,
        mode: str = "pointwise",
        min_margin: float = 0.0,
        progress: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Preference pairs from ``>= 2`` candidate responses per prompt: chosen = the strongest
        and rejected = the weakest candidate by ``candidate_scores``, margin = the difference of
        their strengths (pairwise with 2 candidates: ``2·prefer(chosen, rejected) - 1``).

        Prompts whose margin is ``<= min_margin`` (ties, identical candidates) give no pair.
        Returns ``[{"prompt", "chosen", "rejected", "margin"}, ...]`` in prompt order.
        """
        scores = self.candidate_scores(prompts, candidates, mode=mode, progress=progress)
        return pairs_from_scores(prompts, candidates, scores, min_margin=min_margin)


def pairs_from_scores(
    prompts: Sequence[PromptLike],
    candidates: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    *,
    min_margin: float = 0.0,
) -> list[dict[str, Any]]:
    """(strongest ≻ weakest) candidate of each prompt by ``scores``, skipping prompts whose
    margin is ``<= min_margin`` or whose two candidates are the same text. Returns
    ``[{"prompt", "chosen", "rejected", "margin"}, ...]`` in prompt order."""
    pairs = []
    for prompt, group, s in zip(prompts, candidates, scores):
        best = max(range(len(s)), key=s.__getitem__)
        worst = min(range(len(s)), key=s.__getitem__)
        margin = s[best] - s[worst]
        if group[best] != group[worst] and margin > min_margin:
            pairs.append({"prompt": prompt, "chosen": group[best], "rejected": group[worst],
                          "margin": float(margin)})
    return pairs


class GroupReward:
    """``reward_fn(prompts, responses) -> Tensor[N]``: ``judge.group_scores`` with a fixed
    group size (made by ``Judge.group_reward``); ``progress`` None follows ``judge.progress``."""

    def __init__(self, judge: Judge, group_size: int, mode: str = "pairwise", *, progress: bool | None = None):
        _check_mode(mode)
        if not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f"group_size must be an integer >= 2 (responses compared per prompt), got {group_size!r}")
        self.judge, self.group_size, self.mode, self.progress = judge, group_size, mode, progress

    def __call__(self, prompts: Sequence[PromptLike], responses: Sequence[str], **_: Any) -> torch.Tensor:
        return self.judge.group_scores(prompts, responses, self.group_size, mode=self.mode, progress=self.progress)


def _check_mode(mode: str) -> None:
    if mode not in JUDGE_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, JUDGE_MODES))}, got {mode!r}")


def _check_lengths(prompts: Sequence[Any], other: Sequence[Any], name: str = "responses") -> None:
    if isinstance(prompts, (str, Mapping)) or isinstance(other, (str, Mapping)):
        raise ValueError(f"prompts and {name} must be lists, got {type(prompts).__name__} and {type(other).__name__}")
    if len(prompts) != len(other):
        raise ValueError(f"{name} must have one entry per prompt ({len(prompts)}), got {len(other)}")
