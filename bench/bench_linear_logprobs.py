"""Per-token log-probs from hidden states + lm_head, forward + backward
(bench/README.md, "Anchor figures" §1).

Work: ``logp[i] = log_softmax(h[i] @ W.T)[t[i]]``, then the backward of ``sum(logp * g)`` into
h and W. Candidates:
- rftengine `linear_token_logprobs`;
- naive torch: the whole [N, V] logits, upcast to fp32 for the log-softmax;
- TRL-style: the whole logits in the input dtype, log-softmax in fp32 one 1024-row block at a
  time (the loop of TRL's `selective_log_softmax`);
- torch.compile of (matmul + fp32 log-softmax + gather) applied to 2048-token chunks;
- Liger `LigerFusedLinearCrossEntropyLoss(reduction='none')` when importable (logp = -loss);
  Liger folds the upstream gradient in as a scalar, so it is given g = 1.

Columns: median ms, ``x_floor`` = ms / floor with floor = 6·N·H·V FLOPs at the bf16 matmul
rate measured in this run, ``peak_gib`` = peak memory over the inputs during one step, and
``extra_gib`` = that peak less the gradients every candidate returns (dh and dW), the figure
the anchor table (bench/README.md, "Anchor figures" §1) reports.
"""

from __future__ import annotations

import torch

from rftengine.bench.harness import GIB, Results, base_parser, ceilings, error_row, measure
from rftengine.ops.linear_logprobs import linear_token_logprobs

ANCHOR_SHAPES = [(8192, 4096, 128256), (16384, 896, 151936), (32768, 4096, 128256)]
QUICK_SHAPES = [(512, 64, 1000), (384, 48, 3001)]
TRL_BLOCK_ROWS = 1024
COMPILE_CHUNK = 2048


def naive_logp(h, w, t):
    logits = (h @ w.t()).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def trl_logp(h, w, t):
    logits = h @ w.t()
    out = []
    for start in range(0, logits.shape[0], TRL_BLOCK_ROWS):
        block = logits[start:start + TRL_BLOCK_ROWS].float()
        out.append(torch.log_softmax(block, dim=-1).gather(-1, t[start:start + TRL_BLOCK_ROWS, None]).squeeze(-1))
    return torch.cat(out)


def _chunk_logp(h, w, t):
    return torch.log_softmax((h @ w.t()).float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def compiled_logp_factory():
    compiled = torch.compile(_chunk_logp, dynamic=False)

    def logp(h, w, t):
        return torch.cat([
            compiled(h[s:s + COMPILE_CHUNK], w, t[s:s + COMPILE_CHUNK])
            for s in range(0, h.shape[0], COMPILE_CHUNK)
        ])

    return logp


def liger_logp_factory():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # optional anchor: absent or broken installs are left out of the table
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda h, w, t: -loss_fn(w, h, t)


def step_fn(logp_fn, h, w, t, g):
    def step():
        logp = logp_fn(h, w, t)
        return torch.autograd.grad(logp, (h, w), grad_outputs=g)

    return step


def candidates(quick: bool, device: torch.device):
    found = [
        ("rftengine", linear_token_logprobs, True),
        ("naive torch fp32", naive_logp, True),
        ("trl row-chunked", trl_logp, True),
    ]
    if not (quick and device.type != "cuda"):  # compiling on CPU takes longer than the smoke run
        found.append((f"torch.compile {COMPILE_CHUNK}-chunks", compiled_logp_factory(), True))
    liger = liger_logp_factory() if device.type == "cuda" else None
    if liger is not None:
        found.append(("liger fused linear CE", liger, False))
    return found


def lm_head_case(lead: tuple[int, ...], hidden: int, vocab: int, device, dtype):
    """Random (hidden [*lead, H], weight [V, H], targets [*lead], upstream grad [*lead]), seeded."""
    torch.manual_seed(0)
    h = torch.randn(*lead, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype) / hidden**0.5).requires_grad_()
    t = torch.randint(0, vocab, lead, device=device)
    g = torch.randn(lead, device=device)
    return h, w, t, g


def matmul_floor_ms(n: int, hidden: int, vocab: int, ceiling: dict) -> float:
    """6NHV FLOPs (logits, dh, dW) at the measured matmul rate."""
    return 6 * n * hidden * vocab / (ceiling["matmul_tflops"] * 1e12) * 1e3


def gradient_gib(h: torch.Tensor, w: torch.Tensor) -> float:
    """Memory of the gradients every candidate must return; extra_gib is peak minus this."""
    return (h.numel() + w.numel()) * h.element_size() / GIB


def add_floor_ratios(row: dict, floor_ms: float, grad_gib: float) -> dict:
    """Add ``x_floor`` (ms over the 6NHV matmul floor) and ``extra_gib`` (peak minus gradients)."""
    if row["ms"] is not None:
        row["x_floor"] = row["ms"] / floor_ms
    if row.get("peak_gib") is not None:
        row["extra_gib"] = row["peak_gib"] - grad_gib
    return row


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = QUICK_SHAPES if args.quick else ANCHOR_SHAPES
    warmup, repeat = (1, 3) if args.quick else (args.warmup, args.repeat)
    ceiling = ceilings(device, quick=args.quick)
    columns = ["shape", "name", "ms", "x_floor", "peak_gib", "extra_gib", "floor_ms", "error"]
    results = Results("linear_logprobs", columns, device, ceiling, args.out)
    for n, hidden, vocab in shapes:
        shape = f"{n}x{hidden}x{vocab}"
        try:
            h, w, t, g = lm_head_case((n,), hidden, vocab, device, dtype)
        except Exception as err:  # noqa: BLE001  out of memory: this shape's row says so, the rest runs
            results.add(error_row("inputs", err, shape=shape))
            continue
        floor_ms, grad_gib = matmul_floor_ms(n, hidden, vocab, ceiling), gradient_gib(h, w)
        for name, fn, any_upstream in candidates(args.quick, device):
            upstream = g if any_upstream else torch.ones_like(g)
            row = measure(name, step_fn(fn, h, w, t, upstream), device, warmup, repeat,
                          shape=shape, floor_ms=floor_ms)
            results.add(add_floor_ratios(row, floor_ms, grad_gib))
        del h, w, t, g
    return results.report()


if __name__ == "__main__":
    main()
