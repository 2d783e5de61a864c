"""Per-token log-probs (and entropy) over rows of logits, one pass over V per row.

Used by `token_logprobs` (a [N, V] logits tensor) and by `linear_token_logprobs` (one token
chunk of lm_head logits at a time, bias added on the fly). One program per row:

- `logprob_stats`: online log-sum-exp over V, the target logit, and
  `sum(exp(z - m) * (z - m))` alongside so the entropy costs no second pass and never
  subtracts two numbers of the logits' magnitude.
- `logprob_grads`: recomputes p = exp(z - lse) block by block and writes
  dlogits = (g_logp * (onehot - p) - g_ent * p * (log p + H)) / T, into a separate tensor or
  IN PLACE over the logits (`chunk_grads_`). In place and narrower than the logits (fp32
  logits, bf16 grads), row r of the gradient occupies the first half of row r's own bytes (row
  stride 2V elements): column j is written over bytes that held fp32 columns < j, which were
  all read in this or an earlier block of the same program. A barrier between each block's
  loads and stores keeps warps that run ahead from overwriting columns another warp of the
  program has not loaded yet.

z = (logits + bias) / T; all arithmetic is fp32 whatever the logits dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def block_and_warps(vocab: int) -> tuple[int, int]:
    # 4096 fp32 values per block at 8 warps (16 a thread) keep registers in check while the
    # V loop stays long enough to hide memory latency; small vocabularies take one block.
    block = min(triton.next_power_of_2(vocab), 4096)
    warps = 8 if block >= 2048 else 4
    return block, warps


@triton.jit
def _logprob_stats_kernel(
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
    # masked rows run the loop zero times: no memory traffic for prompt/pad positions
    n_cols = tl.where(keep, V, 0)

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
        # shift by 0 while every logit so far is -inf: exp(-inf - (-inf)) would be NaN
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - shift)
        e = tl.exp(z - shift)
        if WITH_ENTROPY:
            # w = sum e * (z - shift), relative to the running max so that entropy =
            # log s - w / s stays exact for |z| ~ 1e4. Moving the shift from m to m_new adds
            # (m - m_new) to every earlier (z - m).
            moved = tl.where(s > 0, m - shift, 0.0)
            # e > 0 guard: a -inf logit contributes 0, not 0 * -inf = NaN
            w = (w + s * moved) * rescale + tl.sum(tl.where(e > 0, e * (z - shift), 0.0), 0)
        s = s * rescale + tl.sum(e, 0)
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
        tl.store(entropy_ptr + row, tl.where(keep, tl.log(s) - w / s, 0.0))


@triton.jit
def _logprob_grads_kernel(
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


def logprob_stats(
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
    block, warps = block_and_warps(vocab)
    _logprob_stats_kernel[(n_rows,)](
        logits, logits.stride(0), bias if bias is not None else logits, targets,
        keep if keep is not None else targets,
        logp, lse, entropy if with_entropy else lse,
        vocab, 1.0 / temperature,
        HAS_BIAS=bias is not None, HAS_MASK=keep is not None, WITH_ENTROPY=with_entropy,
        BLOCK_V=block, num_warps=warps,
    )
    return logp, lse, entropy


def logprob_grads(
    logits: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    keep: torch.Tensor | None, temperature: float, lse: torch.Tensor,
    entropy: torch.Tensor | None, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write d(sum(g_logp * logp + g_ent * entropy))/dlogits into `out` [C, V] and return it.

    `out` may be a separate tensor or a view of the logits' own storage (see `chunk_grads_`).
    """
    n_rows, vocab = logits.shape
    if n_rows == 0:
        return out
    block, warps = block_and_warps(vocab)
    with_entropy = grad_entropy is not None
    in_place = out.data_ptr() == logits.data_ptr()
    _logprob_grads_kernel[(n_rows,)](
        logits, logits.stride(0), bias if bias is not None else logits, targets,
        keep if keep is not None else targets,
        lse, entropy if with_entropy else lse,
        grad_logp, grad_entropy if with_entropy else grad_logp,
        out, out.stride(0),
        vocab, 1.0 / temperature,
        HAS_BIAS=bias is not None, HAS_MASK=keep is not None, WITH_ENTROPY=with_entropy,
        NARROWING=in_place and out.dtype != logits.dtype, BLOCK_V=block, num_warps=warps,
    )
    return out


# --- token_logprobs: a [N, V] logits tensor, gradient into a new tensor -------------------

def token_logprobs_forward(logits, targets, keep, temperature, with_entropy):
    """(logp, lse, entropy) of softmax(logits / T) for logits [N, V]; see `logprob_stats`."""
    return logprob_stats(logits, None, targets, keep, temperature, with_entropy)


def token_logprobs_backward(logits, targets, keep, temperature, lse, entropy, grad_logp, grad_entropy):
    """dlogits [N, V] in the logits dtype; see `logprob_grads`."""
    out = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    return logprob_grads(logits, None, targets, keep, temperature, lse, entropy, grad_logp, grad_entropy, out)


# --- linear_token_logprobs: one chunk of lm_head logits, gradient in place -----------------

chunk_stats = logprob_stats


def chunk_grads_(logits, bias, targets, keep, temperature, lse, entropy, grad_logp, grad_entropy, grad_dtype):
    """Overwrite the logits chunk [C, V] with its gradient; returns it as a [C, V] view in
    `grad_dtype`, which may be narrower than the logits (then its row stride is the logits')."""
    vocab = logits.shape[1]
    out = logits.view(grad_dtype)[:, :vocab] if grad_dtype != logits.dtype else logits
    return logprob_grads(logits, bias, targets, keep, temperature, lse, entropy, grad_logp, grad_entropy, out)
