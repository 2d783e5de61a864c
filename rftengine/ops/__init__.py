"""rftengine.ops: the functional API. Every op dispatches to Triton on CUDA tensors and to a
plain-torch reference elsewhere (`RFTENGINE_BACKEND=triton|torch` forces one)."""

from rftengine.ops.logprobs import token_logprobs

__all__ = ["token_logprobs"]
