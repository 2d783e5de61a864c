"""token_logprobs: per-token log-probs (and entropy) of target ids under softmax(logits / T).

Three layers, as everywhere in rftengine.ops: the public function (validation, reshapes),
an autograd.Function, and two interchangeable implementations of forward/backward, the
Triton launchers in `rftengine.kernels.logprobs` and the chunked torch reference below.
"""

from __future__ import annotations

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

# Rows per chunk of the reference so that one chunk of fp32 logits stays near 16 MiB.
_REFERENCE_CHUNK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for half/single inputs; float64 inputs keep float64 (test oracles)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_rows_per_chunk(vocab: int) -> int:
    return max(1, _REFERENCE_CHUNK_ELEMENTS // max(vocab, 1))


def token_logprobs_forward_reference(
    logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None,
    temperature: float, with_entropy: bool,
):
    """Chunked torch version of the forward kernel: same inputs and outputs."""
    n_rows, vocab = logits.shape
    acc = compute_dtype(logits.dtype)
    logp = torch.zeros(n_rows, device=logits.device, dtype=acc)
    lse = torch.zeros_like(logp)
    entropy = torch.zeros_like(logp) if with_entropy else None
    step = reference_rows_per_chunk(vocab)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        z = logits[rows].to(acc) / temperature
        chunk_lse = torch.logsumexp(z, dim=-1)
        tgt = targets[rows] if keep is None else torch.where(keep[rows], targets[rows], 0)
        logp[rows] = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - chunk_lse
        lse[rows] = chunk_lse
        if with_entropy:
            # -sum p log p, not lse - sum p z: the latter scales p's rounding error by |z|
            logp_all = z - chunk_lse.unsqueeze(-1)
            p = torch.exp(logp_all)
            entropy[rows] = -torch.where(p > 0, p * logp_all, 0).sum(-1)
    if keep is not None:
        for out in (logp, lse, entropy):
            if out is not None:
                out.masked_fill_(~keep, 0)
    return logp, lse, entropy


def token_logprobs_backward_reference(
    logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None,
    temperature: float, lse: torch.Tensor, entropy: torch.Tensor | None,
    grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
) -> torch.Tensor:
    """Chunked torch version of the backward kernel: dlogits [N, V] in the logits dtype."""
    n_rows, vocab = logits.shape
    acc = compute_dtype(logits.dtype)
    grad_logits = torch.empty_like(logits)
    g_logp = grad_logp.to(acc)
    g_ent = grad_entropy.to(acc) if grad_entropy is not None else None
    if keep is not None:
        g_logp = g_logp.masked_fill(~keep, 0)
        g_ent = g_ent.masked_fill(~keep, 0) if g_ent is not None else None
    step = reference_rows_per_chunk(vocab)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        logp_all = logits[rows].to(acc) / temperature - lse[rows].to(acc).unsqueeze(-1)
        p = torch.exp(logp_all)
        dz = -g_logp[rows].unsqueeze(-1) * p
        tgt = targets[rows] if keep is None else torch.where(keep[rows], targets[rows], 0)
        dz.scatter_add_(-1, tgt.unsqueeze(-1), g_logp[rows].unsqueeze(-1))
        if g_ent is not None:
            h = entropy[rows].to(acc).unsqueeze(-1)
            dz -= g_ent[rows].unsqueeze(-1) * torch.where(p > 0, p * (logp_all + h), 0)
        if keep is not None:
            # masked rows carry lse = 0, so exp(z) may overflow there (0 * inf = NaN)
            dz.masked_fill_(~keep[rows].unsqueeze(-1), 0)
        grad_logits[rows] = (dz / temperature).to(logits.dtype)
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
    flat = t.reshape(-1, t.shape[-1])
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
