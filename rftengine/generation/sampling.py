"""Sampling from one decode step's logits: temperature, top-k/top-p truncation, exponential race.

Everything here is a pure function of device tensors with static shapes and no host sync, so
the rollout loop can capture it in a CUDA graph together with the model forward. The race's
noise is counter-based (a hash of seed, sequence index, decode step and token id), so a row's
draw depends on its own logits and key only, not on the rows beside it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rftengine.ops import token_logprobs


class SamplingParams(NamedTuple):
    """How one rollout samples. Hashable: the CUDA graphs are captured per value.

    temperature: > 0; logits are divided by it before anything else (and before the log-prob).
    top_k: keep the k highest logits per row; 0 keeps the whole vocabulary.
    top_p: keep the smallest set of highest-probability tokens whose mass reaches top_p
        (computed after top-k); 1.0 keeps everything.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> SamplingParams:
        t, k, p = self
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(
                f"temperature must be a number > 0 (use top_k=1 for greedy decoding), got {t!r}"
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = no top-k), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1 = no top-p), got {p!r}")
        return SamplingParams(float(t), int(k), float(p))

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


def truncate_logits(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the logits outside the top-k / top-p set of each row.

    Args:
        z: ``[N, V]`` float32 temperature-scaled logits.
        top_k: keep the k largest per row (0 or >= V: all).
        top_p: then keep the smallest prefix of the sorted, renormalised distribution whose mass
            reaches top_p (the token that crosses top_p is kept; at least one token always is).

    Returns:
        ``[N, V]`` float32: ``z`` where kept, ``-inf`` elsewhere. The set is defined by a per-row
        cut value (``z >= cut`` is kept), so tokens tied with the last kept one are kept too.
    """
    vocab = z.shape[-1]
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
    depends on its key only, never on the other rows or on ``N``.

    Cost: about 10 elementwise int64 passes over ``[N, V]`` (the int64 ``[N, V]`` buffer is
    reused in place) plus one float32 ``log``: on CPU less than half the time of the
    ``exponential_`` it replaces (numbers in the Generator docstring). A fused Triton pass would
    draw it in registers.
    """
    counters = torch.arange(1, vocab + 1, dtype=torch.int64, device=keys.device).mul_(_GOLDEN)
    x = keys[:, None] + counters
    x = _xorshift(_xorshift(x, 30).mul_(_MIX1), 27).mul_(_MIX2)
    # top 23 bits as a signed integer in [-2^22, 2^22)
    u = x.bitwise_right_shift_(64 - _UNIFORM_BITS).float()
    return u.add_(2.0 ** (_UNIFORM_BITS - 1) + 0.5).mul_(2.0**-_UNIFORM_BITS).log_()


def exponential_race(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One draw per row from ``probs`` ``[N, V]``: ``argmax_v p_v / E_v`` with ``E_v ~ Exp(1)``.

    The index of the smallest ``E_v / p_v`` (the first of V exponential clocks with rates p_v to
    ring) is distributed as ``p``. ``E_v = -log u_v`` with ``u`` from ``log_uniform_noise(keys)``
    (``keys`` ``[N]`` int64, from ``noise_keys``): row n's draw depends on ``probs[n]`` and
    ``keys[n]`` alone. No host sync (unlike ``torch.multinomial``), so it can live inside a CUDA
    graph. ``probs`` is overwritten.
    """
    # p / E = -p / log u: the largest p / E is the smallest p / log u (log u < 0, never 0).
    # A masked token (p = 0) scores -0.0, above every kept token's negative score.
    return probs.div_(log_uniform_noise(keys, probs.shape[-1])).argmin(dim=-1)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    keys: torch.Tensor,
    with_truncated: bool = False,
):
    """Draw one token per row and score it.

    Args:
        logits: ``[N, V]`` raw logits of one decode step, in the model dtype.
        params: validated SamplingParams.
        keys: ``[N]`` int64 noise keys (``noise_keys``): row n's draw is a function of
            ``logits[n]`` and ``keys[n]`` only. Greedy decoding (``top_k=1``) draws no noise.
        with_truncated: also return the log-prob under the truncated top-k/top-p distribution.

    Returns:
        ``(tokens [N] int64, logp [N] float32, truncated_logp [N] float32 or None)`` where
        ``logp = log softmax(logits / T)[token]`` over the full vocabulary, computed by
        ``rftengine.ops.token_logprobs``, the kernel the trainer uses on the same logits, and
        ``truncated_logp = log softmax(truncate(logits / T))[token]``.
    """
    z = logits.float() / params.temperature
    if params.top_k == 1:
        # greedy: the first of the largest logits, no noise drawn
        tokens = z.argmax(dim=-1)
        z_kept = truncate_logits(z, 1, 1.0) if with_truncated else z
    else:
        z_kept = truncate_logits(z, params.top_k, params.top_p)
        tokens = exponential_race(torch.softmax(z_kept, dim=-1), keys)
    logp = token_logprobs(logits, tokens, temperature=params.temperature)
    truncated = None
    if with_truncated:
        truncated = z_kept.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(z_kept, dim=-1)
    return tokens, logp, truncated
