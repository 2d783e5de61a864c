"""rftengine.generation: rollouts in the training process, with per-token log-probs from the
same kernel as training (`rftengine.ops.token_logprobs`).

    gen = Generator(model, max_batch_size=64, max_seq_len=512)
    out = gen.generate(prompts, num_samples=4, max_new_tokens=256, eos_token_ids=[eos], seed=0)
    out.sequences, out.logprobs, out.response_mask, out.finish_reasons
"""

from rftengine.generation.generator import EagerFallbackWarning, Generator
from rftengine.generation.outputs import GenerationOutput
from rftengine.generation.sampling import SamplingParams

__all__ = ["Generator", "GenerationOutput", "SamplingParams", "EagerFallbackWarning"]
