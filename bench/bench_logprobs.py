"""Benchmark: per-token log-probs from a logits matrix, forward + backward.

Every candidate computes ``logp[i] = log_softmax(logits[i])[targets[i]]`` from the same
``[N, V]`` bf16 logits, then backpropagates ``sum(g * logp)`` (``g`` a fixed random ``[N]``)
into the logits:

- ``rftengine``: ``rftengine.ops.token_logprobs`` (Triton on CUDA, the chunked torch reference
  elsewhere);
- ``naive fp32``: ``logits.float().log_softmax(-1)`` then ``gather``;
- ``row-chunked``: a Python loop over chunks of ``--chunk-rows`` rows (one sequence at a time),
  ``log_softmax`` of each chunk in the logits dtype, ``gather``, concatenated: the approach TRL
  takes for bf16 logits;
- ``liger``: ``LigerCrossEntropyLoss(reduction="none")`` (which returns -logp), only when
  ``liger_kernel`` imports.

Bandwidth floor. A forward and a separate backward must at least read the logits once each and
write the gradient (same shape and dtype as the logits) once:

    floor_bytes = 3 * N * V * itemsize(logits)
    floor_ms    = floor_bytes / copy_ceiling

where ``copy_ceiling`` is the device copy rate measured in the same run by ``harness.ceilings``
(bytes read + written per second). Per-row traffic (targets, g, logp: O(N)) is left out.
``x_floor = ms / floor_ms``.

Columns: ``ms`` (median fwd+bwd), ``peak_gib`` (memory allocated during one fwd+bwd beyond the
inputs; it includes the returned gradient, N * V * itemsize), ``floor_ms``, ``x_floor`` and
``logp_err``, the max |logp - float64 log_softmax| over the first rows: the accuracy each
candidate buys.
"""

from __future__ import annotations

import torch

from rftengine.bench import harness
from rftengine.ops import token_logprobs

FULL_SHAPES = [(8192, 128256), (16384, 151936)]  # Llama-3 and Qwen2.5 vocabularies
QUICK_SHAPES = [(64, 1000), (32, 4097)]
ACCURACY_ROWS = 256


def rftengine_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return token_logprobs(logits, targets)


def naive_fp32_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def row_chunked_logprobs(chunk_rows: int):
    def run(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        parts = [
            x.log_softmax(-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
            for x, t in zip(logits.split(chunk_rows), targets.split(chunk_rows))
        ]
        return torch.cat(parts)

    return run


def liger_logprobs():
    """Liger's cross-entropy with reduction='none' is -logp; None when liger_kernel is absent.

    It writes the gradient into its input during the forward, so it gets its own logits copy.
    """
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception:  # optional anchor: absent or broken installs are left out of the table
        return None
    loss = LigerCrossEntropyLoss(reduction="none")
    return lambda logits, targets: -loss(logits, targets)


def fwd_bwd(fn, logits: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor):
    def step():
        logits.grad = None
        (fn(logits, targets).float() * grad).sum().backward()

    return step


def logp_error(fn, logits: torch.Tensor, targets: torch.Tensor) -> float:
    rows = min(ACCURACY_ROWS, logits.shape[0])
    x, t = logits[:rows].detach().clone().requires_grad_(), targets[:rows]
    ref = x.detach().double().log_softmax(-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    return (fn(x, t).detach().double() - ref).abs().max().item()


def bench_shape(n_rows: int, vocab: int, args, copy_gbps: float, results: harness.Results) -> None:
    device = torch.device(args.device)
    shape = {"shape": f"{n_rows}x{vocab}", "dtype": "bfloat16"}

    def inputs():
        logits = (torch.randn(n_rows, vocab, device=device) * 2).to(torch.bfloat16).requires_grad_()
        return logits, torch.randint(0, vocab, (n_rows,), device=device), torch.randn(n_rows, device=device)

    try:
        logits, targets, grad = inputs()
    except Exception as err:  # noqa: BLE001  e.g. out of memory: this shape's row says so, the rest runs
        results.add(harness.error_row("inputs", err, **shape))
        return
    floor_ms = 3 * logits.numel() * logits.element_size() / (copy_gbps * 1e9) * 1e3
    candidates = [
        ("rftengine", rftengine_logprobs),
        ("naive fp32 log_softmax+gather", naive_fp32_logprobs),
        (f"row-chunked log_softmax ({args.chunk_rows} rows, TRL-style)",
         row_chunked_logprobs(args.chunk_rows)),
    ]
    liger = liger_logprobs()
    if liger is not None:
        candidates.append(("liger cross_entropy(reduction='none')", liger))

    extra = {**shape, "floor_ms": floor_ms}

    def candidate_row(name, fn):
        # its own logits copy (liger), the accuracy column and the timing: any failure is this row's
        own = logits.detach().clone().requires_grad_() if fn is liger else logits
        err = logp_error(fn, own, targets)
        row = harness.measure(name, fwd_bwd(fn, own, targets, grad), device, args.warmup, args.repeat,
                              **extra, logp_err=err)
        row["x_floor"] = row["ms"] / floor_ms if row["ms"] is not None else None
        return row

    for name, fn in candidates:
        results.add(*harness.attempt(name, lambda: candidate_row(name, fn), **extra))
        logits.grad = None


def main(argv: list[str] | None = None) -> dict:
    parser = harness.base_parser("token_logprobs forward + backward beside plain-torch and chunked anchors")
    parser.add_argument("--chunk-rows", type=int, default=1024,
                        help="rows per chunk of the row-chunked anchor")
    args = parser.parse_args(argv)
    if args.chunk_rows < 1:
        parser.error(f"--chunk-rows must be >= 1, got {args.chunk_rows}")
    ceiling = harness.ceilings(args.device, quick=args.quick)
    columns = ["shape", "name", "ms", "peak_gib", "floor_ms", "x_floor", "logp_err", "error"]
    suite = "token_logprobs fwd+bwd (bf16 logits)"
    results = harness.Results(suite, columns, args.device, ceiling, args.out)
    for n_rows, vocab in QUICK_SHAPES if args.quick else FULL_SHAPES:
        bench_shape(n_rows, vocab, args, ceiling["copy_gbps"], results)
    return results.report()


if __name__ == "__main__":
    main()
