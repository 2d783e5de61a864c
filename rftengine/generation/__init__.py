"""rftengine.generation: rollouts in the training process, with per-token log-probs from the
same kernel as training (`rftengine.ops.token_logprobs`).

    gen = Generator(model, max_batch_size=64, max_seq_len=512)
    out = gen.generate(prompts, num_samples=4, max_new_tokens=256, eos_token_ids=[eos], seed=0)
    out.sequences, out.logprobs, out.response_mask, out.finish_reasons

vLLM's request shape, with text in and out (`SamplingParams`, `rftengine.generation.text`):

    gen = Generator(model, tokenizer=tok, max_batch_size=64, max_seq_len=512)
    out = gen.generate(["Hi", [{"role": "user", "content": "2+2?"}]], SamplingParams(n=4, max_tokens=64, stop=["\n"]))
    out.texts, out.finish_reasons, request_outputs(out, 4)
"""

from rftengine.generation.generator import EagerFallbackWarning, Generator
from rftengine.generation.outputs import GenerationOutput
from rftengine.generation.params import SamplingParams
from rftengine.generation.sampling import SamplerSettings
from rftengine.generation.text import CompletionOutput, RequestOutput, request_outputs

__all__ = ["Generator", "GenerationOutput", "SamplingParams", "SamplerSettings", "EagerFallbackWarning",
           "RequestOutput", "CompletionOutput", "request_outputs"]
