"""Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback").

A constitution is a list of principles, each a critique request and a revision request. For each
prompt the policy answers, critiques its own answer under one sampled principle, and revises it;
the three stages run batched through the Generator. Training then uses either

- mode "sft_dpo" (default): SFT on the revisions, then DPO on (revision ≻ original) pairs
  (modes "sft" and "dpo" run one of the two), or
- mode "rl" (RL-CAI): optionally SFT on the revisions, then PPO/GRPO/RLOO with a Judge whose
  template lists the principles (``principle_judge``).

The constitution itself (principles, loading, validation, prompt templates) is
``rftengine.methods.constitution``; this module is the CAI driver.

Three lines::

    constitution = load_constitution()            # the default set shipped with rftengine
    result = train_cai(policy, tokenizer, prompts, CAIConfig(max_new_tokens=128), constitution=constitution)
    print(result.pairs[0])                        # {"prompt", "chosen": revision, "rejected": original}
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rftengine import distributed
from rftengine.methods.config_base import (
    ConfigBase,
    LoopFields,
    SamplingFields,
    option,
    redefault,
    stage,
    stage_config,
)
from rftengine.methods.loop import Callback, CheckpointFn
from rftengine.methods.metric_names import Metrics
from rftengine.methods.precision import resolve_precision
from rftengine.methods.train_state import FixedTensors, TrainState, stage_state, unwrap_stage_state
from rftengine.methods.data import (
    PromptLike,
    SampledText,
    has_chat_template,
    render_prompt,
    require_eos,
    split_prompt_data,
)
from rftengine.methods.constitution import (
    CRITIQUE_FIELDS,
    CRITIQUE_TEMPLATE,
    REVISION_FIELDS,
    REVISION_TEMPLATE,
    Constitution,
    load_constitution,
    principle_judge,
)
from rftengine.methods.dpo import DPOConfig, train_dpo
from rftengine.methods.judge import JUDGE_MODES, Judge, _template_fields
from rftengine.methods.modeling import (
    check_trainable_model,
    device_of,
    disable_dropout,
    freeze,
    is_peft_model,
)
from rftengine.methods.ppo import require_prompt_positions, train_ppo
from rftengine.methods.ppo_config import PPOConfig
from rftengine.methods.result import TrainResult
from rftengine.methods.rlaif import sample_responses
from rftengine.methods.sft import SFTConfig, train_sft

CAI_MODES = ("sft_dpo", "sft", "dpo", "rl")


# ----------------------------------------------------------------------------- config


@dataclass
class CAIConfig(ConfigBase, SamplingFields):
    """Options of ``train_cai`` (validated on construction; ``from_dict`` rejects unknown keys).

    mode: "sft_dpo" (SFT on revisions, then DPO on revision ≻ original), "sft", "dpo", or "rl"
        (RL-CAI: SFT on revisions when ``sft_before_rl``, then PPO/GRPO/RLOO with a
        principle-guided Judge).
    Data generation: responses to prompts cut to ``max_prompt_length`` tokens, up to
    ``max_new_tokens``; critiques and revisions up to ``critique_max_new_tokens`` /
    ``revision_max_new_tokens`` (None: ``max_new_tokens``) with their contexts cut (from the
    left) to ``max_context_length``; sampling ``temperature``/``top_k``/``top_p``;
    ``generation_batch_size`` sequences per Generator call.
    critique_template / revision_template: plain-text stage prompts (chat-message prompts with
    a chat template run as a conversation instead). Placeholders: {prompt}, {response},
    {critique_request} (+ {critique}, {revision_request} for the revision).
    sft, dpo, rl: the stage configs (SFTConfig, DPOConfig, PPOConfig or mappings of their
    options, kept as given; ``sft_config`` / ``dpo_config`` / ``rl_config`` build them over
    defaults sized by this config); rl defaults to GRPO with 4 samples per prompt. judge_mode: how the RL-CAI judge
    scores ("pointwise" or "pairwise").
    """

    mode: Literal[CAI_MODES] = option("sft_dpo", "sft_dpo, sft, dpo or rl (RL-CAI)")
    critique_max_new_tokens: int = option(64, "tokens per critique", min=1)
    revision_max_new_tokens: int | None = option(None, "tokens per revision (null: max_new_tokens)", min=1)
    max_context_length: int = option(1024, "critique/revision contexts are cut to this many tokens", min=1)
    generation_batch_size: int = option(16, "sequences per Generator call", min=1)
    critique_template: str = option(CRITIQUE_TEMPLATE, "critique prompt: {prompt}, {response}, "
                                                       "{critique_request}")
    revision_template: str = option(REVISION_TEMPLATE, "revision prompt: the critique's placeholders plus "
                                                       "{critique}, {revision_request}")
    sft: SFTConfig | Mapping[str, Any] | None = stage(SFTConfig, "SFTConfig options of the SFT stage")
    dpo: DPOConfig | Mapping[str, Any] | None = stage(DPOConfig, "DPOConfig options of the DPO stage")
    rl: PPOConfig | Mapping[str, Any] | None = stage(PPOConfig, "PPOConfig options of RL-CAI "
                                                     "(default: grpo, 4 samples per prompt)")
    sft_before_rl: bool = option(True, "rl mode: SFT on revisions before the RL stage")
    judge_mode: Literal[JUDGE_MODES] = option("pointwise", "how the RL-CAI judge scores")
    seed: int = redefault(LoopFields, "seed", 0)

    def validate(self):
        owner = type(self).__name__
        for name, template, required in (("critique_template", self.critique_template, CRITIQUE_FIELDS),
                                         ("revision_template", self.revision_template, REVISION_FIELDS)):
            fields = _template_fields(f"{owner}.{name}", template)
            if fields != required:
                raise ValueError(
                    f"{owner}.{name} must use exactly the placeholders {sorted(required)}, got {sorted(fields)}"
                )
        for name in ("sft", "dpo", "rl"):
            if getattr(self, name) is not None and name not in self.stages:
                raise ValueError(f"{owner}.{name} is not used with mode={self.mode!r}"
                                 + (" and sft_before_rl=False" if name == "sft" and self.mode == "rl" else ""))
        for name in self.stages:
            _ = getattr(self, f"{name}_config")          # validate the stage configs now
        if "rl" in self.stages and self.judge_mode == "pairwise" and self.rl_config.group_size < 2:
            raise ValueError(
                f"{owner}.rl.group_size must be >= 2 with judge_mode='pairwise' (responses are "
                f"compared within a prompt's group), got {self.rl_config.group_size}"
            )

    @property
    def sft_config(self) -> SFTConfig:
        """The SFTConfig of the SFT stage (``sft`` over defaults sized by this config)."""
        return stage_config(self, "sft", {"max_prompt_length": self.max_prompt_length,
                                          "max_response_length": self.revision_new_tokens + 1})

    @property
    def dpo_config(self) -> DPOConfig:
        """The DPOConfig of the DPO stage (``dpo`` over defaults sized by this config)."""
        return stage_config(self, "dpo", {
            "max_prompt_length": self.max_prompt_length,
            "max_response_length": max(self.max_new_tokens, self.revision_new_tokens) + 1})

    @property
    def rl_config(self) -> PPOConfig:
        """The PPOConfig of RL-CAI (``rl`` over GRPO with 4 samples per prompt)."""
        return stage_config(self, "rl", {"algorithm": "grpo", "group_size": 4, "max_new_tokens": self.max_new_tokens,
                                         "max_prompt_length": self.max_prompt_length})

    @property
    def stages(self) -> tuple[str, ...]:
        """The training stages of ``mode``, in order."""
        if self.mode == "sft_dpo":
            return ("sft", "dpo")
        if self.mode == "rl":
            return ("sft", "rl") if self.sft_before_rl else ("rl",)
        return (self.mode,)

    @property
    def revision_new_tokens(self) -> int:
        return self.revision_max_new_tokens or self.max_new_tokens


# ----------------------------------------------------------------------------- data generation


@dataclass
class CAIExample:
    """One prompt through the three stages: the original response, the sampled principle, the
    critique and the revision (texts without special tokens).

    Generated responses and revisions are ``SampledText``: the ids the policy sampled and
    whether it ended them, which is what SFT and DPO train on (a revision cut at
    ``revision_max_new_tokens`` keeps no EOS). The revision's ids were sampled after the
    revision prompt and are trained as the answer to the original prompt: they are the
    revision's own sampled ids and finish reason, never a re-tokenisation of its text.
    """

    prompt: PromptLike
    response: str
    principle: str
    critique: str
    revision: str

    def as_dict(self) -> dict[str, Any]:
        """Plain data (checkpoints): the texts, plus ``<field>_ids`` / ``<field>_finished`` for
        the sampled response and revision."""
        out = {"prompt": self.prompt, "response": str(self.response), "principle": self.principle,
               "critique": str(self.critique), "revision": str(self.revision)}
        for name in ("response", "revision"):
            value = getattr(self, name)
            if isinstance(value, SampledText):
                out[f"{name}_ids"] = list(value.token_ids)
                out[f"{name}_finished"] = value.finished
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> CAIExample:
        """The inverse of ``as_dict``."""
        record = dict(record)
        for name in ("response", "revision"):
            ids, finished = record.pop(f"{name}_ids", None), record.pop(f"{name}_finished", None)
            if ids is not None:
                record[name] = SampledText(record[name], ids, bool(finished))
        return cls(**record)


def _stage_prompt(tokenizer, prompt: PromptLike, turns: list[tuple[str, str]], template: str, **fields) -> PromptLike:
    """A chat conversation (message-list prompt + ``turns`` of (role, content)) when the prompt
    is chat and the tokenizer has a template; else the plain-text ``template`` filled in."""
    if not isinstance(prompt, str) and has_chat_template(tokenizer):
        return list(prompt) + [{"role": role, "content": content} for role, content in turns]
    return template.format(prompt=render_prompt(tokenizer, prompt), **fields)


@torch.no_grad()
def generate_revisions(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[PromptLike],
    constitution: Constitution,
    config: CAIConfig | None = None,
    *,
    generator=None,
    seed: int | None = None,
    progress: bool = False,
) -> list[CAIExample]:
    """Response -> critique under a sampled principle -> revision, for every prompt.

    Each stage is one batched pass through the Generator (``generator``, or one built on
    ``policy`` for the call). Principles are drawn with ``seed`` (default ``config.seed``).
    ``progress`` shows a bar per stage (removed when the stage is done).

    Under torchrun every rank passes all the prompts: each generates its contiguous share
    (``distributed.even_share``, padded so that every rank makes as many Generator calls over
    the gathered weights) and every rank returns all the examples, in prompt order. Each
    response's noise is keyed by its prompt's global index (``sample_responses``), so N ranks
    generate what one process generates.
    """
    from rftengine.generation import Generator

    config = config or CAIConfig()
    seed = config.seed if seed is None else seed
    require_eos(tokenizer)
    if not isinstance(constitution, Constitution):
        raise ValueError(
            f"constitution must be a Constitution (see load_constitution), got {type(constitution).__name__}"
        )
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got 0")
    longest_new = max(config.max_new_tokens, config.critique_max_new_tokens, config.revision_new_tokens)
    own_generator = generator is None
    if own_generator:
        disable_dropout(policy)
        generator = Generator(policy, max_batch_size=config.generation_batch_size,
                              max_seq_len=max(config.max_context_length, config.max_prompt_length) + longest_new)
        policy.eval()
    sampling = {"temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p,
                "min_p": config.min_p, "stop": config.stop}
    everything = prompts
    start, stop, per_rank = distributed.even_share(len(prompts))
    # This rank's share, padded with repeats of the first prompt (their examples are dropped).
    prompts = prompts[start:stop] + [prompts[0]] * (per_rank - (stop - start))

    def run(stage_prompts, max_prompt_length, new_tokens, salt, fields):
        out = sample_responses(generator, tokenizer, stage_prompts, num_samples=1, max_new_tokens=new_tokens,
                               max_prompt_length=max_prompt_length, seed=seed * 3 + salt, progress=progress,
                               desc=f"cai {('responses', 'critiques', 'revisions')[salt]}", length_fields=fields,
                               first_index=start, **sampling)
        return [group[0] for group in out]

    try:
        responses = run(prompts, config.max_prompt_length, config.max_new_tokens, 0,
                        "max_prompt_length or max_new_tokens")
        drawn = constitution.sample(len(everything), seed)
        principles = drawn[start:stop] + drawn[:1] * (per_rank - (stop - start))
        critique_prompts = [
            _stage_prompt(tokenizer, p, [("assistant", r), ("user", pr.critique_request)], config.critique_template,
                          response=r, critique_request=pr.critique_request)
            for p, r, pr in zip(prompts, responses, principles)
        ]
        critiques = [str(c) for c in run(critique_prompts, config.max_context_length, config.critique_max_new_tokens,
                                         1, "max_context_length or critique_max_new_tokens")]
        revision_prompts = [
            _stage_prompt(tokenizer, p, [("assistant", r), ("user", pr.critique_request), ("assistant", c),
                                         ("user", pr.revision_request)],
                          config.revision_template, response=r, critique_request=pr.critique_request,
                          critique=c, revision_request=pr.revision_request)
            for p, r, pr, c in zip(prompts, responses, principles, critiques)
        ]
        revisions = run(revision_prompts, config.max_context_length, config.revision_new_tokens, 2,
                        "max_context_length or revision_max_new_tokens")
    finally:
        if own_generator:
            generator.free()
    mine = [CAIExample(p, r, pr.name, c, v)
            for p, r, pr, c, v in zip(prompts, responses, principles, critiques, revisions)][:stop - start]
    return [e for share in distributed.all_gather_objects(mine) for e in share]


def revision_pairs(examples: Sequence[CAIExample]) -> list[dict[str, Any]]:
    """``[{"prompt", "chosen": revision, "rejected": original response}, ...]``, skipping
    examples whose revision is blank or the same as the original."""
    return [{"prompt": e.prompt, "chosen": e.revision, "rejected": e.response}
            for e in examples if e.revision.strip() and e.revision.strip() != e.response.strip()]


def revision_sft_data(examples: Sequence[CAIExample]) -> list[dict[str, Any]]:
    """``[{"prompt", "response": revision}, ...]`` for SFT, skipping blank revisions."""
    return [{"prompt": e.prompt, "response": e.revision} for e in examples if e.revision.strip()]


# ----------------------------------------------------------------------------- training


def _reference_use(config: CAIConfig, stage: str) -> str | None:
    """How a training stage uses its default reference: "live" (run during training: DPO with
    ``precompute_ref=False``, RL with a KL term), "precompute" (DPO's cache, computed once when
    the stage starts) or None."""
    if stage == "dpo" and config.dpo_config.uses_reference:
        return "precompute" if config.dpo_config.precompute_ref else "live"
    if stage == "rl" and (config.rl_config.kl_coef > 0 or config.rl_config.adaptive_kl):
        return "live"
    return None


def stage_reference(
    policy: nn.Module, config: CAIConfig, stage: str, saved: Mapping[str, torch.Tensor] | None = None,
    *, resuming: bool = False, load_model: Callable[[], nn.Module] | None = None,
) -> nn.Module | None:
    """The default reference of a CAI training stage, or None when the stage needs no model.

    DPO with ``precompute_ref=False`` and RL with a KL term run the reference during training;
    it is the policy at the start of that stage (after SFT): a frozen copy taken when the stage
    starts. Its ``state_dict()`` rides in the stage's checkpoints (``extra["stage_reference"]``,
    a ``FixedTensors``: written to disk once per stage) and a resumed stage (``resuming``)
    rebuilds the same reference from those ``saved`` weights.
    PEFT policies need none (their reference is the policy with adapters off), nor does DPO
    with the reference log-probs precomputed (the cache is in the DPO state).

    A policy sharded over the ranks (torchrun) cannot be copied: the copy is ``load_model()``
    (the initial model, unsharded) sharded like the policy, then given the policy's current
    weights (or the ``saved`` full weights); DPO's precomputed cache also needs it, when the
    stage starts fresh.
    """
    use = _reference_use(config, stage)
    sharded = distributed.is_sharded(policy)
    if is_peft_model(policy) or use is None or (use == "precompute" and (resuming or not sharded)):
        return None
    if resuming and saved is None and use == "live":
        raise ValueError(
            f"checkpoint state of the CAI {stage!r} stage holds no reference weights "
            "(extra['stage_reference']); pass the policy at the start of that stage as ref_model"
        )
    if not sharded:
        reference = freeze(disable_dropout(copy.deepcopy(policy)))
        if saved is not None:
            reference.load_state_dict(saved)
        return reference
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if load_model is None:
        raise ValueError(
            f"the CAI {stage!r} stage needs a frozen copy of the policy, which is sharded over the ranks and "
            "cannot be copied: pass load_model (the initial model, unsharded) or ref_model"
        )
    precision = resolve_precision(getattr(config, f"{stage}_config").precision, device_of(policy))
    reference = distributed.shard_model(load_model(), precision=precision)
    if saved is not None:
        set_model_state_dict(reference, dict(saved), options=StateDictOptions(full_state_dict=True))
    else:
        reference.load_state_dict(policy.state_dict())   # shard for shard: the same units on the same ranks
    return freeze(disable_dropout(reference))


def _reference_weights(reference: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a stage reference: its state dict; of a sharded one, the full
    weights gathered on rank 0, the rank that writes the state (every rank calls it)."""
    if not distributed.is_sharded(reference):
        return reference.state_dict()
    from rftengine.checkpoint import full_state_dict

    return full_state_dict(reference) or {}


