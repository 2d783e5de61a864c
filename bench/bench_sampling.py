"""Benchmark: one decode step's sampling alone, the fused kernel beside the torch reference.

Each candidate draws one token per row from ``[B, V]`` bf16 logits and returns its full and
truncated log-probs (``with_truncated=True``, as a PPO rollout asks), for five settings:
greedy (``top_k=1``), ``T=1`` (no truncation), ``top_p=0.9``, ``top_k=50``, ``min_p=0.05``:

- ``rftengine``: ``rftengine.ops.sample_tokens`` (the Triton kernel on CUDA: a few passes over
  each row, no sort, no ``[B, V]`` temporaries; the torch reference elsewhere);
- ``torch reference``: ``rftengine.ops.sampling.sample_tokens_reference``, the sampler the
  Generator used before the kernel: fp32 scaled logits, a sort or top-k, softmax, full-vocabulary
  counter-based noise, ``token_logprobs``.

Two kinds of logits: ``zipf`` (``z_v = -1.1 log(rank_v) + 0.5 * N(0, 1)``, ranks shuffled per
row: the heavy-tailed shape of a language model's next-token distribution, where top-p keeps
a few hundred tokens) and ``normal`` (``2 * N(0, 1)``: a flat worst case where top-p keeps
most of the vocabulary and no block can be skipped).

Bandwidth floor: one read of the logits, ``floor_ms = B * V * 2 bytes / (copy_gbps / 2)``
(``copy_gbps`` counts bytes read plus written). ``x_floor = ms / floor_ms``. The issue's target
is ``ms <= 0.1`` at B=64, V=151936 on a GPU. ``same_tokens``: the fraction of rows whose token
equals the torch reference's for the same noise keys (1.0 expected: see rftengine.ops.sampling).
"""

from __future__ import annotations

import torch

from rftengine.bench import harness
from rftengine.ops import sample_tokens
from rftengine.ops.sampling import float32, noise_keys, sample_tokens_reference

FULL_SHAPES = [(64, 151936)]  # the issue's shape: batch 64, Qwen2.5's vocabulary
QUICK_SHAPES = [(5, 1000)]
MODES = {
    "greedy": dict(top_k=1),
    "T=1": dict(),
    "top_p=0.9": dict(top_p=0.9),
    "top_k=50": dict(top_k=50),
    "min_p=0.05": dict(min_p=0.05),
}
TARGET_MS = 0.1


def make_logits(kind: str, n_rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    if kind == "zipf":
        ranks = torch.rand(n_rows, vocab, device=device).argsort(-1).float() + 1
        z = -1.1 * ranks.log() + 0.5 * torch.randn(n_rows, vocab, device=device)
    else:
        z = 2 * torch.randn(n_rows, vocab, device=device)
    return z.to(torch.bfloat16)


def reference(logits, keys, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, with_truncated=True):
    top_k = 0 if top_k >= logits.shape[-1] else top_k
    return sample_tokens_reference(logits, keys, float32(1.0 / temperature), top_k, top_p, min_p, with_truncated)


def bench_shape(n_rows: int, vocab: int, kind: str, args, copy_gbps: float, results: harness.Results) -> None:
    device = torch.device(args.device)
    shape = {"shape": f"{n_rows}x{vocab}", "logits": kind}
    try:
        logits = make_logits(kind, n_rows, vocab, device)
        keys = noise_keys(torch.tensor([1234], device=device), torch.arange(n_rows, device=device),
                          torch.tensor([7], device=device))
    except Exception as err:  # noqa: BLE001  e.g. out of memory: this shape's row says so, the rest runs
        results.add(harness.error_row("inputs", err, **shape))
        return
    floor_ms = logits.numel() * logits.element_size() / (copy_gbps / 2 * 1e9) * 1e3
    for mode, params in MODES.items():
        extra = {**shape, "mode": mode, "floor_ms": floor_ms}
        expected = None
        for name, fn in (("rftengine", sample_tokens), ("torch reference", reference)):
            def row(name=name, fn=fn):
                nonlocal expected
                tokens = fn(logits, keys, with_truncated=True, **params)[0]
                if expected is None:
                    expected = reference(logits, keys, **params)[0]
                out = harness.measure(name, lambda: fn(logits, keys, with_truncated=True, **params), device,
                                      args.warmup, args.repeat, **extra)
                out["same_tokens"] = (tokens == expected).float().mean().item()
                if out["ms"] is not None:
                    out["x_floor"] = out["ms"] / floor_ms
                    out["target_met"] = out["ms"] <= TARGET_MS
                return out

            results.add(*harness.attempt(name, row, **extra))


def main(argv: list[str] | None = None) -> dict:
    parser = harness.base_parser("one decode step's sampling: the fused Triton kernel beside the torch reference")
    parser.add_argument("--logits", nargs="+", choices=["zipf", "normal"], default=["zipf", "normal"],
                        help="which logits to sample from (see the module docstring)")
    args = parser.parse_args(argv)
    ceiling = harness.ceilings(args.device, quick=args.quick)
    columns = ["shape", "logits", "mode", "name", "ms", "floor_ms", "x_floor", "target_met", "same_tokens",
               "peak_gib", "error"]
    results = harness.Results("sample_tokens (bf16 logits, with truncated log-probs)", columns, args.device,
                              ceiling, args.out)
    for n_rows, vocab in QUICK_SHAPES if args.quick else FULL_SHAPES:
        for kind in args.logits:
            bench_shape(n_rows, vocab, kind, args, ceiling["copy_gbps"], results)
    return results.report()


if __name__ == "__main__":
    main()
