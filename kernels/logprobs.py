"""Per-token log-probs (and entropy) over a [N, V] logits matrix, one pass over V.

Forward: one program per row streams V in blocks with an online log-sum-exp, gathers the
target logit, and keeps `sum(exp(z - m) * (z - m))` alongside so the entropy costs no second pass.
Backward: one program per row recomputes p = exp(z - lse) block by block and writes
dlogits = (g_logp * (onehot - p) - g_ent * p * (log p + H)) / T.
All arithmetic is fp32 whatever the logits dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _block_and_warps(vocab: int) -> tuple[int, int]:
    # 4096 fp32 values per block keep registers under control at 8 warps (16 values a thread)
    # while making the V loop long enough to hide memory latency; small V uses one block.
    block = min(triton.next_power_of_2(vocab), 4096)
    warps = 8 if block >= 2048 else 4
    return block, warps


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, row_stride, targets_ptr, keep_ptr,
    logp_ptr, lse_ptr, entropy_ptr,
    V, inv_temperature,
    HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    keep = row >= 0  # all-true; a tensor so it can mask loads
    if HAS_MASK:
        keep = tl.load(keep_ptr + row) != 0
    # masked rows run the loop zero times: no memory traffic for prompt/pad positions
    n_cols = tl.where(keep, V, 0)

    m = float("-inf")
    s = 0.0
    w = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        z = z * inv_temperature
        m_new = tl.maximum(m, tl.max(z, 0))
        # shift by 0 while every logit so far is -inf: exp(-inf - (-inf)) would be NaN
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - shift)
        e = tl.exp(z - shift)
        if WITH_ENTROPY:
            # w = sum e * (z - shift), kept relative to the running max so that entropy =
            # log s - w / s never subtracts two numbers of the logits' magnitude (|z| ~ 1e4).
            # Moving the shift from m to m_new adds (m - m_new) to every earlier (z - m).
            moved = tl.where(s > 0, m - shift, 0.0)
            # e > 0 guard: a -inf logit contributes 0, not 0 * -inf = NaN
            w = (w + s * moved) * rescale + tl.sum(tl.where(e > 0, e * (z - shift), 0.0), 0)
        s = s * rescale + tl.sum(e, 0)
        m = m_new

    target = tl.load(targets_ptr + row, mask=keep, other=0)
    z_t = tl.load(row_ptr + target, mask=keep, other=0.0).to(tl.float32) * inv_temperature
    lse = m + tl.log(s)
    tl.store(logp_ptr + row, tl.where(keep, z_t - lse, 0.0))
    tl.store(lse_ptr + row, tl.where(keep, lse, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(keep, tl.log(s) - w / s, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr, row_stride, targets_ptr, keep_ptr,
    lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    grad_logits_ptr, grad_row_stride,
    V, inv_temperature,
    HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    out_ptr = grad_logits_ptr + row * grad_row_stride
    keep = row >= 0  # all-true; a tensor so it can mask loads
    if HAS_MASK:
        keep = tl.load(keep_ptr + row) != 0
    target = tl.load(targets_ptr + row, mask=keep, other=-1)
    lse = tl.load(lse_ptr + row)
    g_logp = tl.where(keep, tl.load(grad_logp_ptr + row).to(tl.float32), 0.0)
    if WITH_ENTROPY:
        entropy = tl.load(entropy_ptr + row)
        g_ent = tl.where(keep, tl.load(grad_entropy_ptr + row).to(tl.float32), 0.0)

    n_read = tl.where(keep, V, 0)  # masked rows read nothing and write zeros
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=cols < n_read, other=0.0).to(tl.float32)
        z = z * inv_temperature
        logp = z - lse
        p = tl.where(keep, tl.exp(logp), 0.0)
        dz = tl.where(cols == target, g_logp, 0.0) - g_logp * p
        if WITH_ENTROPY:
            # dH/dz_j = -p_j (log p_j + H); p > 0 guard keeps -inf logits at 0
            dz -= g_ent * tl.where(p > 0, p * (logp + entropy), 0.0)
        tl.store(out_ptr + cols, (dz * inv_temperature).to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def token_logprobs_forward(
    logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None,
    temperature: float, with_entropy: bool,
):
    """logits [N, V] (last dim contiguous), targets [N] int, keep [N] bool or None.

    Returns (logp [N] fp32, lse [N] fp32, entropy [N] fp32 or None).
    """
    n_rows, vocab = logits.shape
    logp = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    if n_rows == 0:
        return logp, lse, entropy
    block, warps = _block_and_warps(vocab)
    _token_logprobs_fwd_kernel[(n_rows,)](
        logits, logits.stride(0), targets, keep if keep is not None else targets,
        logp, lse, entropy if with_entropy else lse,
        vocab, 1.0 / temperature,
        HAS_MASK=keep is not None, WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=warps,
    )
    return logp, lse, entropy


def token_logprobs_backward(
    logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None,
    temperature: float, lse: torch.Tensor, entropy: torch.Tensor | None,
    grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
) -> torch.Tensor:
    """Gradient of sum(grad_logp * logp + grad_entropy * entropy) w.r.t. logits [N, V]."""
    n_rows, vocab = logits.shape
    grad_logits = torch.empty((n_rows, vocab), device=logits.device, dtype=logits.dtype)
    if n_rows == 0:
        return grad_logits
    block, warps = _block_and_warps(vocab)
    with_entropy = grad_entropy is not None
    _token_logprobs_bwd_kernel[(n_rows,)](
        logits, logits.stride(0), targets, keep if keep is not None else targets,
        lse, entropy if with_entropy else lse,
        grad_logp, grad_entropy if with_entropy else grad_logp,
        grad_logits, grad_logits.stride(0),
        vocab, 1.0 / temperature,
        HAS_MASK=keep is not None, WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=warps,
    )
    return grad_logits
