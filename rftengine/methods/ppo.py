"""RLHF with PPO (value head + GAE) and the critic-free estimators GRPO and RLOO.

One iteration is four plain functions over an explicit ``PPOContext``::

    ctx = make_ppo_context(policy, tokenizer, config)
    ro = rollout(ctx, prompts)                  # Generator samples group_size responses per prompt
    scores = score(ctx, ro, reward_fn)          # reward_fn on texts, missing-EOS penalty
    batch = compute_advantages(ctx, ro, scores) # ref log-probs, KL, values, GAE / group advantages
    metrics = step(ctx, batch)                  # ppo_epochs x minibatches, clipped losses

and ``train_ppo`` runs that loop (``train_ppo(policy, tok, prompts, PPOConfig(), reward_fn=f)``).

algorithm "ppo" (Ouyang et al. 2022; Ziegler et al. 2019): per-token reward
``r_t = -β·KL_t`` plus the score at the last response token, GAE over a value head
(``δ_t = r_t + γV_{t+1} - V_t``, ``A_t = δ_t + γλA_{t+1}``, returns ``A + V``), advantages
whitened over valid tokens; loss = clipped policy loss + vf_coef · clipped value loss.
β is fixed or follows the adaptive controller of Ziegler et al.: ``β ← β·(1 + clip(KL/target - 1,
±0.2)·N/horizon)``.

algorithm "grpo" (Shao et al. 2024) / "rloo" (Ahmadian et al. 2024): no critic; ``group_size``
≥ 2 responses per prompt, sequence advantage = score minus the group mean (GRPO: divided by the
group std; RLOO: minus the leave-one-out mean); the KL to the reference is in the loss
(``kl_in_loss``, the default) or, with ``kl_in_loss=False``, in the reward: ``β·Σ_t KL_t`` is
subtracted from each sample's score before the group advantages (as TRL's RLOO does).

The policy loss goes through the fused head ``rftengine.ops.fused_ppo_loss`` (hidden states +
lm-head weight in, no ``[N, T, V]`` logits); the value loss through ``rftengine.ops.value_loss``.

The options are ``methods.ppo_config.PPOConfig``; the pure advantage math (KL-shaped rewards,
GAE, group advantages, the KL controller) is in ``methods.ppo_advantages``; this module holds
the trainer: context, rollout, scoring forwards, the update step and ``train_ppo``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rftengine import distributed
from rftengine.methods.data_order import step_seed, total_steps
from rftengine.methods.loop import Callback, CheckpointFn, to_floats, track, train_loop
from rftengine.methods.optimization import (
    accumulate_gradients,
    clip_and_step,
    global_count,
    make_train_state,
    micro_batch_rows,
    skipped_steps,
    step_scheduler,
    split_rows,
)
from rftengine.methods.precision import autocast, cast_trainable, frozen_dtype, resolve_precision
from rftengine.methods.train_state import TrainState
from rftengine.methods.data import (
    PromptLike,
    SequenceBatch,
    encode_prompt,
    pad_token_id,
    require_eos,
    split_prompt_columns,
)
from rftengine.methods.modeling import (
    CausalLMWithValueHead,
    Reference,
    RewardModel,
    ValueHead,
    check_trainable_model,
    device_of,
    disable_dropout,
    hidden_size_of,
    max_positions_of,
    output_head,
    require_positions,
    response_hidden,
    rollout_dtype,
)
from rftengine.methods.packed import padding_fraction
from rftengine.methods.ppo_advantages import KLController, critic_advantages, critic_free_advantages
from rftengine.methods.ppo_config import PPOConfig, aggregation_constant
from rftengine.methods.result import TrainResult
from rftengine.methods.rewards import RewardFn, RewardFunctions, RewardOutput, RewardState
from rftengine.methods.rollout import Rollout, sample_rollout

# ----------------------------------------------------------------------------- containers


@dataclass
class PPOBatch:
    """Experience for ``step``: everything the update needs, detached.

    Fields:
        batch: ``SequenceBatch`` ``[N, P+T]``.
        old_logprobs: ``[N, T]`` fp32 log-probs of the rollout policy.
        advantages: ``[N, T]`` fp32 ("ppo") or ``[N]`` per-sequence (critic-free).
        ref_logprobs: ``[N, T]`` fp32, only when the KL is in the loss, else None.
        returns, old_values: ``[N, T]`` fp32 for the value loss ("ppo"), else None.
        scores: ``[N]`` fp32 rewards after the missing-EOS penalty.
        stats: rollout metrics (``reward``, ``reward_std``, ``kl``, ``completions/mean_length``, ...).
    """

    batch: SequenceBatch
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    ref_logprobs: torch.Tensor | None
    returns: torch.Tensor | None
    old_values: torch.Tensor | None
    scores: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.batch.num_rows

    def select(self, rows: torch.Tensor) -> PPOBatch:
        def pick(t):
            return None if t is None else t[rows]

        return PPOBatch(
            self.batch.select(rows), self.old_logprobs[rows], self.advantages[rows],
            pick(self.ref_logprobs), pick(self.returns), pick(self.old_values), self.scores[rows],
            self.stats,
        )


@dataclass
class PPOContext:
    """The explicit context of one PPO/GRPO/RLOO run (built by ``make_ppo_context``).

    ``critic`` is a ``ValueHead`` on the policy's hidden states (critic "shared"), a
    ``CausalLMWithValueHead`` (critic "separate"), or None (grpo/rloo).
    """

    policy: nn.Module
    tokenizer: Any
    config: PPOConfig
    reference: Reference | None
    critic: nn.Module | None
    generator: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    kl: KLController
    state: TrainState
    eos_token_id: int
    pad_token_id: int

    @property
    def device(self) -> torch.device:
        return device_of(self.policy)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]


# ----------------------------------------------------------------------------- setup


def make_critic(policy: nn.Module, config: PPOConfig, value_model: nn.Module | None = None) -> nn.Module | None:
    """The critic of algorithm "ppo" (None otherwise): a ``ValueHead`` on the policy's hidden
    states (critic "shared") or a ``CausalLMWithValueHead`` (critic "separate": over
    ``value_model``, default a copy of ``policy``), on the policy's device. With a policy
    sharded over the ranks (``distributed.shard_model``) the critic is sharded too: the value
    head as its own fp32 unit, a separate critic like the policy (over fp32 master weights);
    a sharded policy cannot be copied, so "separate" then needs ``value_model``. The value head
    has no bias, like the score layer of the ``*ForSequenceClassification`` value model TRL
    trains, so the critic exports to that class exactly (``hf_export``)."""
    device = device_of(policy)
    critic = None
    if config.algorithm == "ppo":
        if config.critic == "shared":
            if value_model is not None:
                raise ValueError("value_model is only used with critic='separate'")
            critic = ValueHead(hidden_size_of(policy), seed=config.seed, bias=False).to(device)
            if distributed.is_sharded(policy):
                # fp32 (ValueHead computes in fp32); its gradient summed over the ranks
                critic = distributed.shard_module(critic)
        else:
            if value_model is None and distributed.is_sharded(policy):
                raise ValueError(
                    "critic='separate' with a policy sharded over the ranks needs value_model (a sharded "
                    "policy cannot be copied): pass the initial model, unsharded, as value_model"
                )
            base = value_model if value_model is not None else copy.deepcopy(policy)
            if isinstance(base, RewardModel):
                if base.kind != "value_head":
                    raise ValueError("value_model must be a causal LM or a value-head reward model, "
                                     "got a sequence-classification reward model")
                base = base.model
            critic = base if isinstance(base, CausalLMWithValueHead) else CausalLMWithValueHead(
                base, ValueHead(hidden_size_of(base), seed=config.seed, bias=False))
            critic.to(device)
            if distributed.is_sharded(policy) and not distributed.is_sharded(critic):
                # sharded like the policy, over fp32 master weights (shards cannot be re-typed later)
                precision = resolve_precision(config.precision, device)
                cast_trainable(critic.parameters(), precision)
                critic = distributed.shard_model(critic, precision=precision)
    elif value_model is not None:
        raise ValueError(f"value_model is not used by algorithm={config.algorithm!r} (critic-free)")
    return critic


def make_ppo_context(
    policy: nn.Module,
    tokenizer,
    config: PPOConfig,
    *,
    ref_model: nn.Module | None = None,
    value_model: nn.Module | None = None,
    critic: nn.Module | None = None,
    num_training_steps: int | None = None,
    state: TrainState | Mapping[str, Any] | None = None,
) -> PPOContext:
    """Build reference, critic, Generator, optimizer, scheduler and TrainState for a run.

    Args:
        policy: a causal LM (dropout is switched off in place).
        tokenizer: needs an EOS token.
        ref_model: the reference policy; default a frozen copy of ``policy`` as given (or
            adapters-off for PEFT). Resuming a run that has a reference (``kl_coef > 0`` or
            ``adaptive_kl``) needs the original model here (ValueError otherwise): a copy of
            the resumed policy would be the wrong reference.
        value_model: for critic "separate": a causal LM, a ``CausalLMWithValueHead`` or a
            value-head ``RewardModel`` (the usual critic init); default a copy of ``policy``
            with a new value head.
        critic: a critic built by ``make_critic`` (its weights restored by the caller, as the
            CLI does for a sharded checkpoint); default ``make_critic(policy, config, value_model)``.
        num_training_steps: for the LR schedule (default ``config.max_steps`` or 1).
        state: resume from a ``TrainState`` or its ``state_dict()``.
    """
    from rftengine.generation import Generator

    if not isinstance(config, PPOConfig):
        raise ValueError(f"config must be a PPOConfig, got {type(config).__name__}")
    check_trainable_model(policy, tokenizer, config.precision)
    eos = require_eos(tokenizer)
    pad = pad_token_id(tokenizer)
    disable_dropout(policy)
    device = device_of(policy)

    if critic is None:
        critic = make_critic(policy, config, value_model)
    elif config.algorithm != "ppo" or value_model is not None:
        raise ValueError("critic is only used with algorithm='ppo', and replaces value_model")
    modules = {"critic": critic} if critic is not None else {}

    params = list(policy.parameters()) + (list(critic.parameters()) if critic is not None else [])
    train_state = make_train_state(
        config.algorithm, policy, config, num_training_steps or config.max_steps or 1, state,
        params=params, modules=modules, extra={"kl_coef": float(config.kl_coef)},
    )
    needs_ref = config.kl_coef > 0 or config.adaptive_kl
    reference = Reference(policy, ref_model, resumed=train_state.step > 0,
                          dtype=frozen_dtype(config, device)) if needs_ref else None
    kl = KLController(float(train_state.extra.get("kl_coef", config.kl_coef)), config.adaptive_kl,
                      config.target_kl, config.kl_horizon)
    generator = Generator(
        policy,
        max_batch_size=config.rollouts_per_step,
        max_seq_len=config.max_prompt_length + config.max_new_tokens,
        dtype=rollout_dtype(policy, resolve_precision(config.precision, device)),
    )
    return PPOContext(policy, tokenizer, config, reference, critic, generator, train_state.optimizer,
                      train_state.scheduler, kl, train_state, eos, pad)


# ----------------------------------------------------------------------------- the four steps


@torch.no_grad()
def rollout(
    ctx: PPOContext,
    prompts: Sequence[PromptLike],
    *,
    columns: Mapping[str, Sequence[Any]] | None = None,
    seed: int | None = None,
    num_samples: int | None = None,
) -> Rollout:
    """Sample ``num_samples`` (default ``config.group_size``) responses per prompt with the
    Generator (``sample_rollout``, the sampling path of every method); at most
    ``batch_size * group_size`` sequences per call.

    Prompts are strings or chat-message lists (rendered with the chat template), truncated from
    the left to ``max_prompt_length``. ``columns``: the prompts' extra data columns (one value
    per prompt each, for the reward functions). ``seed`` defaults to one derived from
    ``config.seed`` and the step, so a resumed run samples the same responses.
    """
    cfg = ctx.config
    ctx.policy.eval()
    return sample_rollout(
        ctx.generator, ctx.tokenizer, prompts,
        num_samples=cfg.group_size if num_samples is None else num_samples,
        max_new_tokens=cfg.max_new_tokens, max_prompt_length=cfg.max_prompt_length,
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p, stop=cfg.stop,
        seed=step_seed(cfg.seed, ctx.state.step) if seed is None else seed, columns=columns,
    )


def _reward_functions(config: PPOConfig, reward_fn: RewardFn | Sequence[RewardFn] | RewardFunctions) -> RewardFunctions:
    """``reward_fn`` weighted by ``config.reward_weights``; a ``RewardFunctions`` brings its own
    weights (``config.reward_weights`` must then be unset or the same)."""
    if not isinstance(reward_fn, RewardFunctions):
        return RewardFunctions(reward_fn, config.reward_weights)
    if config.reward_weights is not None and [float(w) for w in config.reward_weights] != reward_fn.weights:
        raise ValueError(f"reward_weights {list(config.reward_weights)} differ from the weights of the given "
                         f"RewardFunctions {reward_fn.weights}: give them once")
    return reward_fn


def score_rollout(ctx: PPOContext, ro: Rollout, reward_fn: RewardFn | Sequence[RewardFn] | RewardFunctions, *,
                  trainer_state: RewardState | None = None) -> RewardOutput:
    """Every reward function on the rollout's samples (``methods.rewards``: each in the
    convention its signature asks for, with the data's columns, the sampled ids and
    ``trainer_state``), weighted by ``config.reward_weights``; no missing-EOS penalty.
    ``trainer_state`` defaults to the context's step (``max_steps`` from the config, 0 if unset;
    epoch 0)."""
    if trainer_state is None:
        trainer_state = RewardState(ctx.state.step, ctx.config.max_steps or 0, 0.0)
    return _reward_functions(ctx.config, reward_fn)(
        ro.prompts, ro.responses, columns=ro.columns,
        completion_ids=lambda: [list(t.token_ids) for t in ro.sampled_texts()],
        trainer_state=trainer_state, device=ctx.device,
    )


def score(ctx: PPOContext, ro: Rollout, reward_fn: RewardFn | Sequence[RewardFn] | RewardFunctions, *,
          trainer_state: RewardState | None = None, stats: dict[str, Any] | None = None) -> torch.Tensor:
    """``[N]`` fp32 rewards: the weighted reward functions (``score_rollout``) minus
    ``missing_eos_penalty`` for responses that did not end with EOS. ``stats``, when given, gets
    the per-function metrics ``rewards/<name>/mean`` and ``/std``."""
    out = score_rollout(ctx, ro, reward_fn, trainer_state=trainer_state)
    if stats is not None:
        stats.update(to_floats(out.stats()))
    scores = out.scores.to(ctx.device)
    if ctx.config.missing_eos_penalty is not None:
        scores = torch.where(ro.eos, scores, scores - ctx.config.missing_eos_penalty)
    return scores


def _critic_values(ctx: PPOContext, batch: SequenceBatch, hidden: torch.Tensor | None) -> torch.Tensor:
    """Values ``[N, T]`` at the positions that score each response token."""
    if isinstance(ctx.critic, ValueHead):
        return ctx.critic(hidden)
    return ctx.critic(batch.input_ids, batch.attention_mask, packing=ctx.config.packing,
                      columns=slice(batch.prompt_length - 1, -1))


@torch.no_grad()
def _rollout_passes(ctx: PPOContext, ro: Rollout):
    """``(old_logp [N, T], ref_logp [N, T] or None, values [N, T] or None)``: the no-grad
    passes over a rollout batch, in row chunks of ``rollout_micro_batch_size`` (None: all N at
    once), the policy and critic under the run's precision. ``old_logp`` is the rollout's own
    unless ``recompute_logprobs``; ``values`` only for "ppo"."""
    from rftengine.ops import linear_token_logprobs

    cfg = ctx.config
    batch = ro.batch
    device = batch.input_ids.device
    precision = resolve_precision(cfg.precision, device)
    shared_critic = isinstance(ctx.critic, ValueHead)
    ctx.policy.eval()
    if ctx.critic is not None:
        ctx.critic.eval()
    old, ref, values = [], [], []
    for rows in split_rows(batch.num_rows, cfg.rollout_micro_batch_size or max(batch.num_rows, 1)):
        sub = batch.select(rows.to(device))
        with autocast(precision, device):
            hidden = None
            if cfg.recompute_logprobs or shared_critic:
                hidden = response_hidden(ctx.policy, sub, packing=cfg.packing)
            if cfg.recompute_logprobs:
                weight, bias = output_head(ctx.policy)
                old.append(linear_token_logprobs(
                    hidden, weight, sub.response_ids, bias=bias, temperature=cfg.temperature,
                    mask=sub.response_mask,
                    **({"chunk_size": cfg.logprob_chunk_size} if cfg.logprob_chunk_size else {}),
                ))
            if cfg.algorithm == "ppo":
                values.append(_critic_values(ctx, sub, hidden).float())
        if ctx.reference is not None:
            ref.append(ctx.reference.logprobs(sub, temperature=cfg.temperature, chunk_size=cfg.logprob_chunk_size,
                                              packing=cfg.packing))
    old_logp = torch.cat(old) if cfg.recompute_logprobs else ro.logprobs
    return old_logp, torch.cat(ref) if ref else None, torch.cat(values) if values else None


@torch.no_grad()
def compute_advantages(ctx: PPOContext, ro: Rollout, scores: torch.Tensor) -> PPOBatch:
    """Reference log-probs, KL, values and advantages for one rollout batch.

    "ppo": per-token rewards ``-β·KL_t`` (unless ``kl_in_loss``) with ``scores`` added at the
    last response token, GAE with ``gamma``/``lam``, whitened advantages.
    "grpo"/"rloo": per-sequence group advantages from ``scores`` (minus ``β·Σ_t KL_t``, the
    sequence KL, unless ``kl_in_loss``).
    Stats, named as TRL's GRPO trainer names the same quantities: ``reward`` (mean of
    ``scores``), ``reward_std`` (with groups, ``group_size`` >= 2: the mean of the groups'
    standard deviations (Bessel-corrected), as TRL logs it; else the batch's population std),
    ``frac_reward_zero_std`` (groups whose scores are all equal: no learning signal; groups
    only), ``kl`` (mean sequence KL to the reference, summed over tokens, of the chosen
    estimator), ``kl_coef``, ``completions/mean_length``, ``/min_length``, ``/max_length``
    (response tokens), ``completions/clipped_ratio`` (share cut at ``max_new_tokens`` without
    EOS), ``train/padding_fraction`` (the rollout batch's padded share: what ``packing`` saves).
    All over the global batch (every rank's rollouts).
    """
    from rftengine.ops import kl_penalty

    cfg = ctx.config
    batch = ro.batch
    mask = batch.response_mask
    old_logp, ref_logp, values = _rollout_passes(ctx, ro)
    seq_kl = torch.zeros_like(scores)
    if ref_logp is not None:
        token_kl = kl_penalty(old_logp, ref_logp, estimator=cfg.kl_estimator, mask=mask)
        seq_kl = token_kl.sum(-1)

    kl_in_reward = ref_logp is not None and not cfg.kl_in_loss
    returns = old_values = None
    if cfg.algorithm == "ppo":
        advantages, returns, old_values = critic_advantages(
            scores, values, mask, token_kl if kl_in_reward else None, kl_coef=ctx.kl.value, gamma=cfg.gamma,
            lam=cfg.lam, whiten_advantages=cfg.whiten_advantages,
            reduce=distributed.all_reduce_sum if distributed.is_distributed() else None)
    else:
        advantages = critic_free_advantages(scores, ro.group_size, seq_kl if kl_in_reward else None,
                                            kl_coef=ctx.kl.value, mode=cfg.algorithm, scale=cfg.group_scale)

    lengths = mask.sum(-1).float()
    # Over the global batch (every rank's rollouts): the adaptive KL controller reads "kl".
    stats = {
        "reward": distributed.global_mean(scores),
        "kl": distributed.global_mean(seq_kl),
        "objective/kl_coef": ctx.kl.value,
        "completions/mean_length": distributed.global_mean(lengths),
        "completions/min_length": -distributed.all_reduce_max(-lengths.min()),
        "completions/max_length": distributed.all_reduce_max(lengths.max()),
        "completions/clipped_ratio": distributed.global_mean(~ro.eos),
        "train/padding_fraction": padding_fraction(batch.attention_mask),
    }
    if ro.group_size >= 2:       # each rank holds whole groups (rows group-contiguous)
        group_std = scores.detach().float().view(-1, ro.group_size).std(dim=1)
        stats["reward_std"] = distributed.global_mean(group_std)
        stats["frac_reward_zero_std"] = distributed.global_mean(
            torch.isclose(group_std, torch.zeros_like(group_std)))
    else:
        stats["reward_std"] = distributed.global_std(scores)
    return PPOBatch(
        batch=batch,
        old_logprobs=old_logp,
        advantages=advantages,
        ref_logprobs=ref_logp if cfg.kl_in_loss else None,
        returns=returns,
        old_values=old_values,
        scores=scores,
        stats=to_floats(stats),
    )


@dataclass(frozen=True)
class StepCounts:
    """The normalisers of one optimizer step (every micro-batch of the minibatch, every rank),
    0-d fp32 tensors >= 1: valid response ``tokens`` ("token_mean", and every token-mean
    stat), ``sequences`` with at least one valid token ("seq_mean_token_mean") and ``rows``
    ("token_sum_norm"); ``rank_tokens``: this process's valid tokens (``RANK_STATS``)."""

    tokens: torch.Tensor
    sequences: torch.Tensor
    rows: torch.Tensor
    rank_tokens: torch.Tensor

    @classmethod
    def of(cls, mask: torch.Tensor) -> StepCounts:
        """From the ``[N, T]`` response mask of this process's part of the step."""
        valid = mask.float().sum(-1)
        return cls(global_count(valid.sum()), global_count((valid > 0).float().sum()),
                   global_count(float(mask.shape[0])), valid.sum().clamp(min=1.0))


# The fused op's stat names -> the run's metric names (methods/metric_names.py): TRL's for the
# clip fractions, the policy/ namespace for the rest. The op's "kl" is the current policy's
# token-mean KL (KL-in-loss); plain "kl" names the rollout's sequence KL.
OP_METRIC_NAMES = {
    "clipfrac": "clip_ratio/region_mean",
    "clipfrac_dual": "clip_ratio/dual_mean",
    "policy_loss": "policy/loss",
    "approx_kl": "policy/approx_kl",
    "ratio_mean": "policy/ratio_mean",
    "ratio_max": "policy/ratio_max",
    "kl": "policy/kl",
    "clipfrac_low": "clip_ratio/low_mean",
    "clipfrac_high": "clip_ratio/high_mean",
}
# TRL's min / max over the ranks of each rank's own low / high clip fraction: the op stat ->
# the metric, a mean over this rank's tokens (summed over micro-batches, not over ranks);
# mean_over_ranks then takes the min ("*min") or max ("*max") over the ranks.
RANK_STATS = {"clipfrac_low": "clip_ratio/low_min", "clipfrac_high": "clip_ratio/high_max"}


def ppo_loss(ctx: PPOContext, mb: PPOBatch, *, counts: StepCounts | None = None):
    """Loss of one minibatch: fused clipped policy loss (+ KL and entropy terms) and, for
    "ppo", ``vf_coef`` · clipped value loss. Returns ``(loss, stats)`` (stats detached):
    ``loss`` (the total), ``policy/loss`` (the clipped term), ``clip_ratio/region_mean`` (share
    of tokens whose clip set the loss: ratio above 1+ε_high with A > 0 or below 1-ε with A < 0,
    TRL's name) and its two sides ``clip_ratio/low_mean`` / ``clip_ratio/high_mean``,
    ``clip_ratio/low_min`` / ``clip_ratio/high_max`` (the same over this rank's tokens only:
    ``RANK_STATS``), ``clip_ratio/dual_mean`` (dual clip), ``entropy``, ``policy/approx_kl``,
    ``policy/ratio_mean``, ``policy/ratio_max``, ``policy/kl`` (KL-in-loss), ``value/loss`` and
    the other ``value/*`` ("ppo").

    ``counts``: the step's global normalisers when ``mb`` is one micro-batch of it (default:
    ``mb`` is the whole step). The ops normalise over ``mb``; their loss is multiplied by
    ``mb``'s share of the step's normaliser (tokens, sequences or rows, as the aggregation
    divides by) and the stats by its share of the tokens, so micro-batch results sum to the
    whole step's (``policy/ratio_max`` combines by max).
    """
    from rftengine.ops import fused_ppo_loss, value_loss

    cfg = ctx.config
    batch = mb.batch
    hidden = response_hidden(ctx.policy, batch, packing=cfg.packing)
    weight, bias = output_head(ctx.policy)
    kl_coef = ctx.kl.value if (cfg.kl_in_loss and mb.ref_logprobs is not None) else 0.0
    loss, op_stats = fused_ppo_loss(
        hidden, weight, batch.response_ids, mb.old_logprobs, mb.advantages, mask=batch.response_mask,
        bias=bias,
        ref_logp=mb.ref_logprobs if kl_coef > 0 else None,
        kl_coef=kl_coef,
        kl_estimator=cfg.kl_estimator,
        entropy_coef=cfg.entropy_coef,
        temperature=cfg.temperature,
        clip_range=cfg.clip_range,
        clip_range_high=cfg.clip_range_high,
        dual_clip=cfg.dual_clip,
        aggregation=cfg.aggregation,
        loss_constant=aggregation_constant(cfg),
    )
    counts = counts if counts is not None else StepCounts.of(batch.response_mask)
    valid = batch.response_mask.float().sum(-1)
    token_share = valid.sum() / counts.tokens.to(valid.device)
    policy_share = {
        "token_mean": token_share,
        "seq_mean_token_mean": (valid > 0).float().sum() / counts.sequences.to(valid.device),
        "token_sum_norm": valid.shape[0] / counts.rows.to(valid.device),
    }[cfg.aggregation]
    loss = loss * policy_share
    stats = {OP_METRIC_NAMES.get(k, k): v.detach() * (policy_share if k in ("loss", "policy_loss") else
                                                        1.0 if k == "ratio_max" else token_share)
             for k, v in dict(op_stats).items()}
    rank_share = valid.sum() / counts.rank_tokens.to(valid.device)
    stats.update({name: op_stats[k].detach() * rank_share for k, name in RANK_STATS.items()})
    if cfg.algorithm == "ppo":
        values = _critic_values(ctx, batch, hidden)
        v_loss, v_stats = value_loss(values, mb.old_values, mb.returns, mask=batch.response_mask, clip_range=cfg.value_clip)
        v_loss = v_loss * token_share      # value_loss is a token mean
        stats.update({f"value/{k}": v.detach() * token_share for k, v in dict(v_stats).items() if k != "loss"})
        stats["value/loss"] = v_loss.detach()
        loss = loss + cfg.vf_coef * v_loss
    stats["loss"] = loss.detach()
    return loss, stats


def step(ctx: PPOContext, exp: PPOBatch) -> dict[str, float]:
    """``ppo_epochs`` passes over ``exp`` in shuffled minibatches, one optimizer step each;
    then the adaptive KL controller update. Advances ``ctx.state.step`` by one.

    Returns float metrics: the rollout stats of ``exp`` plus the minibatch means of ``loss``,
    ``policy/loss``, ``clip_ratio/region_mean``, ``entropy``, ``value/loss`` (ppo), ... and
    ``learning_rate``.
    """
    cfg = ctx.config
    n = exp.num_rows
    mb_size = cfg.minibatch_size or n
    sums: dict[str, Any] = {}  # detached tensors: one host sync per step, not per minibatch
    count = 0
    ctx.policy.train()
    if ctx.critic is not None:
        ctx.critic.train()
    params = ctx.trainable_parameters()
    device = exp.old_logprobs.device
    precision = resolve_precision(cfg.precision, device)
    scaler = ctx.state.scaler
    for epoch in range(cfg.ppo_epochs):
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, ctx.state.step, salt=epoch + 1))
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, mb_size):
            mb = exp.select(order[start:start + mb_size])
            # one optimizer step per minibatch, accumulated over its micro-batches
            counts = StepCounts.of(mb.batch.response_mask)
            micro = [mb.select(rows.to(device)) for rows in split_rows(mb.num_rows, micro_batch_rows(cfg, mb.num_rows))]
            stats = accumulate_gradients(micro, lambda m, counts=counts: ppo_loss(ctx, m, counts=counts),
                                         precision=precision, device=device, scaler=scaler, max_keys=("policy/ratio_max",),
                                         rank_keys=tuple(RANK_STATS.values()))
            stats["grad_norm"] = clip_and_step(params, ctx.optimizer, None, cfg.max_grad_norm, loss=stats["loss"],
                                               state=ctx.state, max_skipped_steps=cfg.max_skipped_steps,
                                               scaler=scaler)
            for k, v in stats.items():
                sums[k] = sums[k] + v if k in sums else v
            count += 1
    step_scheduler(ctx.scheduler)
    metrics = {k: v / count for k, v in to_floats(sums).items()}
    metrics.update(exp.stats)
    metrics["learning_rate"] = ctx.optimizer.param_groups[0]["lr"]
    metrics["train/skipped_steps"] = skipped_steps(ctx.state)
    if scaler is not None:
        metrics["train/loss_scale"] = float(scaler.get_scale())
    ctx.kl.update(exp.stats.get("kl", 0.0), n * distributed.world_size())  # the global batch's rollouts
    ctx.state.extra["kl_coef"] = ctx.kl.value
    ctx.state.step += 1
    ctx.policy.eval()
    return metrics


