"""rftengine: a lean, performance-first engine for reinforcement finetuning of language models."""

__version__ = "0.1.0"

from rftengine import ops  # noqa: E402
from rftengine.ops import token_logprobs  # noqa: E402

__all__ = ["ops", "token_logprobs", "__version__"]
