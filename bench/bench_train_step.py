"""End-to-end DPO and GRPO optimizer steps: rftengine's fused heads against a TRL-style loop.

Model: the bench/README.md "Anchor figures" §2 config (random-init Qwen2, ~494M parameters: hidden 896, 24
layers, 14 heads / 2 KV heads, intermediate 4864, vocab 151936, tied embeddings), fp32 master
weights, AdamW (fp32 states, fused on CUDA). Precision ``bf16-mixed`` by default on CUDA: the
decoder runs under bf16 autocast; ``fp32`` on CPU. Sequences of 1,024 tokens:
- DPO: 8 pairs (16 rows: chosen rows, then rejected rows), prompt 256 shared by a pair +
  response 768; sigmoid loss, beta 0.1, precomputed reference sequence log-probs;
- GRPO: 16 sequences, prompt 256 + response 768; clipped policy loss (eps 0.2), k3 KL in the
  loss (coefficient 0.04) against precomputed reference token log-probs, precomputed rollout
  (old) log-probs, one advantage per sequence, token-mean aggregation, no entropy bonus.
Every candidate runs the whole step: decoder forward, head and loss, backward, AdamW step.
- ``rftengine``: the decoder to its final hidden states (no logits), then `fused_dpo_loss` /
  `fused_ppo_loss` on bf16 operands (the hidden states and the lm_head weight cast to the
  compute dtype, fp32 accumulation and fp32 weight-gradient accumulation);
- ``trl-style``: the logits of every scored position (DPO: the whole sequence, as TRL's DPO
  trainer; GRPO: the response, as TRL's ``logits_to_keep``), computed under autocast like the
  HF lm_head, fp32 log-softmax + gather one 1024-row block at a time (TRL's
  ``selective_log_softmax``, bench_linear_logprobs' TRL-style candidate), then the same loss
  from rftengine's torch compositions (`dpo_composite_loss`, `ppo_composite_loss`: the math the
  fused heads are tested against);
- ``trl-style + torch.compile``: the same with the logits and log-softmax compiled over
  2048-token chunks (CUDA only: compiling takes longer than the CPU smoke run);
- ``liger fused-linear`` (CUDA, when liger-kernel imports): ``LigerFusedLinearGRPOLoss``
  ('bnpo' = token mean, k3 KL, the same loss) and ``LigerFusedLinearDPOLoss`` (no reference
  model: it takes a reference model's hidden states, not precomputed log-probs, and averages
  the log-probs over tokens, so its DPO loss is not ours and has no ``loss_err``).
Columns: ``ms`` per step (median), ``tokens_per_second`` (every token the decoder processes,
prompt included), ``peak_gib`` = the training state (weights, AdamW states) + ``step_gib``, the
step's peak above it (activations, gradients, logits); ``speedup`` and ``mem_ratio`` = the
TRL-style figure over the candidate's; on CUDA ``speed_2x`` / ``mem_3x`` say whether
rftengine meets the targets (at least 2x faster, at least 3x lower peak memory); ``loss_err``
= |first-step loss - the TRL-style first-step loss| (same weights, same inputs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch

from rftengine.bench.bench_generate import build_model
from rftengine.bench.bench_linear_logprobs import compiled_logp_factory, trl_logp
from rftengine.bench.harness import GIB, Results, attempt, base_parser, ceilings, error_row, measure
from rftengine.ops import fused_dpo_loss, fused_ppo_loss, linear_token_logprobs, sequence_logprobs
from rftengine.ops.fused_dpo_head import dpo_composite_loss
from rftengine.ops.fused_ppo_head import ppo_composite_loss

METHODS = ("dpo", "grpo")
BASELINE = "trl-style"
SPEEDUP_TARGET, MEMORY_TARGET = 2.0, 3.0
LEARNING_RATE = 1e-5
DPO_LOSS = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, simpo_gamma=0.0, length_normalized=False)
GRPO_LOSS = dict(
    kl_coef=0.04, kl_estimator="k3", kl_clamp=20.0, entropy_coef=0.0, clip_range=0.2, clip_range_high=0.2,
    dual_clip=None, aggregation="token_mean", loss_constant=None, is_weights=None,
)
COLUMNS = [
    "method", "name", "ms", "tokens_per_second", "peak_gib", "step_gib", "speedup", "mem_ratio",
    "speed_2x", "mem_3x", "loss_err", "error",
]


class Shape(NamedTuple):
    rows: int  # DPO: 2 x pairs
    prompt: int
    response: int


SHAPES = {"dpo": Shape(16, 256, 768), "grpo": Shape(16, 256, 768)}
QUICK_SHAPES = {"dpo": Shape(4, 8, 24), "grpo": Shape(4, 8, 24)}


class Batch(NamedTuple):
    """One optimizer step's inputs.

    input_ids ``[R, T]``; the head scores hidden positions ``start .. T-2`` against
    ``targets = input_ids[:, start + 1:]`` (``[R, L]``, L = T - 1 - start); ``mask`` ``[R, L]``
    bool (DPO: the response tokens) or None (GRPO scores the response only); ``consts``: the
    loss's constant inputs (DPO ``ref_logps`` [R]; GRPO ``old_logp``, ``ref_logp`` [R, L] and
    ``advantages`` [R]), fp32.
    """

    input_ids: torch.Tensor
    start: int
    targets: torch.Tensor
    mask: torch.Tensor | None
    consts: dict


# make_head(method, batch, compute_dtype) -> head(hidden [R, L, H], lm_head weight [V, H]) -> 0-d loss
HeadMaker = Callable[[str, Batch, torch.dtype], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


class Candidate(NamedTuple):
    name: str
    make_head: HeadMaker
    same_loss: tuple[str, ...]  # the methods whose loss is the TRL-style loss (a loss_err column)


def fused_head(method: str, batch: Batch, compute_dtype: torch.dtype):
    """rftengine's fused heads on operands in the compute dtype, with autocast off around the
    op: its fp32 accumulation and fp32 loss math stay fp32 (gradients flow back through the
    casts to the fp32 master weights)."""
    c = batch.consts

    def head(hidden, weight):
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            if method == "dpo":
                return fused_dpo_loss(h, w, batch.targets, mask=batch.mask, ref_logps=c["ref_logps"],
                                      fp32_weight_grad=True, **DPO_LOSS)[0]
            return fused_ppo_loss(h, w, batch.targets, c["old_logp"], c["advantages"], mask=None,
                                  ref_logp=c["ref_logp"], fp32_weight_grad=True, **GRPO_LOSS)[0]

    return head


def trl_style(logp_factory: Callable[[], Callable]) -> HeadMaker:
    """The TRL-style head with ``logp_factory()`` as its (logits, log-softmax, gather) function."""

    def make_head(method: str, batch: Batch, compute_dtype: torch.dtype):
        logp_fn, c = logp_factory(), batch.consts

        def token_logp(hidden, weight):
            # the logits matmul runs under the step's autocast, as the HF lm_head does
            flat = logp_fn(hidden.reshape(-1, hidden.shape[-1]), weight, batch.targets.reshape(-1))
            return flat.view(batch.targets.shape)

        if method == "dpo":
            return lambda h, w: dpo_composite_loss(token_logp(h, w), batch.mask, c["ref_logps"], **DPO_LOSS)[0]
        return lambda h, w: ppo_composite_loss(
            token_logp(h, w), None, c["old_logp"], c["advantages"], None, ref_logp=c["ref_logp"], **GRPO_LOSS,
        )[0]

    return make_head


def liger_head(method: str, batch: Batch, compute_dtype: torch.dtype):
    """Liger-Kernel's fused-linear losses; a changed constructor or forward fails this row only."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearGRPOLoss

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    c, cd = batch.consts, compute_dtype
    if method == "dpo":
        loss_fn = LigerFusedLinearDPOLoss(beta=DPO_LOSS["beta"], use_ref_model=False)
        targets = batch.targets.masked_fill(~batch.mask, -100)  # Liger's ignore_index
        return lambda h, w: first(loss_fn(w.to(cd), h.to(cd), targets))
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=GRPO_LOSS["kl_coef"], use_ref_model=True, loss_type="bnpo", epsilon_low=GRPO_LOSS["clip_range"],
        epsilon_high=GRPO_LOSS["clip_range_high"], temperature=1.0,
    )
    ones = torch.ones_like(batch.targets)
    return lambda h, w: first(loss_fn(
        h.to(cd), w.to(cd), batch.targets, ones, c["advantages"],
        ref_per_token_logps=c["ref_logp"], old_per_token_logps=c["old_logp"],
    ))