# ----------------------------------------------------------------------------- entry point


def require_prompt_positions(model: nn.Module, tokenizer, prompts: Sequence[PromptLike], config) -> None:
    """Before any work: every prompt (cut to ``config.max_prompt_length``) plus
    ``config.max_new_tokens`` fits the model's ``max_position_embeddings``. The prompts are
    only encoded when the configured lengths alone could overflow."""
    limit = max_positions_of(model)
    if limit is None or not prompts or config.max_prompt_length + config.max_new_tokens <= limit:
        return
    longest = max(len(encode_prompt(tokenizer, p, config.max_prompt_length)) for p in prompts)
    require_positions(model, longest + config.max_new_tokens,
                      f"the longest prompt + max_new_tokens, {longest} + {config.max_new_tokens}",
                      "max_prompt_length or max_new_tokens")



def train_ppo(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[Any],
    config: PPOConfig | None = None,
    *,
    reward_fn: RewardFn | Sequence[RewardFn],
    ref_model: nn.Module | None = None,
    value_model: nn.Module | None = None,
    critic: nn.Module | None = None,
    eval_data: Sequence[Any] | None = None,
    callback: Callback | None = None,
    state: TrainState | Mapping[str, Any] | None = None,
    checkpoint_fn: CheckpointFn | None = None,
    progress: bool = False,
) -> TrainResult:
    """Optimise ``policy`` against ``reward_fn`` with PPO, GRPO or RLOO (``config.algorithm``).

    Args:
        policy: causal LM, trained in place; its trainable weights are first cast to the
            dtype of ``config.precision`` (fp32 master weights under the mixed precisions).
        tokenizer: its tokenizer (needs an EOS token).
        prompts: strings, chat-message lists, or rows ``{"prompt": ..., <column>: ...}`` whose
            other columns (``answer``, ``reference`` ...) reach the reward functions, one value
            per sample (see ``methods.rewards``).
        config: ``PPOConfig`` (defaults if None); ``config.reward_weights`` weighs several
            reward functions.
        reward_fn: a reward function or a list of them: TRL's ``f(prompts=, completions=,
            completion_ids=, **columns)`` or ``f(prompts, responses, **kw)`` (a ``RewardScorer``,
            a Judge, any function), each returning one score (or None) per sample; the
            convention is read from the signature (``methods.rewards``). Logged per function
            as ``rewards/<name>/mean`` and ``/std``.
        ref_model, value_model, critic: see ``make_ppo_context``.
        callback: ``callback(step, metrics)`` after each step.
        state: a ``TrainState`` or its ``state_dict()`` to resume from (``policy`` must hold the
            checkpoint's weights; pass the original model as ``ref_model``, see above).
        checkpoint_fn: ``checkpoint_fn(state)`` every ``config.save_every`` steps and at the end.
        progress: show a tqdm bar.
        eval_data: held-out prompt data (as ``prompts``): ``group_size`` responses per prompt,
            sampled as in training with a fixed seed and scored like the training rollouts, as
            ``eval/reward``, ``eval/reward_std``, ``eval/completions/mean_length`` every
            ``config.eval_every`` steps and after the last (``rftengine.methods.evaluation``).
    """
    config = config or PPOConfig()
    texts, columns = split_prompt_columns(prompts)
    eval_texts, eval_columns = split_prompt_columns(eval_data) if eval_data is not None else (None, None)
    if eval_texts is not None:
        require_prompt_positions(policy, tokenizer, eval_texts, config)
    rewards = _reward_functions(config, reward_fn)   # bad weights: before any work
    require_prompt_positions(policy, tokenizer, texts, config)
    num_steps = total_steps(config, len(texts), config.batch_size)
    ctx = make_ppo_context(policy, tokenizer, config, ref_model=ref_model, value_model=value_model,
                           critic=critic, num_training_steps=num_steps, state=state)

    def run_step(idx: list[int]) -> dict[str, float]:
        ro = rollout(ctx, [texts[i] for i in idx], columns={k: [v[i] for i in idx] for k, v in columns.items()})
        reward_state = RewardState(ctx.state.step, num_steps, ctx.state.data_position / len(texts))
        reward_stats: dict[str, float] = {}
        scores = score(ctx, ro, rewards, trainer_state=reward_state, stats=reward_stats)
        exp = compute_advantages(ctx, ro, scores)
        exp.stats.update(reward_stats)
        return step(ctx, exp)

    evaluate = None
    if eval_texts is not None:
        from rftengine.methods.evaluation import rollout_evaluator

        evaluate = rollout_evaluator(ctx.generator, tokenizer, eval_texts, config, lambda ro: score(ctx, ro, rewards),
                                     num_samples=config.group_size, columns=eval_columns)

    history = train_loop(ctx.state, config, num_steps, len(texts), run_step, callback=callback,
                         checkpoint_fn=checkpoint_fn, progress=progress, desc=config.algorithm,
                         postfix={"reward": "reward", "kl": "kl"}, evaluate=evaluate)
    return TrainResult(model=policy, state=ctx.state, history=history, critic=ctx.critic, context=ctx)


