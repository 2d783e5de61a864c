"""One decode step's sampling over rows of logits, without sorting and without [N, V] temporaries.

One program per row. ``z = logits * inv_t`` (fp32, the same product as the torch reference).

- Pass 1: online max ``m`` and ``s = sum exp(z - m)`` (the trainer's log-sum-exp, so the drawn
  token's log-prob is the one `token_logprobs` gives), the row's minimum, and either the
  first argmax (greedy), or the exponential race over the whole row (no truncation), or the
  maximum of each block of columns (kept in a small ``[N, n_blocks]`` scratch tensor).
- Truncation, as one per-row cut value: ``z`` is kept when ``z - m >= log(min_p)`` (min-p),
  ``z >= cut_k`` (top-k) and ``z >= cut_p`` (top-p, over the distribution renormalised to the
  tokens min-p and top-k keep), vLLM's order. Tokens tied with the last kept one are kept.
  ``cut_k`` and ``cut_p`` are found by `_search_cut`: a bisection on the cut value whose
  bracket ends are always values of the row, each step one counting pass over the blocks that
  can still matter (a block whose maximum is below the bracket is skipped). It ends when the
  bracket holds one value of the row: the exact cut, so the kept set equals the sort-based
  reference's.
- Last pass (only when truncating): the race over the kept tokens of the blocks whose maximum
  reaches the cut, and the kept mass for the truncated log-prob.

Cost per row: greedy and plain temperature sampling read the row once; truncation adds about
log2(value range / gap at the cut) search passes (typically 10-20 for a bf16 row), each over
the blocks that can still hold the cut, then the race pass. The race draws noise only in
blocks whose largest z is within the largest possible bonus (17) of the best score so far.
One program per row: at B=64 rows a GPU's SMs are not all busy (a split over V would need a
second reduction pass; not done yet).

The race: the token is ``argmax_v z_v - log(-log u_v)`` over the kept set (Gumbel-max, the
exponential race ``argmax p_v / E_v`` with ``E_v = -log u_v`` written in log space). ``u`` is the
counter-based noise of `rftengine.ops.sampling.log_uniform_noise`, recomputed here in registers
with the same 64-bit hash, so both paths race on the very same ``u``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# splitmix64 constants (see rftengine.ops.sampling), as unsigned 64-bit values
_GOLDEN = tl.constexpr(0x9E3779B97F4A7C15)
_MIX1 = tl.constexpr(0xBF58476D1CE4E5B9)
_MIX2 = tl.constexpr(0x94D049BB133111EB)
_NEG_INF = tl.constexpr(float("-inf"))
# The race's bonus -log(-log u) is at most 16.64 (u <= 1 - 2^-24): a block whose largest z is
# more than this below the best score so far cannot win, and its noise is not drawn.
_MAX_BONUS = tl.constexpr(17.0)


def block_and_warps(vocab: int) -> tuple[int, int]:
    # 2048 columns at 8 warps: 8 a thread, each carrying a 64-bit hash state through the
    # noise; small vocabularies take one block.
    block = min(triton.next_power_of_2(vocab), 2048)
    warps = 8 if block >= 2048 else 4
    return block, warps


@triton.jit
def _race_scores(z, key, cols):
    """z - log(-log u) for columns `cols` of the row whose noise key is `key` (uint64)."""
    x = key + (cols.to(tl.uint64) + 1) * _GOLDEN
    x ^= x >> 30
    x *= _MIX1
    x ^= x >> 27
    x *= _MIX2
    # the top 23 bits read as a signed integer t in [-2^22, 2^22), as the reference reads them:
    # t + 2^22 is those bits with the top one flipped
    bits = ((x >> 41) ^ (1 << 22)).to(tl.int32)
    u = (bits.to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    # tl.log on fp32 compiles to libdevice's logf, the function torch's log runs on the device
    return z - tl.log(-tl.log(u))


@triton.jit
def _ordered_mid(lo, hi):
    """A float between lo and hi halfway in their bit patterns (for an infinite lo)."""
    a = lo.to(tl.int32, bitcast=True)
    b = hi.to(tl.int32, bitcast=True)
    # negative floats' bits order backwards: flip them to get ints that order like the floats
    a = tl.where(a < 0, a ^ 0x7FFFFFFF, a).to(tl.int64)
    b = tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.int64)
    mid = ((a + b) >> 1).to(tl.int32)
    mid = tl.where(mid < 0, mid ^ 0x7FFFFFFF, mid)
    return mid.to(tl.float32, bitcast=True)


@triton.jit
def _search_cut(
    row_ptr, bmax_ptr, V, inv_t, m, cut_in, log_min_p, lo, target,
    MASS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The smallest value t of the row's set R = {z >= cut_in, z - m >= log_min_p} with
    G(t) < target, where G(t) = #{z in R: z > t} (MASS False) or sum_{z in R, z > t} exp(z - m)
    (MASS True: `target` is then a fraction of R's mass). `lo` is any lower bound of R.

    Invariant: the answer lies in [lo, hi]; hi (first the row maximum m, which is in R) is a
    value of R that satisfies G(hi) < target. Each pass at a pivot p in [lo, hi) counts G(p)
    and finds the values of R next to p, so both ends move onto values of the row: it stops
    when they meet.
    """
    hi = m
    n_pass = 0
    while lo < hi:
        if lo == _NEG_INF:
            p = _ordered_mid(lo, hi)
        else:
            p = lo + (hi - lo) * 0.5
        # p must lie in [lo, hi): halfway between two neighbouring floats can round up to hi
        p = tl.where((p >= lo) & (p < hi), p, lo)
        g = 0.0
        total = 0.0
        above = float("inf")  # a: smallest value of R above p
        below = _NEG_INF      # b: largest value of R in [lo, p]
        n_below = 0
        lowest = float("inf")  # c: smallest value of R at or above lo
        for start in range(0, V, BLOCK_V):
            block_max = tl.load(bmax_ptr + start // BLOCK_V)
            if (block_max >= lo) & (block_max - m >= log_min_p):
                cols = start + tl.arange(0, BLOCK_V)
                z = tl.load(row_ptr + cols, mask=cols < V, other=_NEG_INF).to(tl.float32) * inv_t
                in_r = (cols < V) & (z >= cut_in) & (z - m >= log_min_p) & (z >= lo)
                up = in_r & (z > p)
                down = in_r & (z <= p)
                if MASS:
                    w = tl.where(in_r, tl.exp(z - m), 0.0)
                    total += tl.sum(w, 0)
                    g += tl.sum(tl.where(up, w, 0.0), 0)
                else:
                    g += tl.sum(up.to(tl.float32), 0)
                above = tl.minimum(above, tl.min(tl.where(up, z, float("inf")), 0))
                below = tl.maximum(below, tl.max(tl.where(down, z, _NEG_INF), 0))
                n_below += tl.sum(down.to(tl.int32), 0)
                lowest = tl.minimum(lowest, tl.min(tl.where(in_r, z, float("inf")), 0))
        if MASS:
            # the first pass visits every block that holds R (lo is below R): R's whole mass
            target = tl.where(n_pass == 0, target * total, target)
        n_pass += 1
        if g < target:
            hi = tl.where(n_below > 0, below, above)
            lo = tl.where(n_below > 0, lowest, above)
        else:
            lo = above
    return hi


@triton.jit
def _sample_kernel(
    logits_ptr, row_stride, keys_ptr, tokens_ptr, logp_ptr, truncated_ptr, bmax_ptr,
    V, n_blocks, inv_t, top_k, top_p, log_min_p,
    GREEDY: tl.constexpr, USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
    TRUNCATES: tl.constexpr, WITH_TRUNCATED: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    row_bmax = bmax_ptr + row * n_blocks
    key = tl.load(keys_ptr + row).to(tl.uint64, bitcast=True)
    offs = tl.arange(0, BLOCK_V)

    # pass 1: log-sum-exp, and the draw itself when nothing is truncated
    m = _NEG_INF
    s = 0.0
    low = float("inf")
    n_max = 0.0  # how many columns equal the running max (greedy's kept set)
    best = _NEG_INF  # greedy: the max z; race: the best score
    best_col = 0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z = tl.load(row_ptr + cols, mask=cols < V, other=_NEG_INF).to(tl.float32) * inv_t
        # the first column holding the block's max: with `>` across blocks, the reference's argmax
        block_max, block_arg = tl.max(z, 0, return_indices=True)
        m_new = tl.maximum(m, block_max)
        # shift by 0 while every logit so far is -inf: exp(-inf - (-inf)) would be NaN
        shift = tl.where(m_new == _NEG_INF, 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), 0)
        if GREEDY:
            if WITH_TRUNCATED:
                n_max = tl.where(block_max > m, 0.0, n_max) + tl.sum((z == m_new).to(tl.float32), 0)
            if block_max > best:
                best = block_max
                best_col = start + block_arg
        elif TRUNCATES:
            if USE_TOP_K or USE_TOP_P:
                low = tl.minimum(low, tl.min(tl.where(cols < V, z, float("inf")), 0))
            tl.store(row_bmax + start // BLOCK_V, block_max)
        elif block_max + _MAX_BONUS >= best:
            score = tl.where(cols < V, _race_scores(z, key, cols), _NEG_INF)
            block_best, block_arg = tl.max(score, 0, return_indices=True)
            if block_best > best:
                best = block_best
                best_col = start + block_arg
        m = m_new
    lse = m + tl.log(s)

    if GREEDY:
        kept_lse = m + tl.log(n_max)
    elif TRUNCATES:
        # the block maxima were stored by whichever thread holds a scalar; the passes below read
        # them from every thread: a CTA barrier makes the stores visible
        tl.debug_barrier()
        cut = _NEG_INF
        if USE_TOP_K:
            cut = _search_cut(row_ptr, row_bmax, V, inv_t, m, _NEG_INF, _NEG_INF, low,
                              top_k.to(tl.float32), MASS=False, BLOCK_V=BLOCK_V)
        if USE_TOP_P:
            cut = _search_cut(row_ptr, row_bmax, V, inv_t, m, cut, log_min_p,
                              tl.maximum(low, cut), top_p, MASS=True, BLOCK_V=BLOCK_V)
        # last pass: the race over the kept set, and its mass
        kept = 0.0
        for start in range(0, V, BLOCK_V):
            block_max = tl.load(row_bmax + start // BLOCK_V)
            holds_kept = (block_max >= cut) & (block_max - m >= log_min_p)
            may_win = holds_kept & (block_max + _MAX_BONUS >= best)
            # the kept mass needs every block that holds kept tokens; the race only the ones
            # that may still win
            visit = may_win
            if WITH_TRUNCATED:
                visit = holds_kept
            if visit:
                cols = start + offs
                z = tl.load(row_ptr + cols, mask=cols < V, other=_NEG_INF).to(tl.float32) * inv_t
                keep = (cols < V) & (z >= cut) & (z - m >= log_min_p)
                if WITH_TRUNCATED:
                    kept += tl.sum(tl.where(keep, tl.exp(z - m), 0.0), 0)
                if may_win:
                    score = tl.where(keep, _race_scores(z, key, cols), _NEG_INF)
                    block_best, block_arg = tl.max(score, 0, return_indices=True)
                    if block_best > best:
                        best = block_best
                        best_col = start + block_arg
        kept_lse = m + tl.log(kept)
    else:
        kept_lse = lse
    best_z = tl.load(row_ptr + best_col).to(tl.float32) * inv_t

    tl.store(tokens_ptr + row, best_col.to(tl.int64))
    tl.store(logp_ptr + row, best_z - lse)
    if WITH_TRUNCATED:
        tl.store(truncated_ptr + row, best_z - kept_lse)


def sample_tokens(
    logits: torch.Tensor, keys: torch.Tensor, inv_temperature: float, top_k: int, top_p: float,
    log_min_p: float, with_truncated: bool,
):
    """logits [N, V] (unit stride along V), keys [N] int64; scalars already normalised by the op:
    ``inv_temperature`` and ``log_min_p`` float32-representable, ``top_k`` 0 (off) or in [1, V),
    ``top_p`` in (0, 1], ``log_min_p`` -inf when min-p is off.

    Returns (tokens [N] int64, logp [N] fp32, truncated_logp [N] fp32 or None).
    """
    n_rows, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(n_rows, device=device, dtype=torch.int64)
    logp = torch.empty(n_rows, device=device, dtype=torch.float32)
    truncated = torch.empty_like(logp) if with_truncated else None
    if n_rows == 0:
        return tokens, logp, truncated
    block, warps = block_and_warps(vocab)
    greedy = top_k == 1
    use_top_k = top_k > 1
    use_top_p = top_p < 1.0
    truncates = not greedy and (use_top_k or use_top_p or log_min_p > -math.inf)
    n_blocks = triton.cdiv(vocab, block)
    # block maxima: only the truncating variant writes and reads them
    bmax = torch.empty((n_rows, n_blocks) if truncates else (1,), device=device, dtype=torch.float32)
    _sample_kernel[(n_rows,)](
        logits, logits.stride(0), keys, tokens, logp, truncated if with_truncated else logp, bmax,
        vocab, n_blocks, inv_temperature, top_k, top_p, log_min_p,
        GREEDY=greedy, USE_TOP_K=use_top_k, USE_TOP_P=use_top_p, TRUNCATES=truncates,
        WITH_TRUNCATED=with_truncated, BLOCK_V=block, num_warps=warps,
        # no fused multiply-adds: z - m, z - log(-log u) round as the torch reference's ops do
        enable_fp_fusion=False,
    )
    return tokens, logp, truncated
