"""rftengine.methods: reward models, RLHF/PPO (with GRPO/RLOO), DPO, RLAIF and Constitutional AI.

Each method is one config dataclass + one ``train_*`` entry point + step-level functions for
custom loops. Shared vocabulary: a reward function is any ``reward_fn(prompts, responses) ->
Tensor[B] | list[float]``; preference data is ``[{"prompt", "chosen", "rejected"}, ...]``;
``callback(step, metrics)`` is called every step; ``TrainState`` carries what a checkpoint needs;
every ``train_*`` returns a ``TrainResult`` (model, state, history, and the method's extras).
"""

from rftengine.methods.cai import (
    CAIConfig,
    CAIExample,
    generate_revisions,
    revision_pairs,
    revision_sft_data,
    train_cai,
)
from rftengine.methods.config_base import config_from_dict, config_to_dict
from rftengine.methods.data_order import batch_indices
from rftengine.methods.loop import Callback, CheckpointFn
from rftengine.methods.optimization import NonFiniteStepError, make_optimizer, make_scheduler
from rftengine.methods.train_state import TrainState
from rftengine.methods.rewards import (
    NamedReward,
    RewardFn,
    RewardFunctions,
    RewardOutput,
    RewardState,
    call_reward_fn,
    uses_trl_convention,
)
from rftengine.methods.constitution import (
    Constitution,
    Principle,
    default_constitution_path,
    load_constitution,
    principle_judge,
)
from rftengine.methods.data import (
    PreferenceExample,
    SampledText,
    SequenceBatch,
    collate_preferences,
    decode_responses,
    encode_preferences,
    encode_prompt,
    encode_response,
    has_chat_template,
    make_sequence_batch,
    render_prompt,
    render_response,
    require_eos,
    split_prompt_data,
)
from rftengine.methods.dpo import (
    DPOConfig,
    dpo_batch_loss,
    dpo_loss_types,
    dpo_step,
    precompute_reference_logps,
    preference_accuracy,
    sequence_logps,
    train_dpo,
)
from rftengine.methods.judge import (
    JUDGE_MODES,
    GroupReward,
    Judge,
    pairs_from_scores,
    single_token_id,
)
from rftengine.methods.modeling import (
    CausalLMWithValueHead,
    Reference,
    RewardModel,
    ValueHead,
    disable_dropout,
    final_hidden,
    is_peft_model,
    load_causal_lm,
    load_tokenizer,
    output_head,
    response_hidden,
    response_logprobs,
    reward_model_from_causal_lm,
)
from rftengine.methods.ppo import (
    PPOBatch,
    PPOContext,
    Rollout,
    compute_advantages,
    evaluate_reward,
    make_ppo_context,
    ppo_loss,
    rollout,
    score,
    score_rollout,
    step,
    train_ppo,
)
from rftengine.methods.ppo_advantages import KLController
from rftengine.methods.ppo_config import PPOConfig
from rftengine.methods.reward import (
    RewardConfig,
    RewardScorer,
    pairwise_accuracy,
    reward_loss,
    reward_step,
    score_pairs,
    train_reward_model,
)
from rftengine.methods.rlaif import (
    RLAIFConfig,
    judge_reward_fn,
    rlaif_dpo_round,
    sample_responses,
    train_rlaif,
)
from rftengine.methods.result import DEPRECATED_RESULT_NAMES, TrainResult, deprecated_result
from rftengine.methods.rollout import sample_rollout
from rftengine.methods.sft import (
    SFTConfig,
    encode_sft_examples,
    sft_loss,
    sft_step,
    train_sft,
)

__all__ = [
    # common
    "Callback", "CheckpointFn", "NonFiniteStepError", "TrainState", "batch_indices",
    "config_from_dict", "config_to_dict", "make_optimizer",
    "make_scheduler", "TrainResult",
    # reward functions
    "NamedReward", "RewardFn", "RewardFunctions", "RewardOutput", "RewardState", "call_reward_fn",
    "uses_trl_convention",
    # data
    "PreferenceExample", "SampledText", "SequenceBatch", "collate_preferences", "decode_responses",
    "encode_preferences", "encode_prompt", "encode_response", "has_chat_template",
    "make_sequence_batch", "render_prompt", "render_response", "require_eos", "split_prompt_data",
    # modeling
    "CausalLMWithValueHead", "Reference", "RewardModel", "ValueHead", "disable_dropout",
    "final_hidden", "is_peft_model", "load_causal_lm", "load_tokenizer", "output_head",
    "response_hidden", "response_logprobs", "reward_model_from_causal_lm",
    # reward model
    "RewardConfig", "RewardScorer", "pairwise_accuracy", "reward_loss",
    "reward_step", "score_pairs", "train_reward_model",
    # ppo / grpo / rloo
    "KLController", "PPOBatch", "PPOConfig", "PPOContext", "Rollout", "sample_rollout",
    "compute_advantages", "evaluate_reward", "make_ppo_context", "ppo_loss", "rollout", "score", "score_rollout",
    "step", "train_ppo",
    # dpo
    "DPOConfig", "dpo_batch_loss", "dpo_loss_types", "dpo_step",
    "precompute_reference_logps", "preference_accuracy", "sequence_logps", "train_dpo",
    # sft
    "SFTConfig", "encode_sft_examples", "sft_loss", "sft_step", "train_sft",
    # rlaif
    "GroupReward", "JUDGE_MODES", "Judge", "pairs_from_scores", "single_token_id",
    "RLAIFConfig", "judge_reward_fn", "rlaif_dpo_round", "sample_responses", "train_rlaif",
    # constitutional ai
    "CAIConfig", "CAIExample", "Constitution", "Principle", "default_constitution_path",
    "generate_revisions", "load_constitution", "principle_judge", "revision_pairs", "revision_sft_data",
    "train_cai",
]


def __getattr__(name: str):
    # The per-method result classes are deprecated aliases of TrainResult (they warn once used).
    if name in DEPRECATED_RESULT_NAMES:
        return deprecated_result(name)
    raise AttributeError(f"module 'rftengine.methods' has no attribute {name!r}")
