"""Alignment losses, standalone ops: KL penalty, PPO policy/value losses, GAE, whitening,
sequence log-probs, and the per-pair DPO / Bradley-Terry / group-advantage ops.

Token ops run on [64, 4096] bf16 tokens (``--quick``: [4, 64] on CPU), forward + backward
(GAE: forward only, the way trainers use it), against the same formulas in eager torch and
under ``torch.compile`` (left out on CPU with ``--quick``: compiling takes longer than the
smoke run). Columns: median ms, ``GB/s`` = the bytes the step must move at least (inputs read
once per pass, outputs written once; listed per op in ``TOKEN_BYTES``) / time, and
``frac_copy`` = that rate over the device copy bandwidth measured in this run (goal >= 0.8).
A tensor copy of 16 bytes per token is timed beside them: at this size launch latency, not
bandwidth, bounds every candidate. Per-pair ops ([B] = 64 * 64 values, 4 * 64 with ``--quick``)
report ms only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rftengine.bench.harness import Results, attempt, base_parser, ceilings, error_row, measure
from rftengine.ops.advantages import gae, group_advantages, whiten
from rftengine.ops.kl import kl_penalty
from rftengine.ops.ppo import ppo_policy_loss, value_loss
from rftengine.ops.preference import bradley_terry_loss, dpo_loss
from rftengine.ops.sequence import sequence_logprobs

SHAPE = (64, 4096)
QUICK_SHAPE = (4, 64)
GROUP_SIZE = 8

# minimum bytes per token of one step, with bf16 tokens, a bool mask, fp32 outputs/upstream
# gradients and bf16 input gradients: forward reads + writes, then backward reads + writes
TOKEN_BYTES = {
    "kl_penalty k3": (2 + 2 + 1 + 4) + (2 + 2 + 1 + 4 + 2),
    "ppo_policy_loss": (2 + 2 + 2 + 1) + (2 + 2 + 2 + 1 + 2),
    "value_loss": (2 + 2 + 2 + 1) + (2 + 2 + 2 + 1 + 2),
    "gae (forward)": 2 + 2 + 1 + 4 + 4,
    "whiten": (2 + 1 + 4) + (2 + 1 + 4 + 2),
    "sequence_logprobs": (2 + 1) + (1 + 2),
}


# ---------------------------------------------------------------- eager formulas (baselines)


def eager_kl(logp, ref, mask):
    r = (ref.float() - logp.float()).clamp(-20, 20)
    return (torch.exp(r) - r - 1) * mask


def eager_ppo(logp, old, adv, mask):
    ratio = torch.exp((logp.float() - old.float()).clamp(-20, 20))
    a = adv.float()
    loss = torch.max(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    m = mask.float()
    return (loss * m).sum() / m.sum().clamp(min=1)


def eager_value(v, old, ret, mask):
    v, old, ret = v.float(), old.float(), ret.float()
    loss = 0.5 * torch.max((v - ret) ** 2, (torch.clamp(v, old - 0.2, old + 0.2) - ret) ** 2)
    m = mask.float()
    return (loss * m).sum() / m.sum().clamp(min=1)


def eager_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """The reverse Python loop trainers write (right padding: mask zeroes the tail)."""
    r, v, m = rewards.float() * mask, values.float() * mask, mask.float()
    adv = torch.zeros_like(r)
    last = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        next_v = v[:, t + 1] if t + 1 < r.shape[1] else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, adv + v


def eager_whiten(x, mask):
    m = mask.float()
    xf = x.float()
    n = m.sum()
    mean = (xf * m).sum() / n
    var = (((xf - mean) * m) ** 2).sum() / (n - 1)
    return (xf - mean) * torch.rsqrt(var + 1e-8) * m


def eager_seq(x, mask):
    return (x.float() * mask).sum(-1)


def eager_dpo(pc, pr, rc, rr):
    return -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()


def eager_bt(rc, rr):
    return -F.logsigmoid(rc - rr).mean()


def eager_group(scores):
    s = scores.view(-1, GROUP_SIZE)
    return ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)).reshape(-1)


# ---------------------------------------------------------------- candidates


def _token_ops(b: int, t: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return (scale * torch.randn(*shape, generator=g) + shift).to(device=device, dtype=dtype)

    logp = (-rand(b, t).abs()).requires_grad_()
    old = logp.detach() + rand(b, t, scale=0.3)
    adv = rand(b, t)
    lengths = torch.randint(t // 2, t + 1, (b, 1), generator=g).to(device)
    mask = torch.arange(t, device=device)[None, :] < lengths  # right padding
    values = rand(b, t).requires_grad_()
    returns = rand(b, t)
    upstream = torch.randn(b, t, generator=g).to(device)

    def grad_step(forward, inputs, out_grad=None):
        def step():
            out = forward()
            if isinstance(out, tuple):
                out = out[0]
            return torch.autograd.grad(out, inputs, grad_outputs=out_grad)
        return step

    ops = {
        "kl_penalty k3": (
            lambda: grad_step(lambda: kl_penalty(logp, old, estimator="k3", mask=mask), logp, upstream),
            lambda fn: grad_step(lambda: fn(logp, old, mask), logp, upstream),
            eager_kl,
        ),
        "ppo_policy_loss": (
            lambda: grad_step(lambda: ppo_policy_loss(logp, old, adv, mask=mask), logp),
            lambda fn: grad_step(lambda: fn(logp, old, adv, mask), logp),
            eager_ppo,
        ),
        "value_loss": (
            lambda: grad_step(lambda: value_loss(values, old, returns, mask=mask), values),
            lambda fn: grad_step(lambda: fn(values, old, returns, mask), values),
            eager_value,
        ),
        "gae (forward)": (
            lambda: (lambda: gae(adv, returns, mask=mask)),
            lambda fn: (lambda: fn(adv, returns, mask)),
            eager_gae,
        ),
        "whiten": (
            lambda: grad_step(lambda: whiten(logp, mask=mask), logp, upstream),
            lambda fn: grad_step(lambda: fn(logp, mask), logp, upstream),
            eager_whiten,
        ),
        "sequence_logprobs": (
            lambda: grad_step(lambda: sequence_logprobs(logp, mask=mask), logp, upstream[:, 0].contiguous()),
            lambda fn: grad_step(lambda: fn(logp, mask), logp, upstream[:, 0].contiguous()),
            eager_seq,
        ),
    }
    return ops


def _pair_ops(n: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(1)
    pc, pr, rc, rr = (
        (-50 * torch.rand(n, generator=g)).to(device=device, dtype=dtype).requires_grad_() for _ in range(4)
    )
    scores = torch.randn(n, generator=g).to(device=device, dtype=dtype).requires_grad_()

    def grad_step(forward, inputs):
        def step():
            out = forward()
            out = out[0] if isinstance(out, tuple) else out
            return torch.autograd.grad(out.float().sum(), inputs)
        return step

    return {
        "dpo_loss sigmoid": (
            lambda: grad_step(lambda: dpo_loss(pc, pr, rc, rr), (pc, pr)),
            lambda fn: grad_step(lambda: fn(pc, pr, rc, rr), (pc, pr)),
            eager_dpo,
        ),
        "bradley_terry_loss": (
            lambda: grad_step(lambda: bradley_terry_loss(pc, pr), (pc, pr)),
            lambda fn: grad_step(lambda: fn(pc, pr), (pc, pr)),
            eager_bt,
        ),
        f"group_advantages G={GROUP_SIZE}": (
            lambda: grad_step(lambda: group_advantages(scores, GROUP_SIZE), scores),
            lambda fn: grad_step(lambda: fn(scores), scores),
            eager_group,
        ),
    }


def standalone_rows(args, device: torch.device, ceiling: dict, results: Results) -> None:
    """Rows for every standalone op: rftengine, eager torch, torch.compile (not on CPU --quick)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, t = QUICK_SHAPE if args.quick else SHAPE
    warmup, repeat = (1, 3) if args.quick else (args.warmup, args.repeat)
    use_compile = not (args.quick and device.type != "cuda")
    n_pairs = b * 64

    def add(label, op, name, make_step, n_bytes):
        def row():
            r = measure(name, make_step(), device, warmup, repeat, op=op, shape=label)
            if r["ms"] is not None and n_bytes:
                r["GB/s"] = n_bytes / (r["ms"] * 1e-3) / 1e9
                r["frac_copy"] = r["GB/s"] / ceiling["copy_gbps"]
            return r

        results.add(*attempt(name, row, op=op, shape=label))

    copy_src = torch.empty(b * t * 8, device=device, dtype=torch.bfloat16)
    copy_dst = torch.empty_like(copy_src)
    add(f"{b}x{t}", "copy 16 B/token", "torch copy_", lambda: lambda: copy_dst.copy_(copy_src), b * t * 16)

    groups = [
        (f"{b}x{t}", lambda: _token_ops(b, t, device, dtype), lambda op: TOKEN_BYTES[op] * b * t),
        (f"{n_pairs} pairs", lambda: _pair_ops(n_pairs, device, dtype), lambda op: 0),
    ]
    for label, make_ops, n_bytes in groups:
        try:
            ops = make_ops()
        except Exception as err:  # noqa: BLE001  inputs of this group: its row says so, the rest runs
            results.add(error_row("inputs", err, shape=label))
            continue
        for op, (ours, theirs, eager_fn) in ops.items():
            add(label, op, "rftengine", ours, n_bytes(op))
            add(label, op, "eager torch", lambda: theirs(eager_fn), n_bytes(op))
            if use_compile and not op.startswith("gae"):  # a 4096-step Python loop unrolls: not compiled
                add(label, op, "torch.compile", lambda: theirs(torch.compile(eager_fn, dynamic=False)), n_bytes(op))


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    ceiling = ceilings(device, quick=args.quick)
    columns = ["shape", "op", "name", "ms", "GB/s", "frac_copy", "peak_gib", "error"]
    results = Results("losses", columns, device, ceiling, args.out)
    standalone_rows(args, device, ceiling, results)
    return results.report()


if __name__ == "__main__":
    main()
