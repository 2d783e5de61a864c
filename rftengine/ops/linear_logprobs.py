"""linear_token_logprobs: per-token log-probs straight from hidden states and the lm_head.

``logp[i] = log_softmax((h[i] @ W.T + b) / T)[targets[i]]`` without ever holding the [N, V]
logits: tokens are processed in chunks of C rows, each chunk's logits computed by one matmul
into a bounded buffer, reduced by one pass over the vocabulary, and dropped.

Layers, as everywhere in rftengine.ops: the public function, an autograd.Function, and the
chunk sweeps of `rftengine.ops._lm_head_chunks` (validation, compaction plan, per-chunk
softmax passes in Triton or torch; the matmuls are plain torch, cuBLAS on CUDA).

Cost and memory (N kept tokens, hidden H, vocabulary V):
- forward: one matmul per chunk (2NHV FLOPs) and one read of its logits; keeps lse [N].
- backward: the chunk logits are recomputed (2NHV), overwritten in place by dlogits, then
  ``dh_c = dlogits @ W`` and ``dW += dlogits.T @ h_c`` (4NHV). 8NHV in all, 4/3 of the 6NHV
  floor: with an arbitrary upstream gradient the logits are needed again in backward, and
  keeping them would cost N*V memory. When the loss on the log-probs is known up front the
  fused heads (`fused_ppo_head`, `fused_dpo_head`) do the gradient in the forward sweep,
  at 6NHV.
- extra memory: one chunk of logits (fp32 on CUDA when cuBLAS can write fp32 from half
  operands, which keeps the log-probs as exact as the inputs allow), about 384 MiB by default,
  plus O(N) vectors; the dlogits reuse the logits buffer.

Masked rows are compacted out before the matmuls (see `rftengine.ops._lm_head_chunks`).
"""

from __future__ import annotations

import torch

from rftengine.ops._lm_head_chunks import (
    GradBuffers,
    from_rows,
    gradient_sweep,
    logprob_sweep,
    prepare_head_inputs,
    to_rows,
)
from rftengine.ops._precision import accumulation_dtype, autocast_operands


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, inp, temperature, with_entropy, fp32_weight_grad):
        logp, lse, entropy = logprob_sweep(inp, temperature, with_entropy)
        # the inputs go through save_for_backward (in-place edits are caught); the rest of
        # the plan (compaction ids, compacted targets) is the op's own and rides on ctx
        ctx.save_for_backward(hidden, weight, bias, lse, entropy)
        ctx.inp = inp._replace(hidden=None, weight=None, bias=None)
        ctx.temperature = temperature
        ctx.fp32_weight_grad = fp32_weight_grad
        ctx.set_materialize_grads(False)
        full_entropy = from_rows(inp, entropy) if with_entropy else None
        return from_rows(inp, logp), full_entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, lse, entropy = ctx.saved_tensors
        inp = ctx.inp._replace(hidden=hidden, weight=weight, bias=bias)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if (grad_logp is None and grad_entropy is None) or not (need_h or need_w or need_b):
            return (None,) * 7
        if grad_logp is None:
            grad_logp = torch.zeros(inp.n_total, device=lse.device, dtype=lse.dtype)
        g = to_rows(inp, grad_logp.to(lse.dtype)).contiguous()
        g_ent = to_rows(inp, grad_entropy.to(lse.dtype)).contiguous() if grad_entropy is not None else None
        grads = GradBuffers(inp, need_h, need_w, need_b and bias is not None, ctx.fp32_weight_grad)
        gradient_sweep(inp, ctx.temperature, lse, entropy, g, g_ent, grads)
        dh, dw, db = grads.results(weight.dtype, bias.dtype if bias is not None else None)
        return dh, dw, db, None, None, None, None


@autocast_operands("hidden", "weight", "bias")
def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    fp32_weight_grad: bool = False,
):
    """Per-token log-probs of `targets` under the lm_head, without materialising the logits.

    ``z = (hidden @ weight.T + bias) / temperature``; ``logp = z[target] - logsumexp(z)`` and
    ``entropy = -sum_v p_v log p_v`` per token, exactly as `token_logprobs` on those logits.

    Args:
        hidden: ``[B, T, H]`` or ``[N, H]`` float16, bfloat16, float32 (float64: torch path
            only). Already shifted: position t scores ``targets[..., t]``.
        weight: ``[V, H]`` lm_head weight, same dtype as `hidden`; may be tied to the input
            embedding (its gradient then adds to the embedding's through autograd).
        targets: ``[B, T]`` / ``[N]`` integer ids in ``[0, V)`` at unmasked positions.
        bias: optional ``[V]``, same dtype as `weight`.
        temperature: > 0; logits are divided by it before the softmax.
        mask: optional ``[B, T]`` / ``[N]`` bool or 0/1; False positions return 0, get no
            gradient, are not read from `targets`, and cost no matmul work (compacted out).
        return_entropy: also return the per-token entropy.
        chunk_size: rows per chunk; default from the budget (about 384 MiB of logits on CUDA,
            32 MiB on CPU), in whole 128-row tiles.
        fp32_weight_grad: accumulate the weight and bias gradients over the chunks in fp32
            and round once at the end (costs a V x H fp32 buffer during backward); otherwise
            the weight gradient accumulates in the weight dtype (fp32 inside each chunk's
            matmul, rounded once per chunk).

    Returns:
        ``logp`` shaped like `targets`, float32 (float64 for float64 inputs), or
        ``(logp, entropy)``. Differentiable w.r.t. hidden, weight and bias for any upstream
        gradient. Cost 8NHV FLOPs over the kept tokens (forward 2NHV; backward recomputes the
        logits), extra memory one chunk of logits. Triton softmax passes on CUDA, the torch
        references elsewhere (`RFTENGINE_BACKEND` forces either).
    """
    inp, lead = prepare_head_inputs(
        hidden, weight, targets, bias=bias, mask=mask, temperature=temperature,
        chunk_size=chunk_size,
    )
    logp, entropy = _LinearTokenLogprobs.apply(
        inp.hidden, weight, bias, inp, float(temperature), bool(return_entropy),
        bool(fp32_weight_grad),
    )
    if return_entropy:
        return logp.view(lead), entropy.view(lead)
    return logp.view(lead)


def linear_token_logprobs_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
    bias: torch.Tensor | None = None, temperature: float = 1.0,
    mask: torch.Tensor | None = None, return_entropy: bool = False,
):
    """Unchunked plain-torch composition (logits materialised): the test oracle in float64."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    z = logits.to(accumulation_dtype(hidden)) / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    safe = targets if mask is None else torch.where(mask.bool(), targets, 0)
    logp = logprobs.gather(-1, safe.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    if mask is not None:
        logp = logp * mask.to(logp.dtype)
        entropy = entropy * mask.to(entropy.dtype)
    return (logp, entropy) if return_entropy else logp