def train_cai(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[Any],
    config: CAIConfig | None = None,
    *,
    constitution: Constitution | str | Path | None = None,
    judge: Judge | None = None,
    judge_model: nn.Module | None = None,
    judge_tokenizer=None,
    ref_model: nn.Module | None = None,
    load_model: Callable[[], nn.Module] | None = None,
    critic: nn.Module | None = None,
    callback: Callback | None = None,
    state: TrainState | Mapping[str, Any] | None = None,
    checkpoint_fn: CheckpointFn | None = None,
    progress: bool = False,
) -> TrainResult:
    """Generate critiques and revisions with ``policy`` itself, then train it on them.

    Args:
        policy: causal LM, trained in place.
        tokenizer: its tokenizer (needs an EOS token).
        prompts: strings, chat-message lists or dicts with "prompt".
        config: ``CAIConfig`` (defaults if None).
        constitution: a ``Constitution``, a YAML path, or None for the default set.
        judge: mode "rl": the reward Judge (default: ``principle_judge`` over ``judge_model`` /
            ``judge_tokenizer``, or over a frozen copy of the policy as given: self-feedback;
            resuming then needs ``judge`` or ``judge_model``, since the policy given holds the
            resumed weights).
        ref_model: the reference of the DPO/RL stage (default: ``stage_reference``, the policy
            at the start of that stage, saved in the stage's checkpoints so resuming is exact).
        load_model: under torchrun (a policy sharded over the ranks, which cannot be copied):
            ``load_model()`` returns the initial model, unsharded, on the policy's device; the
            frozen copies (stage references, the default judge) and a separate PPO critic's trunk
            are built from it. Each rank generates its share of the examples, and each stage
            trains data-parallel (``batch_size`` of every stage is the global batch).
        critic: a resumed RL stage's PPO critic, built by ``ppo.make_critic`` and restored by the
            caller (the CLI, from a sharded checkpoint); default: built by ``train_ppo``.
        callback: ``callback(step, metrics)`` with steps counted across stages.
        state: a TrainState (method "cai") or its ``state_dict()`` to resume from; the generated
            examples are restored from it, finished stages are skipped.
        checkpoint_fn: ``checkpoint_fn(state)`` during each stage (method "cai"; the generated
            examples ride in ``extra["cai_examples"]``, the default stage reference's weights in
            ``extra["stage_reference"]``, a ``FixedTensors``).
        progress: tqdm bars for the stages, and (removed when done) for generation and judging.
    """
    config = config or CAIConfig()
    if not isinstance(config, CAIConfig):
        raise ValueError(f"config must be a CAIConfig, got {type(config).__name__}")
    require_eos(tokenizer)
    # refused before any generation: the first stage's precision decides (fp16 needs fp16-mixed)
    check_trainable_model(policy, tokenizer, getattr(config, f"{config.stages[0]}_config").precision)
    if not isinstance(constitution, Constitution):
        constitution = load_constitution(constitution)
    texts, _ = split_prompt_data(prompts)
    if not texts:
        raise ValueError("prompts must hold at least one prompt, got 0")
    require_prompt_positions(policy, tokenizer, texts, config)
    stages = config.stages
    sub_state, offset = unwrap_stage_state("cai", state)
    if "rl" in stages and judge is None:
        if judge_model is None:
            if sub_state is not None:
                raise ValueError(
                    "resuming mode='rl' needs judge or judge_model: the default judge is a copy of the "
                    "policy as first given, and the policy given now holds the resumed weights"
                )
            if distributed.is_sharded(policy):
                if load_model is None:
                    raise ValueError("mode='rl' with a policy sharded over the ranks needs judge, judge_model or "
                                     "load_model (the default judge is a copy of the policy, which cannot be copied)")
                judge_model = freeze(disable_dropout(load_model()))   # replicated: each rank judges its rollouts
            else:
                judge_model = freeze(disable_dropout(copy.deepcopy(policy)))
        judge = principle_judge(judge_model, judge_tokenizer or tokenizer, constitution)
    elif "rl" not in stages and any(x is not None for x in (judge, judge_model, judge_tokenizer)):
        raise ValueError(
            f"judge, judge_model and judge_tokenizer are only used with mode='rl', got mode={config.mode!r}"
        )

    saved_reference = None
    if sub_state is not None:
        records = sub_state["extra"].pop("cai_examples", None)
        saved_reference = sub_state["extra"].pop("stage_reference", None)
        if saved_reference is not None and not isinstance(saved_reference, FixedTensors):
            raise ValueError("checkpoint state of method 'cai': extra['stage_reference'] must be a FixedTensors, "
                             f"got {type(saved_reference).__name__}")
        if records is None:
            raise ValueError("checkpoint state of method 'cai' holds no generated examples")
        examples = [CAIExample.from_dict(r) for r in records]
        stage_name = "rl" if sub_state["method"] in ("ppo", "grpo", "rloo") else sub_state["method"]
        if stage_name not in stages:
            raise ValueError(f"checkpoint state is a CAI run in stage {sub_state['method']!r}, "
                             f"which mode={config.mode!r} does not have")
        first = stages.index(stage_name)
    else:
        examples = generate_revisions(policy, tokenizer, texts, constitution, config, progress=progress)
        first = 0
    records = [e.as_dict() for e in examples]
    pairs = revision_pairs(examples)
    sft_data = revision_sft_data(examples)

    history: list[dict[str, float]] = []
    results: dict[str, Any] = {}
    last_state: TrainState | None = None
    for index, stage in enumerate(stages):
        if index < first:
            continue
        resume = sub_state if index == first else None
        start_offset = offset if index == first and sub_state is not None else (
            last_state.step if last_state is not None else 0)
        stage_ref, saved = ref_model, {"cai_examples": records}
        if ref_model is None:
            restored = saved_reference if resume is not None else None
            stage_ref = stage_reference(policy, config, stage, restored.tensors if restored is not None else None,
                                        resuming=resume is not None, load_model=load_model)
            if stage_ref is not None and _reference_use(config, stage) == "live":
                # One key per stage reference (kept across a resume): checkpoints write its weights once.
                key = restored.key if restored is not None else FixedTensors.new_key()
                saved["stage_reference"] = FixedTensors(key, _reference_weights(stage_ref))

        def stage_callback(step, metrics, _offset=start_offset, _index=index):
            metrics = Metrics({**metrics, "cai/stage": float(_index)})
            history.append(metrics)
            if callback is not None:
                callback(_offset + step, metrics)

        def stage_ckpt(sub, _offset=start_offset, _saved=saved):
            checkpoint_fn(stage_state("cai", sub, offset=_offset, **_saved))

        common = {"callback": stage_callback, "state": resume,
                  "checkpoint_fn": stage_ckpt if checkpoint_fn is not None else None, "progress": progress}
        if stage == "sft":
            if not sft_data:
                raise ValueError("CAI produced no non-empty revision to finetune on")
            result = train_sft(policy, tokenizer, sft_data, config.sft_config, **common)
        elif stage == "dpo":
            if not pairs:
                raise ValueError("CAI produced no (revision, original) pair that differs; nothing to train on")
            result = train_dpo(policy, tokenizer, pairs, config.dpo_config, ref_model=stage_ref, **common)
        else:
            rl_config = config.rl_config
            reward_fn = judge.as_reward_fn(config.judge_mode, group_size=rl_config.group_size,
                                           progress=progress or None)
            value_model = None
            if (critic is None and rl_config.algorithm == "ppo" and rl_config.critic == "separate"
                    and distributed.is_sharded(policy)):
                if load_model is None:
                    raise ValueError("a separate PPO critic with a policy sharded over the ranks needs load_model")
                value_model = load_model()
            result = train_ppo(policy, tokenizer, texts, rl_config, reward_fn=reward_fn, ref_model=stage_ref,
                               value_model=value_model, critic=critic if resume is not None else None, **common)
            result.context.generator.free()
        results[stage] = result
        last_state = stage_state("cai", result.state, offset=start_offset, **saved)
    policy.eval()
    return TrainResult(model=policy, state=last_state, examples=examples, pairs=pairs,
                       stage_results=results, history=history)