def evaluate_reward(
    ctx: PPOContext, prompts: Sequence[Any], reward_fn: RewardFn | Sequence[RewardFn], *, seed: int = 12345,
    num_samples: int = 1, progress: bool = False,
) -> float:
    """Mean weighted reward (``score_rollout``, no missing-EOS penalty) of ``num_samples``
    sampled responses per prompt, with a fixed seed and no training (before/after
    comparisons); ``prompts`` as ``train_ppo`` takes them; ``progress`` shows a bar over rollouts."""
    if not 1 <= num_samples <= ctx.config.rollouts_per_step:
        raise ValueError(
            f"num_samples must be in [1, batch_size * group_size = {ctx.config.rollouts_per_step}], got {num_samples}"
        )
    per_call = ctx.config.rollouts_per_step // num_samples
    texts, columns = split_prompt_columns(prompts)
    rewards = _reward_functions(ctx.config, reward_fn)
    total, count = 0.0, 0
    for start in track(range(0, len(texts), per_call), progress, desc="evaluation rollouts"):
        ro = rollout(ctx, texts[start:start + per_call], seed=seed + start, num_samples=num_samples,
                     columns={k: v[start:start + per_call] for k, v in columns.items()})
        raw = score_rollout(ctx, ro, rewards).scores
        total += float(raw.sum())
        count += raw.numel()
    return total / max(count, 1)
