"""The options of PPO / GRPO / RLOO: ``PPOConfig`` (its field groups, limits, TRL aliases and
the defaults that follow the algorithm) and the values derived from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rftengine.methods import trl_names
from rftengine.methods.config_base import (
    ConfigBase,
    LogprobFields,
    LoopFields,
    OptimFields,
    SamplingFields,
    option,
    redefault,
    trl,
)
from rftengine.methods.optimization import validate_micro_batches
from rftengine.ops.advantages import GROUP_SCALES
from rftengine.ops.kl import KL_ESTIMATORS
from rftengine.ops.ppo import AGGREGATIONS

ALGORITHMS = ("ppo", "grpo", "rloo")
CRITICS = ("shared", "separate")


@dataclass
class PPOConfig(ConfigBase, LogprobFields, SamplingFields, LoopFields, OptimFields):
    """Options of PPO / GRPO / RLOO (validated on construction; ``from_dict`` rejects unknown
    keys with the closest valid one).

    Rollout: ``batch_size`` prompts per step, ``group_size`` responses each (N = product),
    sampled with temperature/top_k/top_p up to ``max_new_tokens``.
    Update: ``ppo_epochs`` passes over the N rollouts in minibatches of ``minibatch_size``
    sequences (None = all N), one optimizer step per minibatch, each accumulated over
    micro-batches of ``micro_batch_size`` sequences (or ``gradient_accumulation_steps`` equal
    ones) with the step's global normalisers; ``rollout_micro_batch_size`` (None = all N)
    chunks the no-grad old/ref log-prob and value passes. precision, gradient_checkpointing:
    see ``rftengine.methods.config_base.PRECISIONS`` and ``enable_gradient_checkpointing``.
    KL: coefficient ``kl_coef`` (β ≥ 0), estimator k1/k2/k3 (default k1 for "ppo", k3 for
    "grpo"/"rloo"), in the reward (default for "ppo": per token for "ppo", the sequence sum
    subtracted from each score for "grpo"/"rloo") or in the loss (default otherwise);
    ``adaptive_kl`` steers β toward ``target_kl`` (sequence-level nats) over ``kl_horizon``.
    Reward: ``reward_weights`` weighs several reward functions (TRL's, one per function;
    null: all 1); ``missing_eos_penalty`` is subtracted from the score of responses that hit
    ``max_new_tokens`` without EOS.
    Aggregation: "token_sum_norm" (Dr. GRPO) divides each sequence's token sum by the fixed
    ``loss_constant`` (None: ``max_new_tokens``, TRL's ``max_completion_length``), so the
    loss scale does not follow each batch's longest response.
    Critic-free: ``group_scale`` divides group-centred scores by the group std ("group", the
    default for "grpo"), the batch std ("batch") or nothing ("none", the default for "rloo").
    Critic ("ppo" only): "shared" = a value head on the policy's final hidden states (one
    forward for both), "separate" = its own trunk (a copy of the policy, or ``value_model``).
    The shared fields (optimizer, loop, precision, memory) are declared once in
    ``methods.config_base``; ``rftengine train --help-config METHOD`` lists every field.
    """

    algorithm: Literal[ALGORITHMS] = option("ppo", "ppo (critic and GAE), grpo or rloo (group baselines)")
    learning_rate: float = redefault(OptimFields, "learning_rate", 1e-6)
    group_size: int = option(1, "responses sampled per prompt (>= 2 for grpo/rloo)", min=1,
                             aliases=(trl("num_generations"),))
    # update
    ppo_epochs: int = option(4, "passes over each step's rollouts", min=1,
                             aliases=(trl("num_iterations"), trl("num_ppo_epochs")))
    minibatch_size: int | None = option(None, "sequences per optimizer step (null: all rollouts of the step)",
                                        min=1)
    rollout_micro_batch_size: int | None = option(None, "sequences per no-grad log-prob/value pass (null: all)",
                                                  min=1)
    clip_range: float = option(0.2, "PPO ratio clip ε", min=0.0, exclusive_min=True,
                               aliases=(trl("epsilon"), trl("cliprange")))
    clip_range_high: float | None = option(None, "upper clip ε_high (DAPO clip-higher; null: clip_range)",
                                           min=0.0, exclusive_min=True, aliases=(trl("epsilon_high"),))
    dual_clip: float | None = option(None, "dual-clip c for negative advantages (null: off)",
                                     min=1.0, exclusive_min=True)
    aggregation: Literal[AGGREGATIONS] = option("token_mean", "how token losses become the step's loss",
                                                aliases=(trl("loss_type", trl_names.loss_type),))
    loss_constant: float | None = option(None, "token_sum_norm divisor (null: max_new_tokens)",
                                         min=0.0, exclusive_min=True)
    entropy_coef: float = option(0.0, "entropy bonus weight", min=0.0)
    # KL
    kl_coef: float = option(0.05, "KL penalty β", min=0.0, aliases=(trl("beta"),))
    kl_estimator: Literal[KL_ESTIMATORS] | None = option(None, "k1, k2 or k3 (null: k1 for ppo, k3 otherwise)")
    kl_in_loss: bool | None = option(None, "KL in the loss rather than the reward (null: false for ppo, "
                                           "true otherwise)")
    adaptive_kl: bool = option(False, "steer β toward target_kl (needs the KL in the reward)")
    target_kl: float = option(6.0, "adaptive KL target, sequence-level nats", min=0.0, exclusive_min=True)
    kl_horizon: int = option(10000, "adaptive KL horizon", min=1)
    # reward
    reward_weights: list[float] | None = option(None, "one weight per reward function, summed over the functions "
                                                      "that scored a sample (null: all 1)")
    missing_eos_penalty: float | None = option(None, "subtracted from the score of responses without EOS")
    # critic and GAE ("ppo")
    critic: Literal[CRITICS] = option("shared", "value head on the policy (shared) or its own trunk (separate)")
    vf_coef: float = option(0.1, "value loss weight", min=0.0)
    value_clip: float = option(0.2, "value clip range", min=0.0, exclusive_min=True,
                               aliases=(trl("cliprange_value"),))
    gamma: float = option(1.0, "GAE discount", min=0.0, max=1.0)
    lam: float = option(0.95, "GAE λ", min=0.0, max=1.0)
    whiten_advantages: bool = option(True, "whiten advantages over the batch")
    # critic-free ("grpo", "rloo")
    group_scale: Literal[GROUP_SCALES] | None = option(None, "divide group-centred scores by the group std, "
                                                       "the batch std or none (null: group for grpo, "
                                                       "none for rloo)",
                                                       aliases=(trl("scale_rewards", trl_names.scale_rewards),))
    # misc
    recompute_logprobs: bool = option(False, "old log-probs from a training forward pass instead of the "
                                             "sampler's own")

    def validate(self):
        owner = type(self).__name__
        if self.algorithm != "ppo" and self.group_size < 2:
            raise ValueError(
                f"{owner}.group_size must be >= 2 for algorithm={self.algorithm!r} (advantages "
                f"compare responses within a prompt's group), got {self.group_size}"
            )
        if self.minibatch_size is not None and self.minibatch_size > self.batch_size * self.group_size:
            raise ValueError(
                f"{owner}.minibatch_size must be <= batch_size * group_size "
                f"({self.batch_size * self.group_size}), got {self.minibatch_size}"
            )
        validate_micro_batches(self, self.minibatch_size or self.rollouts_per_step,
                               "minibatch_size" if self.minibatch_size else "batch_size * group_size")
        if self.loss_constant is not None and self.aggregation != "token_sum_norm":
            raise ValueError(
                f"{owner}.loss_constant is only used with aggregation='token_sum_norm', got "
                f"aggregation={self.aggregation!r}"
            )
        # Defaults that follow the algorithm (kept as given otherwise).
        if self.kl_estimator is None:
            self.kl_estimator = "k1" if self.algorithm == "ppo" else "k3"
        if self.kl_in_loss is None:
            self.kl_in_loss = self.algorithm != "ppo"
        if self.group_scale is None:
            self.group_scale = "group" if self.algorithm == "grpo" else "none"
        if self.adaptive_kl:
            if self.kl_in_loss:
                raise ValueError(
                    f"{owner}.adaptive_kl steers the KL penalty in the reward; it needs kl_in_loss=False"
                )
            if self.kl_coef <= 0:
                raise ValueError(f"{owner}.kl_coef must be > 0 with adaptive_kl (it scales β), got {self.kl_coef}")

    @property
    def rollouts_per_step(self) -> int:
        return self.batch_size * self.group_size


def aggregation_constant(config: PPOConfig) -> float | None:
    """The divisor of "token_sum_norm" (``loss_constant``, default ``max_new_tokens``); None
    for the other aggregations."""
    if config.aggregation != "token_sum_norm":
        return None
    return float(config.loss_constant if config.loss_constant is not None else config.max_new_tokens)
