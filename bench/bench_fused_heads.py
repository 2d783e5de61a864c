"""Fused PPO / DPO heads against linear_token_logprobs alone and against the composition.

At the anchor shapes of bench/README.md ("Anchor figures" §1) (N tokens as B sequences of 1024), forward + backward:
- ``linear_token_logprobs``: the lm_head log-probs alone, backward of ``sum(logp * g)``;
- ``fused_ppo_loss`` (k3 KL in the loss, entropy bonus) and the same loss composed from
  ``linear_token_logprobs`` + the standalone ops;
- ``fused_dpo_loss`` (sigmoid, precomputed reference log-probs; rows = B/2 pairs) and its
  composition.
``x_linear`` = ms / the ms of ``linear_token_logprobs`` alone at that shape (the issue's target
for the fused heads is <= 1.1); ``x_floor``, ``peak_gib`` and ``extra_gib`` as in
bench_linear_logprobs. When liger-kernel is importable, its ``LigerFusedLinearGRPOLoss``
(token-mean 'bnpo', k3 KL against precomputed reference log-probs) and
``LigerFusedLinearDPOLoss`` (sigmoid; run without a reference model, the policy-side work the
precomputed-reference rftengine head does) are timed on the same inputs.
"""

from __future__ import annotations

import torch

from rftengine.bench.bench_linear_logprobs import (
    ANCHOR_SHAPES,
    QUICK_SHAPES,
    add_floor_ratios,
    gradient_gib,
    lm_head_case,
    matmul_floor_ms,
)
from rftengine.bench.harness import Results, base_parser, ceilings, error_row, measure
from rftengine.ops.fused_dpo_head import dpo_composite_loss, fused_dpo_loss
from rftengine.ops.fused_ppo_head import fused_ppo_loss, ppo_composite_loss
from rftengine.ops.linear_logprobs import linear_token_logprobs

SEQ_LEN = 1024
QUICK_SEQ_LEN = 64
PPO_OPTIONS = dict(kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)


def _grad(loss, params):
    return torch.autograd.grad(loss, params)


def make_steps(h, w, t, g, old, ref, adv, ref_seq):
    params = (h, w)
    composite_ppo = dict(
        kl_clamp=20.0, clip_range=0.2, clip_range_high=0.2, dual_clip=None, aggregation="token_mean",
        loss_constant=None, is_weights=None, **PPO_OPTIONS,
    )

    def linear():
        return torch.autograd.grad(linear_token_logprobs(h, w, t), params, grad_outputs=g)

    def ppo_fused():
        return _grad(fused_ppo_loss(h, w, t, old, adv, mask=None, ref_logp=ref, **PPO_OPTIONS)[0], params)

    def ppo_composed():
        logp, ent = linear_token_logprobs(h, w, t, return_entropy=True)
        return _grad(ppo_composite_loss(logp, ent, old, adv, None, ref_logp=ref, **composite_ppo)[0], params)

    def dpo_fused():
        return _grad(fused_dpo_loss(h, w, t, mask=None, ref_logps=ref_seq, beta=0.1)[0], params)

    def dpo_composed():
        logp = linear_token_logprobs(h, w, t)
        loss, _ = dpo_composite_loss(logp, None, ref_seq, beta=0.1, loss_type="sigmoid",
                                     label_smoothing=0.0, simpo_gamma=0.0, length_normalized=False)
        return _grad(loss, params)

    return [
        ("linear_token_logprobs", linear),
        *liger_steps(h, w, t, old, ref, adv),
        ("fused_ppo_loss", ppo_fused),
        ("linear + ppo ops", ppo_composed),
        ("fused_dpo_loss", dpo_fused),
        ("linear + dpo ops", dpo_composed),
    ]


def liger_steps(h, w, t, old, ref, adv):
    """Liger's fused-linear GRPO and DPO losses on the same work, when liger-kernel imports."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearGRPOLoss
    except Exception:  # optional anchor: absent or broken installs are left out of the table
        return []
    params = (h, w)
    ones = torch.ones_like(t)
    try:
        grpo = LigerFusedLinearGRPOLoss(
            beta=PPO_OPTIONS["kl_coef"], use_ref_model=True, loss_type="bnpo", temperature=1.0
        )
        dpo = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False)
    except TypeError as err:  # the constructor changed between liger releases
        print(f"note: liger-kernel's fused losses skipped ({err})")
        return []

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def grpo_step():
        out = grpo(h, w, t, ones, adv, ref_per_token_logps=ref, old_per_token_logps=old)
        return _grad(first(out), params)

    def dpo_step():
        return _grad(first(dpo(w, h, t)), params)

    return [("liger fused GRPO", grpo_step), ("liger fused DPO", dpo_step)]


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = QUICK_SHAPES if args.quick else ANCHOR_SHAPES
    seq_len = QUICK_SEQ_LEN if args.quick else SEQ_LEN
    warmup, repeat = (1, 3) if args.quick else (args.warmup, args.repeat)
    ceiling = ceilings(device, quick=args.quick)
    columns = ["shape", "name", "ms", "x_linear", "x_floor", "peak_gib", "extra_gib", "error"]
    results = Results("fused_heads", columns, device, ceiling, args.out)
    for n, hidden, vocab in shapes:
        batch = n // seq_len
        shape = f"{batch}x{seq_len}x{hidden}x{vocab}"
        try:
            h, w, t, g = lm_head_case((batch, seq_len), hidden, vocab, device, dtype)
            with torch.no_grad():
                current = linear_token_logprobs(h, w, t)
            old = current + 0.1 * torch.randn_like(current)
            ref = current + 0.1 * torch.randn_like(current)
            adv = torch.randn(batch, device=device)
            steps = make_steps(h, w, t, g, old, ref, adv, ref.sum(-1))
        except Exception as err:  # noqa: BLE001  inputs or an anchor's setup: this shape's row says so
            results.add(error_row("inputs", err, shape=shape))
            continue
        floor_ms, grad_gib = matmul_floor_ms(n, hidden, vocab, ceiling), gradient_gib(h, w)
        baseline = None
        for name, step in steps:
            row = measure(name, step, device, warmup, repeat, shape=shape, floor_ms=floor_ms)
            if name == "linear_token_logprobs":
                baseline = row["ms"]
            if row["ms"] is not None:
                row["x_linear"] = row["ms"] / baseline if baseline else None
            results.add(add_floor_ratios(row, floor_ms, grad_gib))
        del h, w, t, g, current, old, ref, adv, steps
    return results.report()


if __name__ == "__main__":
    main()
