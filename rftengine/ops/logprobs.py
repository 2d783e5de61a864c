"""token_logprobs: per-token log-probs (and entropy) of target ids under softmax(logits / T).

Three layers, as everywhere in rftengine.ops: the public function (validation, reshapes),
an autograd.Function, and two interchangeable implementations of forward/backward, the
Triton launchers in `rftengine.kernels.logprobs` and the chunked torch reference below.
"""

from __future__ import annotations

import math

import torch

from rftengine.ops._checks import (
    as_mask,
    check_floating,
    check_index_range,
    check_integer,
    check_positive,
    check_same_device,
    check_shape,
    check_tensor,
)
from rftengine.ops._dispatch import use_triton
from rftengine.ops._precision import accumulation_dtype

# Rows per chunk of the reference so that one chunk of fp32 logits stays near 16 MiB.
_REFERENCE_CHUNK_ELEMENTS = 1 << 22



def reference_rows_per_chunk(vocab: int) -> int:
    return max(1, _REFERENCE_CHUNK_ELEMENTS // max(vocab, 1))


# torch references of the two per-row passes of `rftengine.kernels.logprobs`, applied to one
# chunk of rows at a time: the CPU path of token_logprobs and linear_token_logprobs.


def logprob_stats_reference(
    logits: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    keep: torch.Tensor | None, temperature: float, with_entropy: bool,
):
    """Same contract as `rftengine.kernels.logprobs.logprob_stats`; logits left intact.

    Works in place on one copy of the chunk so that the CPU path holds about three chunks.
    """
    acc = accumulation_dtype(logits)
    z = logits.to(acc, copy=True)
    if bias is not None:
        z += bias.to(acc)
    z /= temperature
    lse = torch.logsumexp(z, dim=-1)
    tgt = targets.long() if keep is None else torch.where(keep, targets, 0).long()
    z -= lse.unsqueeze(-1)  # now log p
    logp = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        # -sum p log p rather than lse - sum p z: no cancellation between two large terms;
        # a -inf logit contributes 0, not 0 * -inf
        plogp = torch.exp(z).mul_(z).masked_fill_(z == float("-inf"), 0)
        entropy = -plogp.sum(-1)
    if keep is not None:
        for out in (logp, lse, entropy):
            if out is not None:
                out.masked_fill_(~keep, 0)
    return logp, lse, entropy


def logprob_grads_reference_(
    logits: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    keep: torch.Tensor | None, temperature: float, lse: torch.Tensor,
    entropy: torch.Tensor | None, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
    grad_dtype: torch.dtype,
) -> torch.Tensor:
    """Same contract as `rftengine.kernels.logprobs.chunk_grads_`: dlogits in place.

    The logits buffer is scratch: it becomes log p, then receives the gradient.
    """
    acc = accumulation_dtype(logits)
    logp_all = logits if logits.dtype == acc else logits.to(acc)
    if bias is not None:
        logp_all += bias.to(acc)
    logp_all /= temperature
    logp_all -= lse.to(acc).unsqueeze(-1)
    g = grad_logp.to(acc)
    g_ent = grad_entropy.to(acc) if grad_entropy is not None else None
    if keep is not None:
        g = g.masked_fill(~keep, 0)
        g_ent = g_ent.masked_fill(~keep, 0) if g_ent is not None else None
    dz = torch.exp(logp_all)  # p, turned into the gradient in place
    if g_ent is not None:
        # dH/dz_j = -p_j (log p_j + H); zero where p_j = 0 (a -inf logit)
        ent_term = (logp_all + entropy.to(acc).unsqueeze(-1)).mul_(dz).masked_fill_(dz == 0, 0)
        dz.mul_(-g.unsqueeze(-1))
        dz -= ent_term.mul_(g_ent.unsqueeze(-1))
        del ent_term
    else:
        dz.mul_(-g.unsqueeze(-1))
    if keep is not None:  # masked rows may hold anything (their lse is 0): write zeros
        dz.masked_fill_(~keep.unsqueeze(-1), 0)
    tgt = targets.long() if keep is None else torch.where(keep, targets, 0).long()
    dz.scatter_add_(-1, tgt.unsqueeze(-1), g.unsqueeze(-1))
    dz /= temperature
    vocab = logits.shape[-1]
    grad = logits if grad_dtype == logits.dtype else logits.view(grad_dtype)[:, :vocab]
    return grad.copy_(dz)


def token_logprobs_forward_reference(
    logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None,
    temperature: float, with_entropy: bool,
):
    """Chunked torch version of the forward kernel: same inputs and outputs."""
    n_rows, vocab = logits.shape
    acc = accumulation_dtype(logits)
    logp = torch.zeros(n_rows, device=logits.device, dtype=acc)
    lse = torch.zeros_like(logp)
    entropy = torch.zeros_like(logp) if with_entropy else None
    step = reference_rows_per_chunk(vocab)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        outs = logprob_stats_reference(
            logits[rows], None, targets[rows], None if keep is None else keep[rows],
            temperature, with_entropy,
        )
        for full, part in zip((logp, lse, entropy), outs):
            if full is not None:
                full[rows] = part
    return logp, lse, entropy


def token_logprobs_backward_reference(
    logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None,
    temperature: float, lse: torch.Tensor, entropy: torch.Tensor | None,
    grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
) -> torch.Tensor:
    """Chunked torch version of the backward kernel: dlogits [N, V] in the logits dtype."""
    n_rows, vocab = logits.shape
    acc = accumulation_dtype(logits)
    grad_logits = torch.empty_like(logits)
    step = reference_rows_per_chunk(vocab)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        scratch = logits[rows].to(acc, copy=True)  # becomes the gradient in place
        grad_logits[rows] = logprob_grads_reference_(
            scratch, None, targets[rows], None if keep is None else keep[rows], temperature,
            lse[rows], None if entropy is None else entropy[rows], grad_logp[rows],
            None if grad_entropy is None else grad_entropy[rows], acc,
        )
    return grad_logits


def _implementation(triton_path: bool):
    if triton_path:
        from rftengine.kernels import logprobs as kernel

        return kernel.token_logprobs_forward, kernel.token_logprobs_backward
    return token_logprobs_forward_reference, token_logprobs_backward_reference


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, keep, temperature, with_entropy, triton_path):
        forward_impl, _ = _implementation(triton_path)
        logp, lse, entropy = forward_impl(logits, targets, keep, temperature, with_entropy)
        ctx.save_for_backward(logits, targets, keep, lse, entropy)
        ctx.temperature = temperature
        ctx.triton_path = triton_path
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, keep, lse, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_logp is None and grad_entropy is None):
            return None, None, None, None, None, None
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        _, backward_impl = _implementation(ctx.triton_path)
        grad_logits = backward_impl(
            logits, targets, keep, ctx.temperature, lse, entropy,
            grad_logp.contiguous(),
            grad_entropy.contiguous() if grad_entropy is not None else None,
        )
        return grad_logits, None, None, None, None, None


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with unit stride along V; copies only when V is strided."""
    # N spelled out: reshape(-1, 0) is ambiguous for an empty last dim (T = 0)
    flat = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
):
    """Log-probability of each target id under ``softmax(logits / temperature)``.

    ``logp[..., t] = z[..., t, targets[..., t]] - logsumexp_v z[..., t, v]`` with
    ``z = logits / temperature``; the entropy is ``H = -sum_v p_v log p_v``.

    Args:
        logits: ``[..., T, V]`` float16, bfloat16, float32 (or float64, torch path only).
            Already shifted: position t scores ``targets[..., t]``.
        targets: ``[..., T]`` integer token ids in ``[0, V)`` at unmasked positions.
        temperature: > 0; the same value the rollout sampled with.
        mask: optional ``[..., T]`` bool or 0/1 tensor; False positions return 0 and get
            no gradient (their target ids are not read, so padding such as -100 is fine).
        return_entropy: also return the per-position entropy ``[..., T]``.

    Returns:
        ``logp`` ``[..., T]`` float32 (float64 for float64 logits), or ``(logp, entropy)``.
        Differentiable w.r.t. ``logits``. One pass over V with an online log-sum-exp,
        accumulated in fp32: on CUDA a Triton kernel, elsewhere a torch reference that holds
        at most one ~16 MiB chunk of fp32 logits.
    """
    check_floating("logits", logits)
    check_tensor("targets", targets)
    check_integer("targets", targets)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., T, V] with V > 0, got shape {tuple(logits.shape)}")
    check_shape("targets", targets, logits.shape[:-1], "logits.shape[:-1]")
    if mask is not None:
        check_tensor("mask", mask)
    device = check_same_device(logits=logits, targets=targets, mask=mask)
    check_positive("temperature", temperature)
    keep = as_mask("mask", mask, targets.shape, device)
    vocab = logits.shape[-1]
    check_index_range("targets", targets, vocab, keep)

    lead = targets.shape
    flat_keep = keep.reshape(-1).contiguous() if keep is not None else None
    triton_path = use_triton(logits) and logits.dtype != torch.float64
    logp, entropy = _TokenLogprobs.apply(
        rows_view(logits), targets.reshape(-1).contiguous(), flat_keep,
        float(temperature), bool(return_entropy), triton_path,
    )
    if return_entropy:
        return logp.view(lead), entropy.view(lead)
    return logp.view(lead)
