"""sample_tokens: one decode step's draw, temperature, min-p/top-k/top-p and the drawn token's scores.

Everything is a pure function of device tensors with static shapes and no host sync, so the
rollout loop can capture it in a CUDA graph together with the model forward. The draw's noise
is counter-based (a hash of seed, sequence index, decode step and token id), so a row's draw
depends on its own logits and key only, not on the rows beside it.

On CUDA the Triton kernel of `rftengine.kernels.sampling` does it in a few passes over each row
with no ``[N, V]`` temporaries; the torch reference below is the CPU path and the test oracle.
Both race on the same noise with the same fp32 operations, so they draw the same tokens: they
can differ only where two candidates' scores, or a kept mass and ``top_p``, agree to float
rounding (the libraries' ``log``/``exp`` may differ in the last bit).
"""

from __future__ import annotations

import math

import numpy
import torch

from rftengine.ops._checks import (
    check_floating,
    check_integer,
    check_number,
    check_positive,
    check_same_device,
    check_shape,
    check_tensor,
)
from rftengine.ops._dispatch import use_triton
from rftengine.ops.logprobs import rows_view, token_logprobs

# Counter-based noise. splitmix64's constants (Steele, Lea & Flood, "Fast splittable
# pseudorandom number generators", OOPSLA 2014), written as signed int64: torch's int64
# arithmetic wraps around on CPU and CUDA alike, which is what the hash needs.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64
# Uniforms keep 23 bits: (m + 0.5) / 2^23 for an integer m < 2^23 is exact in float32 and
# lies in [2^-24, 1 - 2^-24], so log(u) is finite and never 0.
_UNIFORM_BITS = 23


def _xorshift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """``x ^= x >>> shift`` in place; ``>>`` on int64 is arithmetic, so the sign copies are masked off."""
    return x.bitwise_xor_((x >> shift).bitwise_and_((1 << (64 - shift)) - 1))


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (a bijection of int64), in place."""
    return _xorshift(_xorshift(_xorshift(x, 30).mul_(_MIX1), 27).mul_(_MIX2), 31)


def noise_keys(seed: torch.Tensor, sequence_ids: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One 64-bit key per row, a hash of (seed, global sequence index, decode step).

    Args:
        seed: ``[1]`` int64. sequence_ids: ``[N]`` int64. step: ``[1]`` int64 (the response
            token's index: 0 for the token sampled from the prefill logits).

    Returns:
        ``[N]`` int64. Device tensors in, device tensors out: no host sync, capturable.
    """
    key = _mix64(seed.add(_GOLDEN))
    key = _mix64(sequence_ids.bitwise_xor(key))
    return _mix64(key.bitwise_xor_(step))


