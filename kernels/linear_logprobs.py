"""Softmax passes over one token chunk of lm_head logits, for `linear_token_logprobs`.

The lm_head matmuls run in cuBLAS; these kernels do the vocabulary-wide work between them.
One program per row of a [C, V] logits chunk (fp32, or the input dtype when cuBLAS cannot
write fp32), bias added and temperature applied on the fly:

- `chunk_stats`: online log-sum-exp over V, the target logit and `sum(e * z)` for the
  entropy, in one read of the row.
- `chunk_grads`: dlogits = (g_logp * (onehot - p) - g_ent * p * (log p + H)) / T, written
  IN PLACE over the logits chunk, in the dtype the dh/dW matmuls consume. When that dtype
  is narrower than the logits (fp32 logits, bf16 grads) row r of the gradient occupies the
  first half of row r's own bytes (row stride 2V elements): column j is written over bytes
  that held fp32 columns < j, which were all read in this or an earlier block of the same
  program. A barrier between each block's loads and stores keeps warps that run ahead from
  overwriting columns another warp of the program has not loaded yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _block_and_warps(vocab: int) -> tuple[int, int]:
    # 4096 fp32 values per block at 8 warps (16 a thread) keep registers in check while the
    # V loop stays long enough to hide latency; small vocabularies take one block.
    block = min(triton.next_power_of_2(vocab), 4096)
    warps = 8 if block >= 2048 else 4
    return block, warps


@triton.jit
def _chunk_stats_kernel(
    logits_ptr, row_stride, bias_ptr, targets_ptr, keep_ptr,
    logp_ptr, lse_ptr, entropy_ptr,
    V, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    keep = row >= 0  # all-true; a tensor so it can mask loads
    if HAS_MASK:
        keep = tl.load(keep_ptr + row) != 0
    n_cols = tl.where(keep, V, 0)  # masked rows read nothing

    m = float("-inf")
    s = 0.0
    w = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        z = z * inv_temperature
        m_new = tl.maximum(m, tl.max(z, 0))
        rescale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * rescale + tl.sum(e, 0)
        if WITH_ENTROPY:
            # e > 0 guard: a -inf logit contributes 0, not 0 * -inf = NaN
            w = w * rescale + tl.sum(tl.where(e > 0, e * z, 0.0), 0)
        m = m_new

    target = tl.load(targets_ptr + row, mask=keep, other=0)
    z_t = tl.load(row_ptr + target, mask=keep, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z_t += tl.load(bias_ptr + target, mask=keep, other=0.0).to(tl.float32)
    z_t = z_t * inv_temperature
    lse = m + tl.log(s)
    tl.store(logp_ptr + row, tl.where(keep, z_t - lse, 0.0))
    tl.store(lse_ptr + row, tl.where(keep, lse, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(keep, lse - w / s, 0.0))


@triton.jit
def _chunk_grads_kernel(
    logits_ptr, row_stride, bias_ptr, targets_ptr, keep_ptr,
    lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    grad_ptr, grad_row_stride,
    V, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    NARROWING: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    out_ptr = grad_ptr + row * grad_row_stride
    keep = row >= 0
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
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=cols < n_read, other=0.0).to(tl.float32)
        logp = z * inv_temperature - lse
        p = tl.where(keep, tl.exp(logp), 0.0)
        dz = tl.where(cols == target, g_logp, 0.0) - g_logp * p
        if WITH_ENTROPY:
            # dH/dz_j = -p_j (log p_j + H); p > 0 guard keeps -inf logits at 0
            dz -= g_ent * tl.where(p > 0, p * (logp + entropy), 0.0)
        if NARROWING:
            tl.debug_barrier()
        tl.store(out_ptr + cols, (dz * inv_temperature).to(grad_ptr.dtype.element_ty), mask=in_row)


def chunk_stats(
    logits: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    keep: torch.Tensor | None, temperature: float, with_entropy: bool,
):
    """logits [C, V] (unit stride along V), bias [V] or None, targets [C], keep [C] bool or None.

    Returns (logp [C] fp32, lse [C] fp32, entropy [C] fp32 or None) of softmax((logits + bias) / T).
    """
    n_rows, vocab = logits.shape
    logp = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    if n_rows == 0:
        return logp, lse, entropy
    block, warps = _block_and_warps(vocab)
    _chunk_stats_kernel[(n_rows,)](
        logits, logits.stride(0), bias if bias is not None else logits, targets,
        keep if keep is not None else targets,
        logp, lse, entropy if with_entropy else lse,
        vocab, 1.0 / temperature,
        HAS_BIAS=bias is not None, HAS_MASK=keep is not None, WITH_ENTROPY=with_entropy,
        BLOCK_V=block, num_warps=warps,
    )
    return logp, lse, entropy


def chunk_grads_(
    logits: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    keep: torch.Tensor | None, temperature: float, lse: torch.Tensor,
    entropy: torch.Tensor | None, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
    grad_dtype: torch.dtype,
) -> torch.Tensor:
    """Overwrite the logits chunk [C, V] with d(sum(g_logp*logp + g_ent*entropy))/dlogits.

    Returns the gradient as a [C, V] view of the same storage in `grad_dtype`, which may be
    narrower than the logits dtype (then its row stride is that of the logits in bytes).
    """
    n_rows, vocab = logits.shape
    narrowing = grad_dtype != logits.dtype
    grad = logits.view(grad_dtype)[:, :vocab] if narrowing else logits
    if n_rows == 0:
        return grad
    block, warps = _block_and_warps(vocab)
    with_entropy = grad_entropy is not None
    _chunk_grads_kernel[(n_rows,)](
        logits, logits.stride(0), bias if bias is not None else logits, targets,
        keep if keep is not None else targets,
        lse, entropy if with_entropy else lse,
        grad_logp, grad_entropy if with_entropy else grad_logp,
        grad, grad.stride(0),
        vocab, 1.0 / temperature,
        HAS_BIAS=bias is not None, HAS_MASK=keep is not None, WITH_ENTROPY=with_entropy,
        NARROWING=narrowing, BLOCK_V=block, num_warps=warps,
    )
    return grad