def _liger_importable() -> bool:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except Exception:  # optional anchor: absent or broken installs are left out of the table
        return False
    return True


def candidates(device: torch.device, quick: bool) -> list[Candidate]:
    found = [
        Candidate("rftengine", fused_head, METHODS),
        Candidate(BASELINE, trl_style(lambda: trl_logp), METHODS),
    ]
    if device.type == "cuda" and _liger_importable():
        found.append(Candidate("liger fused-linear", liger_head, ("grpo",)))
    if not (quick and device.type != "cuda"):  # compiling on CPU takes longer than the smoke run
        found.append(Candidate(f"{BASELINE} + torch.compile", trl_style(compiled_logp_factory), METHODS))
    return found


def decoder_hidden(model, batch: Batch) -> torch.Tensor:
    """Final hidden states ``[R, L, H]`` of the positions the head scores (no logits)."""
    return model.model(input_ids=batch.input_ids, use_cache=False).last_hidden_state[:, batch.start:-1]


def make_batch(method: str, shape: Shape, model, amp, compute_dtype: torch.dtype) -> Batch:
    """Random token ids and the loss constants, derived from the initial policy's log-probs
    (so the losses start where training does: DPO near log 2, PPO ratios near 1)."""
    weight = model.get_output_embeddings().weight
    device, vocab = weight.device, weight.shape[0]
    rows, prompt, response = shape
    torch.manual_seed(1)
    if method == "dpo":
        # rows i and pairs + i are one pair: the same prompt, two responses
        prompts = torch.randint(1, vocab, (rows // 2, prompt), device=device).repeat(2, 1)
        ids = torch.cat([prompts, torch.randint(1, vocab, (rows, response), device=device)], dim=1)
        start = 0
        # target t is token t + 1: a response token from t + 1 = prompt on
        mask = (torch.arange(1, ids.shape[1], device=device) >= prompt).repeat(rows, 1)
    else:
        ids = torch.randint(1, vocab, (rows, prompt + response), device=device)
        start, mask = prompt - 1, None
    batch = Batch(ids, start, ids[:, start + 1:].contiguous(), mask, {})
    with torch.no_grad():
        with amp():
            hidden = decoder_hidden(model, batch)
        logp = linear_token_logprobs(hidden.to(compute_dtype), weight.to(compute_dtype), batch.targets, mask=mask)
    if method == "dpo":
        batch.consts["ref_logps"] = sequence_logprobs(logp, mask=mask) + torch.randn(rows, device=device)
    else:
        batch.consts.update(
            old_logp=logp + 0.05 * torch.randn_like(logp),
            ref_logp=logp + 0.1 * torch.randn_like(logp),
            advantages=torch.randn(rows, device=device),
        )
    return batch


def make_step(model, optimizer, batch: Batch, head, amp) -> Callable[[], torch.Tensor]:
    weight = model.get_output_embeddings().weight

    def step():
        with amp():
            loss = head(decoder_hidden(model, batch), weight)
        loss.backward()
        optimizer.step()
        # gradients are freed here, not at the next step's start: between steps only the
        # training state is allocated, and step_gib is what one step adds to it
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def restore(model, initial: list[torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), initial):
            p.copy_(p0)


def state_gib(model, optimizer) -> float:
    """Weights and optimizer states, in GiB."""
    tensors = list(model.parameters()) + [
        t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    ]
    return sum(t.numel() * t.element_size() for t in tensors) / GIB


def candidate_row(cand: Candidate, method: str, batch: Batch, model, initial, args, amp, compute_dtype) -> dict:
    """Restore the initial weights, take one step (its loss is the row's ``loss``), then time
    the next ones. Anything raised here (a changed anchor API, out of memory) is this row's error."""
    device = torch.device(args.device)
    restore(model, initial)
    head = cand.make_head(method, batch, compute_dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=device.type == "cuda")
    step = make_step(model, optimizer, batch, head, amp)
    loss = float(step())  # also allocates the AdamW states, so the peak below is a steady-state step's
    state = state_gib(model, optimizer)
    tokens = batch.input_ids.numel()
    row = measure(cand.name, step, device, args.warmup, args.repeat, method=method)
    row.update(loss=loss, tokens=tokens, state_gib=state)
    if row["ms"] is not None:
        row["tokens_per_second"] = tokens / row["ms"] * 1e3
    if row["peak_gib"] is not None:
        row["step_gib"] = row["peak_gib"]
        row["peak_gib"] = state + row["step_gib"]
    return row


def add_ratios(rows: list[dict], same_loss: dict[str, tuple[str, ...]], cuda: bool) -> None:
    """speedup, mem_ratio and loss_err against the TRL-style row of the same method; the target
    flags on rftengine's rows (CUDA only: CPU figures are smoke)."""
    base = {r["method"]: r for r in rows if r["name"] == BASELINE}
    for row in rows:
        trl = base.get(row["method"])
        if trl is None:
            continue
        if row.get("ms") and trl.get("ms"):
            row["speedup"] = trl["ms"] / row["ms"]
        if row.get("peak_gib") and trl.get("peak_gib"):
            row["mem_ratio"] = trl["peak_gib"] / row["peak_gib"]
        if (row.get("loss") is not None and trl.get("loss") is not None
                and row["method"] in same_loss.get(row["name"], ())):
            row["loss_err"] = abs(row["loss"] - trl["loss"])
        if cuda and row["name"] == "rftengine":
            for key, ratio, target in (("speed_2x", "speedup", SPEEDUP_TARGET), ("mem_3x", "mem_ratio", MEMORY_TARGET)):
                if row.get(ratio) is not None:
                    row[key] = "met" if row[ratio] >= target else "not met"


def setting(model, args, shapes: dict[str, Shape]) -> dict:
    cfg = model.config
    per_method = {
        m: {**s._asdict(), "seq_len": s.prompt + s.response, "tokens_per_step": s.rows * (s.prompt + s.response)}
        for m, s in shapes.items()
    }
    per_method["dpo"]["pairs"] = shapes["dpo"].rows // 2
    per_method["dpo"]["loss"] = {**DPO_LOSS, "reference": "precomputed sequence log-probs"}
    per_method["grpo"]["loss"] = {**GRPO_LOSS, "reference": "precomputed token log-probs",
                                  "advantages": "one per sequence"}
    return {
        "model": {
            "type": "Qwen2ForCausalLM (random init)", "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_word_embeddings,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "optimizer": f"AdamW lr {LEARNING_RATE}, fp32 states",
        "targets": {"speedup": SPEEDUP_TARGET, "memory_ratio": MEMORY_TARGET},
        **{m: per_method[m] for m in args.methods},
    }


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.set_defaults(warmup=2, repeat=5)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--precision", choices=["bf16-mixed", "fp32"], default=None,
                        help="default: bf16-mixed on CUDA, fp32 elsewhere")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each decoder layer in backward (non-reentrant), for every candidate")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "fp32")
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: thread hand-off would dominate the smoke figures
    compute_dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32

    def amp():
        if args.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=compute_dtype)

    model = build_model(args.quick, device, torch.float32).train()  # fp32 master weights
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    initial = [p.detach().clone() for p in model.parameters()]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    ceiling = ceilings(device, args.quick)
    results = Results("train_step", COLUMNS, device, ceiling, args.out)
    results.result["setting"] = setting(model, args, shapes)

    batches = {}
    for method in args.methods:
        try:
            batches[method] = make_batch(method, shapes[method], model, amp, compute_dtype)
        except Exception as err:  # noqa: BLE001  out of memory or a failing forward: the row says so
            results.add(error_row("inputs", err, method=method))

    found = candidates(device, args.quick)
    same_loss = {c.name: c.same_loss for c in found}
    # candidate-major: rftengine's and the TRL-style rows of both methods come before the
    # anchors that compile (Liger, torch.compile), which a step's time limit may cut short
    for cand in found:
        for method, batch in batches.items():
            results.add(*attempt(
                cand.name, lambda: candidate_row(cand, method, batch, model, initial, args, amp, compute_dtype),
                method=method,
            ))
            add_ratios(results.rows, same_loss, device.type == "cuda")
            results.write()
    return results.report()


if __name__ == "__main__":
    main()
