"""rftengine.ops: the functional API.

Every op dispatches to Triton on CUDA tensors and to a plain-torch reference elsewhere
(`RFTENGINE_BACKEND=triton|torch` forces one). Log-probs, KL and losses accumulate in fp32.
"""

from rftengine.ops.advantages import gae, group_advantages, whiten
from rftengine.ops.fused_dpo_head import fused_dpo_loss
from rftengine.ops.fused_ppo_head import fused_ppo_loss
from rftengine.ops.kl import kl_penalty
from rftengine.ops.linear_logprobs import linear_token_logprobs
from rftengine.ops.logprobs import token_logprobs
from rftengine.ops.ppo import ppo_policy_loss, value_loss
from rftengine.ops.preference import bradley_terry_loss, dpo_loss
from rftengine.ops.sampling import sample_tokens
from rftengine.ops.sequence import sequence_logprobs

__all__ = [
    "bradley_terry_loss",
    "dpo_loss",
    "fused_dpo_loss",
    "fused_ppo_loss",
    "gae",
    "group_advantages",
    "kl_penalty",
    "linear_token_logprobs",
    "ppo_policy_loss",
    "sample_tokens",
    "sequence_logprobs",
    "token_logprobs",
    "value_loss",
    "whiten",
]
