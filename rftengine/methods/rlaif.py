"""RLAIF: reinforcement learning from AI feedback (Bai et al. 2022; Lee et al. 2023).

The policy samples ``group_size >= 2`` responses per prompt, a ``Judge`` (any causal LM plus a
prompt template) scores or compares them, and the policy is trained on that feedback online:

- algorithm "ppo" / "grpo" / "rloo": the judge is the reward function of ``train_ppo``
  (pointwise: the expected rating of each response; pairwise: each response's mean win
  probability against the others of its group, judged in both orders);
- algorithm "dpo": every round, the strongest and weakest response of each prompt become a
  (chosen, rejected) pair and the policy takes a DPO step on the round's pairs, against the
  frozen reference.

Three lines::

    judge = Judge(judge_model, judge_tokenizer)
    config = RLAIFConfig(algorithm="dpo", group_size=4, max_steps=100, dpo={"beta": 0.1})
    result = train_rlaif(policy, tokenizer, prompts, judge, config)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from rftengine import distributed
from rftengine.methods.config_base import (
    Alias,
    ConfigBase,
    LoopFields,
    SamplingFields,
    option,
    stage,
    stage_config,
    trl,
)
from rftengine.methods.data_order import step_seed, total_steps
from rftengine.methods.loop import Callback, CheckpointFn, track, train_loop
from rftengine.methods.optimization import make_train_state
from rftengine.methods.precision import frozen_dtype, resolve_precision
from rftengine.methods.train_state import TrainState, stage_state, unwrap_stage_state
from rftengine.methods.data import (
    PromptLike,
    SampledText,
    collate_preferences,
    encode_preferences,
    pad_token_id,
    require_eos,
    split_prompt_data,
)
from rftengine.methods.dpo import DPOConfig, dpo_step, precompute_reference_logps
from rftengine.methods.judge import JUDGE_MODES, Judge, pairs_from_scores
from rftengine.methods.modeling import (
    Reference,
    check_trainable_model,
    device_of,
    disable_dropout,
    is_peft_model,
    rollout_dtype,
)
from rftengine.methods.ppo import require_prompt_positions, train_ppo
from rftengine.methods.ppo_config import ALGORITHMS as PPO_ALGORITHMS
from rftengine.methods.ppo_config import PPOConfig
from rftengine.methods.result import TrainResult
from rftengine.methods.rollout import sample_rollout

RLAIF_ALGORITHMS = PPO_ALGORITHMS + ("dpo",)

# RLAIFConfig owns the loop and sampling: these fields of the nested PPOConfig / DPOConfig are
# set from it, and giving them a different non-default value there is an error.
_PPO_LOOP_FIELDS = {
    "algorithm": "algorithm", "group_size": "group_size", "batch_size": "batch_size",
    "num_epochs": "num_epochs", "max_steps": "max_steps", "shuffle": "shuffle",
    "max_prompt_length": "max_prompt_length", "max_new_tokens": "max_new_tokens",
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "seed": "seed",
    "save_every": "save_every", "eval_every": "eval_every", "eval_batch_size": "eval_batch_size",
    "logging_steps": "logging_steps",
}
_DPO_LOOP_FIELDS = {
    "batch_size": "batch_size", "num_epochs": "num_epochs", "max_steps": "max_steps",
    "shuffle": "shuffle", "seed": "seed", "save_every": "save_every",
    "max_prompt_length": "max_prompt_length",
}


@dataclass
class RLAIFConfig(ConfigBase, SamplingFields, LoopFields):
    """Options of ``train_rlaif`` (validated on construction; ``from_dict`` rejects unknown keys).

    algorithm: "ppo", "grpo", "rloo" (the judge is the reward) or "dpo" (judged pairs).
    judge_mode: "pointwise" (expected rating) or "pairwise" (both-order comparisons within a
        prompt's samples).
    group_size: responses sampled per prompt (>= 2; the group of GRPO/RLOO). ``num_samples``, its
        earlier name, and TRL's ``num_generations`` are taken by ``from_dict`` with a notice.
    batch_size: prompts per step; max_steps / num_epochs: how long (as everywhere).
    max_prompt_length, max_new_tokens, temperature, top_k, top_p: rollout sampling.
    min_margin ("dpo"): prompts whose best and worst responses differ by at most this judge
        margin give no pair. updates_per_round ("dpo"): optimizer steps on each round's pairs.
    ppo: PPOConfig options for "ppo"/"grpo"/"rloo" (learning rate, KL, clipping, ...).
    dpo: DPOConfig options for "dpo" (beta, loss_type, learning rate, ...).
    The loop fields above are set on the nested config from this one; ``ppo_config`` /
    ``dpo_config`` give the merged configs (the fields keep what was given, so ``from_dict``
    of ``config_to_dict`` round-trips).
    """

    algorithm: Literal[RLAIF_ALGORITHMS] = option("grpo", "ppo, grpo, rloo (the judge is the reward) or dpo "
                                                  "(judged pairs)")
    judge_mode: Literal[JUDGE_MODES] = option("pointwise", "pointwise (expected rating) or pairwise "
                                              "(both-order comparisons)")
    group_size: int = option(2, "responses sampled per prompt", min=2,
                             why="the judge compares responses to the same prompt",
                             aliases=(trl("num_generations"), Alias("num_samples", library="rftengine 0.1")))
    min_margin: float = option(0.0, "dpo: prompts whose best and worst responses differ by at most this "
                                    "judge margin give no pair", min=0.0)
    updates_per_round: int = option(1, "dpo: optimizer steps on each round's pairs", min=1)
    ppo: PPOConfig | Mapping[str, Any] | None = stage(PPOConfig, "PPOConfig options for ppo/grpo/rloo",
                                                      _PPO_LOOP_FIELDS)
    dpo: DPOConfig | Mapping[str, Any] | None = stage(DPOConfig, "DPOConfig options for dpo", _DPO_LOOP_FIELDS)

    def validate(self):
        owner = type(self).__name__
        if self.algorithm == "dpo" and self.ppo is not None:
            raise ValueError(f"{owner}.ppo is only used with algorithm 'ppo', 'grpo' or 'rloo'; "
                             f"algorithm is 'dpo' (use {owner}.dpo)")
        if self.algorithm != "dpo" and self.dpo is not None:
            raise ValueError(f"{owner}.dpo is only used with algorithm 'dpo'; algorithm is "
                             f"{self.algorithm!r} (use {owner}.ppo)")
        _ = self.dpo_config if self.algorithm == "dpo" else self.ppo_config   # validate now

    @property
    def ppo_config(self) -> PPOConfig:
        """The PPOConfig ``train_ppo`` runs with: ``ppo`` plus this config's loop fields."""
        if self.algorithm == "dpo":
            raise ValueError("RLAIFConfig.ppo_config: algorithm is 'dpo', which trains with dpo_config")
        return stage_config(self, "ppo")

    @property
    def dpo_config(self) -> DPOConfig:
        """The DPOConfig of each online round: ``dpo`` plus this config's loop fields."""
        if self.algorithm != "dpo":
            raise ValueError(f"RLAIFConfig.dpo_config: algorithm is {self.algorithm!r}, which trains with ppo_config")
        return stage_config(self, "dpo", {"max_response_length": self.max_new_tokens + 1})


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_responses(
    generator,
    tokenizer,
    prompts: Sequence[PromptLike],
    *,
    num_samples: int = 1,
    max_new_tokens: int,
    max_prompt_length: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    stop: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = False,
    desc: str = "sampling",
    length_fields: str = "max_prompt_length or max_new_tokens",
    first_index: int | None = None,
) -> list[list[SampledText]]:
    """``num_samples`` sampled responses per prompt, in chunks of prompts that fit
    ``generator.max_batch_size`` (``progress``: a bar over the chunks), each chunk one
    ``sample_rollout`` (the sampling path of every method).

    ``first_index``: the global index of ``prompts[0]`` (default: ``prompts`` is this rank's
    contiguous share of a global batch, every rank holding as many, as ``sample_rollout``
    assumes). Each response's noise is keyed by ``seed`` and its global sequence index, so the
    responses do not depend on the chunking nor on the number of ranks: N ranks sample what one
    process samples for all the prompts. Under torchrun every rank must make as many chunks
    (the rollout gathers the sharded weights): give every rank as many prompts.

    Prompts are strings or chat-message lists, truncated from the left to
    ``max_prompt_length``. Returns ``[[response, ...] * num_samples] * len(prompts)``: texts
    without special tokens, each a ``SampledText`` carrying the sampled token ids and finish
    flag, so training on it uses exactly those ids (no EOS added to a truncated response).
    """
    if num_samples > generator.max_batch_size:
        raise ValueError(
            f"num_samples ({num_samples}) must be <= the generator's max_batch_size ({generator.max_batch_size})"
        )
    per_call = max(1, generator.max_batch_size // num_samples)
    if first_index is None:
        first_index = distributed.rank() * len(prompts)
    out: list[list[SampledText]] = []
    for start in track(range(0, len(prompts), per_call), progress, desc=desc):
        chunk = prompts[start:start + per_call]
        texts = sample_rollout(
            generator, tokenizer, chunk, num_samples=num_samples, max_new_tokens=max_new_tokens,
            max_prompt_length=max_prompt_length, temperature=temperature, top_k=top_k, top_p=top_p,
            min_p=min_p, stop=stop, seed=seed, length_fields=length_fields, sequence_offset=(first_index + start) * num_samples,
        ).sampled_texts()
        out += [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(chunk))]
    return out


# ----------------------------------------------------------------------------- online DPO


def rlaif_dpo_round(
    policy: nn.Module,
    tokenizer,
    judge: Judge,
    prompts: Sequence[PromptLike],
    config: RLAIFConfig,
    *,
    generator,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    reference: Reference | None,
    seed: int = 0,
    progress: bool = False,
    state: TrainState | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """One online round: sample ``group_size`` responses per prompt, judge them into pairs,
    take ``updates_per_round`` DPO steps on those pairs (``progress``: bars for sampling,
    judging and the reference pass). The pairs train on the sampled token ids: a response cut
    at ``max_new_tokens`` has no EOS. Skipped non-finite steps are counted in ``state``.

    Returns ``(metrics, pairs)``. Metrics: ``judge/score`` (mean candidate strength: expected
    rating, or mean win probability; also ``reward`` when pointwise), ``judge/margin``
    (mean chosen-rejected margin), ``judge/pairs`` (pairs formed), ``completions/mean_length``,
    ``/min_length``, ``/max_length`` (sampled tokens, EOS included, as PPO-mode RLAIF reports
    them), and the DPO step's metrics (``loss``,
    ``rewards/accuracies``, ``rewards/margins``, ...) when a pair was formed.

    Under torchrun ``prompts`` is this rank's share: it samples and judges its own rollouts,
    and the number of pairs it forms varies per rank. ``judge/pairs`` and ``judge/margin`` are then
    global (sums over the ranks, the same on every rank), the DPO loss divides by the global
    pair count, and every rank runs as many reference and policy forwards as the busiest one
    (``dpo_step``'s ``real_pairs``): a round with no pair on any rank trains no rank.
    """
    cfg = config
    policy.eval()
    candidates = sample_responses(
        generator, tokenizer, prompts, num_samples=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
        max_prompt_length=cfg.max_prompt_length, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, min_p=cfg.min_p, stop=cfg.stop, seed=seed, progress=progress, desc="rlaif sampling",
    )
    scores = judge.candidate_scores(prompts, candidates, mode=cfg.judge_mode, progress=progress or None)
    pairs = pairs_from_scores(prompts, candidates, scores, min_margin=cfg.min_margin)
    flat = [x for row in scores for x in row]
    # [pairs, margin sum]: global sums (each rank's share of prompts is the same size, so the
    # per-candidate means below average over the ranks as they are)
    counts = distributed.all_reduce_sum(torch.tensor([float(len(pairs)), float(sum(p["margin"] for p in pairs))],
                                                     dtype=torch.float64))
    num_pairs = int(counts[0])
    lengths = torch.tensor([float(len(r.token_ids)) for g in candidates for r in g])
    metrics: dict[str, float] = {
        "judge/score": sum(flat) / len(flat),
        "judge/margin": float(counts[1]) / num_pairs if num_pairs else 0.0,
        "judge/pairs": float(num_pairs),
        # sampled tokens (EOS included), under the names PPO-mode RLAIF and every rollout logs
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(-distributed.all_reduce_max(-lengths.min())),
        "completions/max_length": float(distributed.all_reduce_max(lengths.max())),
    }
    if cfg.judge_mode == "pointwise":
        metrics["reward"] = metrics["judge/score"]     # the name PPO-mode RLAIF logs it under
    if not num_pairs:
        return metrics, pairs
    dpo_cfg = cfg.dpo_config
    pad = pad_token_id(tokenizer)
    device = device_of(policy)
    # A rank that formed no pair still joins every forward (FSDP), on a pair of weight 0.
    rows = pairs or [{"prompt": prompts[0], "chosen": candidates[0][0], "rejected": candidates[0][0]}]
    examples = encode_preferences(tokenizer, rows, max_prompt_length=dpo_cfg.max_prompt_length,
                                  max_response_length=dpo_cfg.max_response_length)
    batch = collate_preferences(examples, pad).to(device)
    ref_logps = None
    if dpo_cfg.uses_reference:
        if reference is None:
            raise ValueError(f"loss_type={dpo_cfg.loss_type!r} needs a reference model")
        # as many reference forwards on every rank: the pair list padded to the longest rank's
        most = distributed.max_over_ranks(len(examples))
        ref_logps = precompute_reference_logps(
            reference, examples + [examples[0]] * (most - len(examples)), pad, batch_size=dpo_cfg.ref_batch_size,
            chunk_size=dpo_cfg.logprob_chunk_size, progress=progress, packing=dpo_cfg.packing)[:len(examples)]
    real = len(pairs) if distributed.is_distributed() else None
    for _ in range(cfg.updates_per_round):
        step_metrics = dpo_step(policy, optimizer, batch, dpo_cfg, ref_logps=ref_logps, scheduler=scheduler,
                                state=state, real_pairs=real)
    policy.eval()
    metrics.update(step_metrics)
    return metrics, pairs


def _train_online_dpo(policy, tokenizer, prompts, judge, config, *, ref_model, callback, state,
                      checkpoint_fn, progress, eval_prompts=None) -> TrainResult:
    from rftengine.generation import Generator

    cfg = config
    check_trainable_model(policy, tokenizer, cfg.dpo_config.precision)
    require_prompt_positions(policy, tokenizer, prompts, cfg)
    if eval_prompts is not None:
        require_prompt_positions(policy, tokenizer, eval_prompts, cfg)
    disable_dropout(policy)
    num_steps = total_steps(cfg, len(prompts), cfg.batch_size)
    dpo_cfg = cfg.dpo_config
    if state is not None:
        sd = state.state_dict() if isinstance(state, TrainState) else state
        if (sd.get("extra") or {}).get("stage") != "dpo":
            raise ValueError(
                f"checkpoint state is an RLAIF run with stage {(sd.get('extra') or {}).get('stage')!r}, "
                "but this run is RLAIF with algorithm 'dpo'"
            )
    train_state = make_train_state("rlaif", policy, dpo_cfg, num_steps * cfg.updates_per_round, state,
                                   extra={"stage": "dpo"})
    device = device_of(policy)
    if dpo_cfg.uses_reference and ref_model is None and distributed.is_sharded(policy) and not is_peft_model(policy):
        raise ValueError("ref_model is required with a policy sharded over the ranks (the default reference is a "
                         "copy of the policy, which a sharded policy cannot give): pass the initial model, sharded")
    reference = Reference(policy, ref_model, resumed=train_state.step > 0,
                          dtype=frozen_dtype(dpo_cfg, device)) if dpo_cfg.uses_reference else None
    generator = Generator(policy, max_batch_size=cfg.batch_size * cfg.group_size,
                          max_seq_len=cfg.max_prompt_length + cfg.max_new_tokens,
                          dtype=rollout_dtype(policy, resolve_precision(dpo_cfg.precision, device)))

    def run_step(idx: list[int]) -> dict[str, float]:
        metrics, _ = rlaif_dpo_round(
            policy, tokenizer, judge, [prompts[i] for i in idx], cfg, generator=generator,
            optimizer=train_state.optimizer, scheduler=train_state.scheduler, reference=reference,
            seed=step_seed(cfg.seed, train_state.step), progress=progress, state=train_state,
        )
        return metrics

    evaluate = None
    if eval_prompts is not None:
        from rftengine.methods.evaluation import rollout_evaluator

        def judged(ro):                 # the judge's strengths of each prompt's group_size responses
            groups = [ro.responses[i:i + cfg.group_size] for i in range(0, len(ro.responses), cfg.group_size)]
            scores = judge.candidate_scores(ro.prompts[::cfg.group_size], groups, mode=cfg.judge_mode, progress=False)
            return torch.tensor([x for row in scores for x in row])

        evaluate = rollout_evaluator(generator, tokenizer, eval_prompts, cfg, judged, num_samples=cfg.group_size)

    history = train_loop(train_state, cfg, num_steps, len(prompts), run_step, callback=callback,
                         checkpoint_fn=checkpoint_fn, progress=progress, desc="rlaif-dpo",
                         postfix={"judge": "judge/score", "pairs": "judge/pairs"}, evaluate=evaluate)
    generator.free()
    policy.eval()
    return TrainResult(model=policy, state=train_state, history=history)


# ----------------------------------------------------------------------------- entry point


def judge_reward_fn(judge: Judge, config: RLAIFConfig, *, progress: bool | None = None):
    """The reward function RLAIF hands to PPO/GRPO/RLOO: ``judge`` itself (pointwise) or its
    within-group pairwise strengths (pairwise). ``progress`` None follows ``judge.progress``."""
    return judge.as_reward_fn(config.judge_mode, group_size=config.group_size, progress=progress)


def train_rlaif(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[Any],
    judge: Judge,
    config: RLAIFConfig | None = None,
    *,
    ref_model: nn.Module | None = None,
    value_model: nn.Module | None = None,
    critic: nn.Module | None = None,
    eval_data: Sequence[Any] | None = None,
    callback: Callback | None = None,
    state: TrainState | Mapping[str, Any] | None = None,
    checkpoint_fn: CheckpointFn | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train ``policy`` in place from the feedback of ``judge`` on its own samples.

    Args:
        policy: causal LM.
        tokenizer: its tokenizer (needs an EOS token). The judge may use another one.
        prompts: strings, chat-message lists or dicts with "prompt" (references are ignored).
        judge: a ``Judge`` (its model is only read, never trained).
        config: ``RLAIFConfig`` (defaults if None).
        ref_model: the reference policy (default: a frozen copy of ``policy`` as given). Resuming
            needs the original model here (ValueError otherwise, unless the policy is PEFT or
            the run has no reference): a copy of the resumed policy would be the wrong reference.
        value_model: PPO's separate critic (see ``make_ppo_context``).
        critic: algorithm "ppo": a critic built by ``ppo.make_critic`` (whose weights the caller
            restored, as the CLI does from a sharded checkpoint); default: built by ``train_ppo``.
        callback: ``callback(step, metrics)`` after each step.
        state: a TrainState (method "rlaif") or its ``state_dict()`` to resume from.
        checkpoint_fn: ``checkpoint_fn(state)`` every ``config.save_every`` steps and at the end;
            the state is named "rlaif" (the sub-trainer's state plus ``extra["stage"]``).
        progress: tqdm bars for the steps and, removed when done, for sampling and judging.
        eval_data: held-out prompts: ``group_size`` responses each, sampled as in training with
            a fixed seed and judged, as ``eval/reward`` (the judge's mean score),
            ``eval/reward_std``, ``eval/completions/mean_length`` every ``config.eval_every``
            steps and after the last (``rftengine.methods.evaluation``).
    """
    config = config or RLAIFConfig()
    if not isinstance(config, RLAIFConfig):
        raise ValueError(f"config must be an RLAIFConfig, got {type(config).__name__}")
    if not isinstance(judge, Judge):
        raise ValueError(f"judge must be a rftengine.methods.Judge, got {type(judge).__name__}")
    require_eos(tokenizer)
    texts, _ = split_prompt_data(prompts)
    if not texts:
        raise ValueError("prompts must hold at least one prompt, got 0")
    eval_texts = split_prompt_data(eval_data)[0] if eval_data is not None else None
    if config.algorithm == "dpo":
        if value_model is not None or critic is not None:
            raise ValueError("value_model and critic are only used by algorithm 'ppo'")
        return _train_online_dpo(policy, tokenizer, texts, judge, config, ref_model=ref_model,
                                 callback=callback, state=state, checkpoint_fn=checkpoint_fn,
                                 progress=progress, eval_prompts=eval_texts)
    sub_state, _ = unwrap_stage_state("rlaif", state)
    if sub_state is not None:
        if sub_state["method"] != config.algorithm:
            raise ValueError(
                f"checkpoint state is an RLAIF run with stage {sub_state['method']!r}, but this run "
                f"is RLAIF with algorithm {config.algorithm!r}"
            )
    def wrapped_ckpt(sub: TrainState) -> None:
        checkpoint_fn(stage_state("rlaif", sub))

    result = train_ppo(
        policy, tokenizer, texts, config.ppo_config,
        reward_fn=judge_reward_fn(judge, config, progress=progress or None),
        ref_model=ref_model, value_model=value_model, critic=critic, callback=callback, state=sub_state,
        checkpoint_fn=wrapped_ckpt if checkpoint_fn is not None else None, progress=progress,
        eval_data=eval_texts,
    )
    result.context.generator.free()
    return TrainResult(model=result.policy, state=stage_state("rlaif", result.state), history=result.history,
                       critic=result.context.critic)