def log_uniform_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[N, V]`` float32 ``log u`` with ``u`` uniform in (0, 1), a pure function of (key, column).

    Element ``(n, v)`` is the top 23 bits of splitmix64's output ``v + 1`` of the stream seeded
    with ``keys[n]``: ``mix64(keys[n] + (v + 1) * golden)`` (splitmix64's state sequence; the
    finaliser's last xor-shift does not touch the top bits and is skipped). So a row's noise
    depends on its key only, never on the other rows or on ``N``. The Triton sampler computes
    the same bits in registers.
    """
    counters = torch.arange(1, vocab + 1, dtype=torch.int64, device=keys.device).mul_(_GOLDEN)
    x = keys[:, None] + counters
    x = _xorshift(_xorshift(x, 30).mul_(_MIX1), 27).mul_(_MIX2)
    # top 23 bits as a signed integer in [-2^22, 2^22)
    u = x.bitwise_right_shift_(64 - _UNIFORM_BITS).float()
    return u.add_(2.0 ** (_UNIFORM_BITS - 1) + 0.5).mul_(2.0**-_UNIFORM_BITS).log_()


def exponential_race(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One draw per row from ``softmax(scores)``: ``argmax_v scores_v - log(-log u_v)``.

    ``scores`` ``[N, V]`` float32 are log-probabilities up to a per-row constant (``-inf``:
    never drawn). This is the exponential race ``argmax_v p_v / E_v`` with ``E_v = -log u_v ~
    Exp(1)`` (the first of V exponential clocks with rates p_v to ring is distributed as p),
    in log space, i.e. the Gumbel-max trick. ``u`` comes from ``log_uniform_noise(keys)``
    (``keys`` ``[N]`` int64, from ``noise_keys``): row n's draw depends on ``scores[n]`` and
    ``keys[n]`` alone. No host sync (unlike ``torch.multinomial``). ``scores`` is left intact.
    """
    gumbel_shift = log_uniform_noise(keys, scores.shape[-1]).neg_().log_()  # log(-log u)
    return gumbel_shift.neg_().add_(scores).argmax(dim=-1)


def float32(value: float) -> float:
    """``value`` rounded to the nearest float32: a scalar both paths use bit for bit."""
    return float(numpy.float32(value))


def truncate_logits(z: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Mask (to -inf) the logits outside the min-p / top-k / top-p set of each row.

    Args:
        z: ``[N, V]`` float32 temperature-scaled logits.
        top_k: keep the k largest per row (0 or >= V: all).
        top_p: keep the smallest prefix of the sorted, renormalised distribution whose mass
            reaches top_p (the token that crosses top_p is kept; at least one token always is).
        min_p: keep the tokens whose probability is at least ``min_p`` times the row's largest
            (0: all), tested as ``z - max(z) >= float32(log(min_p))``.

    vLLM's order: min-p, then top-k, then top-p over the distribution renormalised to what
    min-p and top-k keep (min-p and top-k commute; top-p's mass depends on them).

    Returns:
        ``[N, V]`` float32: ``z`` where kept, ``-inf`` elsewhere. The set is defined by a per-row
        cut value (``z >= cut`` is kept), so tokens tied with the last kept one are kept too.
    """
    vocab = z.shape[-1]
    if min_p > 0:
        zmax = z.max(dim=-1, keepdim=True).values
        z = z.masked_fill((z - zmax) < float32(math.log(min_p)), float("-inf"))
    use_k = 0 < top_k < vocab
    if not use_k and top_p >= 1.0:
        return z
    # Only the top-k candidates need sorting when top-k is on (topk returns them sorted).
    ranked = torch.topk(z, top_k, dim=-1).values if use_k else torch.sort(z, dim=-1, descending=True).values
    if top_p < 1.0:
        p = torch.softmax(ranked, dim=-1)
        mass_before = torch.cumsum(p, dim=-1) - p
        n_keep = (mass_before < top_p).sum(-1, keepdim=True).clamp_(min=1)
        cut = ranked.gather(-1, n_keep - 1)
    else:
        cut = ranked[:, -1:]
    return z.masked_fill(z < cut, float("-inf"))


def sample_tokens_reference(
    logits: torch.Tensor, keys: torch.Tensor, inv_temperature: float, top_k: int, top_p: float,
    min_p: float, with_truncated: bool,
):
    """Same contract as `rftengine.kernels.sampling.sample_tokens` (but ``min_p`` itself)."""
    z = logits.float() * inv_temperature
    if top_k == 1:
        # greedy: the first of the largest logits, no noise drawn
        tokens = z.argmax(dim=-1)
        z_kept = truncate_logits(z, 1, 1.0) if with_truncated else z
    else:
        z_kept = truncate_logits(z, top_k, top_p, min_p)
        tokens = exponential_race(z_kept, keys)
    logp = token_logprobs(logits, tokens, temperature=1.0 / inv_temperature)
    truncated = None
    if with_truncated:
        truncated = z_kept.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(z_kept, dim=-1)
    return tokens, logp, truncated


def check_sampling_args(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    """The rules every sampler argument follows; errors name the argument."""
    check_positive("temperature", temperature)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no top-k), got {top_k!r}")
    check_number("top_p", top_p, bound="in (0, 1]")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (1 = no top-p), got {top_p!r}")
    check_number("min_p", min_p, bound="in [0, 1]")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be a number in [0, 1] (0 = no min-p), got {min_p!r}")


def sample_tokens(
    logits: torch.Tensor,
    keys: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    with_truncated: bool = False,
):
    """Draw one token per row of ``softmax(truncate(logits / temperature))`` and score it.

    Args:
        logits: ``[N, V]`` raw logits of one decode step, float16, bfloat16 or float32 (float64
            on the torch path only).
        keys: ``[N]`` int64 noise keys (``noise_keys``): row n's draw is a function of
            ``logits[n]`` and ``keys[n]`` only.
        temperature: > 0; ``z = logits * float32(1 / temperature)`` in fp32.
        top_k: keep the k largest ``z`` (0 or >= V: off; 1: greedy, the first argmax, no noise).
        top_p: keep the smallest set of largest ``z`` whose renormalised mass reaches top_p
            (1: off).
        min_p: keep the tokens with ``p >= min_p * max p`` (0: off), vLLM's min-p.
        with_truncated: also return the log-prob under the truncated distribution.

    Truncation is vLLM's order (min-p, top-k, then top-p over what those keep); a cut value
    per row, so tokens tied with the last kept one are kept. The draw is the Gumbel-max race
    ``argmax z_v - log(-log u_v)`` over the kept set with ``u`` from ``log_uniform_noise``.

    Returns:
        ``(tokens [N] int64, logp [N] float32, truncated_logp [N] float32 or None)`` with
        ``logp = log softmax(z)[token]`` over the full vocabulary, the trainer's formula
        (``token_logprobs``), and ``truncated_logp = log softmax(truncate(z))[token]``.
        No host sync and static shapes: capturable in a CUDA graph. On CUDA a Triton kernel
        makes a few passes over each row (no sort, no ``[N, V]`` temporaries).
    """
    check_floating("logits", logits)
    check_tensor("keys", keys)
    check_integer("keys", keys)
    if logits.dim() != 2 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [N, V] with V > 0, got shape {tuple(logits.shape)}")
    check_shape("keys", keys, logits.shape[:1], "logits.shape[:1]")
    if keys.dtype != torch.int64:
        raise ValueError(f"keys must be int64 (from noise_keys), got {keys.dtype}")
    check_same_device(logits=logits, keys=keys)
    check_sampling_args(temperature, top_k, top_p, min_p)
    inv_temperature = float32(1.0 / temperature)
    vocab = logits.shape[-1]
    if top_k >= vocab:
        top_k = 0
    if use_triton(logits) and logits.dtype != torch.float64:
        from rftengine.kernels import sampling as kernel

        log_min_p = float32(math.log(min_p)) if min_p > 0 else float("-inf")
        return kernel.sample_tokens(
            rows_view(logits), keys.contiguous(), inv_temperature, top_k, float(top_p), log_min_p,
            bool(with_truncated),
        )
    return sample_tokens_reference(
        logits, keys, inv_temperature, top_k, float(top_p), float(min_p), bool(with_truncated)
    )
