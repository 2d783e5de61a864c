"""Rollout generation: rftengine's Generator against transformers `generate` (dynamic and static cache).

Setting (bench/README.md, "Anchor figures" §2): a random-init Qwen2 config of ~494M parameters (hidden 896, 24
layers, 14 heads / 2 kv heads, vocab 151936, tied embeddings) in bf16, 128-token prompts, 256 new
tokens, sampling at temperature 1 with no EOS (every row runs the full length), batches 1, 16,
64 and 256.

Per engine and batch: ms per decode step = (full rollout - prefill-only rollout) / (new tokens - 1),
tokens/s over the full rollout, and the ratio to the bandwidth floor (weights + the live KV cache
read once per step at the measured copy bandwidth). Also the mean |rollout logp - trainer logp|
over response tokens: the trainer recomputes the rollout with a plain HF forward + token_logprobs.
`--quick`: a tiny config on the CPU that finishes in seconds.

`--long-tail` (issue #13): an RL-shaped rollout instead. 512 sequences (64 prompts x 8 samples, each
sample its own prompt row, so each can have its own length) with 256-token prompts; each sequence asks
for its own number of tokens, drawn (seeded) from a lognormal with median 200 capped at 1,024, and EOS
is off, so the lengths are exactly those. At max_batch_size 128 and 512: total wall time and tokens/s
(the requested tokens / the wall time) of rftengine's continuous batching (finished rows leave, queued
ones refill them), rftengine with ``continuous=False`` (fixed batches, each decoded until its longest
row is done) and transformers `generate` with the static cache over batches of max_batch_size (it
needs one max_new_tokens per batch, the batch's longest: only the tokens each sequence asked for are
counted). Targets on a GPU: continuous >= 2x the tokens/s of ``continuous=False`` and >= 10x the
static cache's. `--quick --long-tail`: the tiny model, 16 sequences, lengths from the same lognormal
scaled down 32x.
"""

from __future__ import annotations

import math

import torch

from rftengine.bench.harness import (
    GIB, Results, attempt, base_parser, ceilings, error_row, measure, time_ms,
)
from rftengine.generation import Generator
from rftengine.ops import token_logprobs

COLUMNS = [
    "engine", "batch", "ms_per_step", "tokens_per_second", "floor_ms", "x_floor", "speedup_vs_static", "dlogp_mean",
    "error",
]


def qwen2_config(quick: bool):
    from transformers import Qwen2Config

    if quick:
        return Qwen2Config(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            max_position_embeddings=512, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        )
    return Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )


def build_model(quick: bool, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(qwen2_config(quick))
    return model.to(dtype).eval()


def floor_ms(model, batch: int, prompt: int, new: int, copy_gbps: float) -> float:
    """Weights once + the average live KV cache once per decode step, at the copy bandwidth."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = batch * (prompt + new / 2) * kv_bytes_per_token(model)
    return (weight_bytes + kv_bytes) / (copy_gbps * 1e9) * 1e3


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token holds: keys and values of every layer's KV heads, in the model's dtype."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize


def mean_abs_dlogp(model, out, temperature: float, chunk: int = 8) -> float:
    """Mean |rollout logp - trainer logp| over response tokens (trainer: HF forward + token_logprobs)."""
    new = out.responses.shape[1]
    total, count = 0.0, 0
    with torch.no_grad():
        for r in range(0, out.sequences.shape[0], chunk):
            rows = slice(r, r + chunk)
            logits = model(
                out.sequences[rows], attention_mask=out.attention_mask[rows].long(),
                position_ids=out.position_ids[rows], logits_to_keep=new + 1,
            ).logits[:, :-1]
            mask = out.response_mask[rows]
            logp = token_logprobs(logits, out.responses[rows], temperature=temperature, mask=mask)
            total += float((logp - out.logprobs[rows]).abs()[mask].sum())
            count += int(mask.sum())
            del logits
    return total / max(count, 1)


def decode_row(engine, batch, rollout, new, floor, args, dlogp=None):
    """Time ``rollout(n)`` for n = new and n = 1; the row of ms per decode step (and, with
    ``dlogp``, the mean |rollout - trainer logp| of one more rollout)."""
    full = measure(engine, lambda: rollout(new), args.device, args.warmup, args.repeat)
    pre = measure(f"{engine}-prefill", lambda: rollout(1), args.device, args.warmup, args.repeat)
    if full["ms"] is None or pre["ms"] is None:
        return {"engine": engine, "batch": batch, "error": full.get("error") or pre.get("error")}
    step = (full["ms"] - pre["ms"]) / (new - 1)
    row = {
        "engine": engine, "batch": batch, "ms_per_step": step, "tokens_per_second": batch * new / full["ms"] * 1e3,
        "floor_ms": floor, "x_floor": step / floor, "rollout_ms": full["ms"], "prefill_ms": pre["ms"],
        "peak_gib": full["peak_gib"],
    }
    if dlogp is not None:
        # after the timings are in the row: a failure here costs the |dlogp| column only
        try:
            row["dlogp_mean"] = dlogp(rollout(new))
        except Exception as err:  # noqa: BLE001
            row["error"] = error_row(engine, err)["error"]
    return row


LONG_TAIL_COLUMNS = [
    "engine", "max_batch_size", "sequences", "tokens", "wall_s", "tokens_per_second", "x_no_compaction",
    "x_hf_static", "target_met", "lengths_ok", "capacity", "kv_gib", "error",
]
CONTINUOUS, NO_COMPACTION = "rftengine (continuous)", "rftengine (no compaction)"
HF_STATIC = "transformers (static cache)"
# Issue #13's targets for the continuous path on this mix (GPU): its tokens/s over each anchor's.
TARGETS = {"x_no_compaction": 2.0, "x_hf_static": 10.0}


def long_tail_lengths(n: int, median: float, cap: int, sigma: float = 1.0, seed: int = 0) -> torch.Tensor:
    """``[n]`` int64 response lengths: lognormal(log median, sigma) draws, rounded and clipped to
    [1, cap]. sigma = 1 puts about 5% of the draws at the cap (the answers that run to the limit)."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.empty(n, dtype=torch.float64).log_normal_(math.log(median), sigma, generator=gen)
    return draws.round().clamp_(1, cap).long()


def rftengine_rollout(gen, prompts: torch.Tensor, lengths: torch.Tensor, sampling: dict) -> torch.Tensor:
    """All of ``prompts`` ``[N, P]`` in one call, row i asking for ``lengths[i]`` tokens; returns the
    ``[N]`` response lengths it produced (on the CPU)."""
    out = gen.generate(prompts, max_new_tokens=lengths.tolist(), eos_token_ids=None, seed=0, **sampling)
    return out.response_lengths.cpu()


def hf_static_rollout(model, prompts, lengths, batch: int, cache_len: int, sampling: dict) -> torch.Tensor:
    """transformers `generate` with the static cache over consecutive batches of ``batch`` rows,
    each run to its longest requested length (one max_new_tokens per call). The cache is sized once
    for the longest possible sequence (``max_cache_len``), so batches with other lengths reuse the
    compiled forward. Returns the ``[N]`` tokens generated per row (a row's batch maximum)."""
    extra = {"max_cache_len": cache_len} if hasattr(model.generation_config, "max_cache_len") else {}
    generated = []
    for rows in torch.arange(prompts.shape[0]).split(batch):
        n = int(lengths[rows].max())
        out = model.generate(
            prompts[rows], attention_mask=torch.ones_like(prompts[rows]), do_sample=True, max_new_tokens=n,
            min_new_tokens=n, pad_token_id=0, eos_token_id=None, cache_implementation="static",
            **sampling, **extra,
        )
        generated.append(torch.full((len(rows),), out.shape[1] - prompts.shape[1]))
    return torch.cat(generated)


def long_tail_row(engine, max_batch, run, warm, lengths, *, exact: bool, repeat: int, device) -> dict:
    """Warm ``run`` up on one batch (``warm``: graph captures, compiles), then time the whole rollout.
    ``lengths_ok``: every row produced exactly its requested length (``exact``) or at least it (the
    static-cache anchor, whose rows run to their batch's longest)."""
    warm()
    last = {}
    ms = time_ms(lambda: last.update(produced=run()), device, warmup=0, repeat=repeat)
    produced = last["produced"]
    ok = bool((produced == lengths).all() if exact else (produced >= lengths).all())
    tokens = int(lengths.sum())
    return {
        "engine": engine, "max_batch_size": max_batch, "sequences": len(lengths), "tokens": tokens,
        "wall_s": ms / 1e3, "tokens_per_second": tokens / ms * 1e3, "lengths_ok": ok,
    }


def add_ratios(rows: list[dict], cuda: bool) -> None:
    """Fill each continuous row's speed-ups over the anchors at its max_batch_size (and, on CUDA,
    whether both targets are met)."""
    tps = {(r["engine"], r["max_batch_size"]): r.get("tokens_per_second") for r in rows}
    for row in rows:
        if row["engine"] != CONTINUOUS or not row.get("tokens_per_second"):
            continue
        for key, anchor in (("x_no_compaction", NO_COMPACTION), ("x_hf_static", HF_STATIC)):
            other = tps.get((anchor, row["max_batch_size"]))
            if other:
                row[key] = row["tokens_per_second"] / other
        if cuda and all(key in row for key in TARGETS):
            row["target_met"] = all(row[key] >= goal for key, goal in TARGETS.items())


def capacity_at_budget(model, max_seq_len: int, budget: int | float) -> dict:
    """How many sequences of ``max_seq_len`` tokens a Generator's ``kv_cache_memory=budget`` holds
    (a fraction of the free device memory, or bytes); nothing is allocated."""
    gen = Generator(model, max_batch_size=2**20, max_seq_len=max_seq_len, kv_cache_memory=budget)
    return {"kv_cache_memory": budget, "max_seq_len": max_seq_len, "bytes_per_row": gen.bytes_per_row,
            "capacity": gen.capacity}


def long_tail(args, model, ceiling, device) -> dict:
    """The ``--long-tail`` suite (see the module docstring); returns the Results' final dict."""
    quick = args.quick
    scale = 32 if quick else 1  # --quick: the same lognormal, 32x shorter
    prompts_n, samples = (4, 4) if quick else (64, 8)
    prompt = args.prompt_len or (8 if quick else 256)
    median, cap = args.length_median / scale, args.length_cap // scale
    max_batches = args.max_batch_sizes or ([4, 16] if quick else [128, 512])
    n = prompts_n * samples
    lengths = long_tail_lengths(n, median, cap, args.length_sigma, args.length_seed)
    torch.manual_seed(0)
    # each sample is its own prompt row: rftengine's max_new_tokens is per prompt
    prompts = torch.randint(1, model.config.vocab_size, (prompts_n, prompt), device=device)
    prompts = prompts.repeat_interleave(samples, 0)
    max_seq_len = prompt + cap
    per_token = kv_bytes_per_token(model)
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0)
    cuda = device.type == "cuda"

    results = Results("generate_long_tail", LONG_TAIL_COLUMNS, device, ceiling, args.out)
    results.result["setting"] = {
        "model": f"Qwen2 random init, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                 f"{str(model.dtype).removeprefix('torch.')}",
        "prompts": prompts_n, "samples": samples, "prompt_len": prompt, "sampling": sampling, "eos": None,
        "lengths": {
            "distribution": f"lognormal(log {median:g}, {args.length_sigma:g}), rounded, clipped to [1, {cap}]",
            "seed": args.length_seed, "mean": float(lengths.double().mean()), "median": int(lengths.median()),
            "max": int(lengths.max()), "at_cap": int((lengths == cap).sum()), "total_tokens": int(lengths.sum()),
        },
        "kv_bytes_per_token": per_token,
        # what a memory budget holds: 90% of the free GPU memory (on CPU, 1 GiB)
        "budget": attempt("budget", lambda: capacity_at_budget(model, max_seq_len, 0.9 if cuda else GIB))[0],
        "targets": "GPU: rftengine (continuous) >= 2x the tokens/s of rftengine (no compaction) and >= 10x "
                   "transformers (static cache); the anchor's tokens past a row's request are not counted",
    }
    results.write()

    def add(engine, max_batch, build):
        rows = attempt(engine, build)
        for row in rows:
            row.setdefault("engine", row.pop("name", engine))
            row.setdefault("max_batch_size", max_batch)
        results.add(*rows)
        add_ratios(results.rows, cuda)
        results.write()

    # rftengine first, every max_batch_size: the anchor is the one that may run out of memory or time
    for max_batch in max_batches:
        for engine, continuous in ((CONTINUOUS, True), (NO_COMPACTION, False)):
            def build(max_batch=max_batch, continuous=continuous, engine=engine):
                gen = Generator(model, max_batch_size=max_batch, max_seq_len=max_seq_len, continuous=continuous)
                try:
                    row = long_tail_row(
                        engine, max_batch, lambda: rftengine_rollout(gen, prompts, lengths, sampling),
                        lambda: rftengine_rollout(gen, prompts[:max_batch], lengths[:max_batch], sampling),
                        lengths, exact=True, repeat=args.repeat, device=device,
                    )
                    # the rows the Generator decodes at once and the memory they hold (KV cache + buffers)
                    row.update(capacity=gen.capacity, kv_gib=gen.capacity * gen.bytes_per_row / GIB)
                    return row
                finally:
                    gen.free()

            add(engine, max_batch, build)
    for max_batch in max_batches:
        def build_hf(max_batch=max_batch):
            def run(rows=slice(None)):
                return hf_static_rollout(model, prompts[rows], lengths[rows], max_batch, max_seq_len, sampling)

            # timed once: each run takes tens of seconds on a GPU, far above its spread
            row = long_tail_row(
                HF_STATIC, max_batch, run, lambda: run(slice(0, max_batch)), lengths, exact=False, repeat=1,
                device=device,
            )
            row.update(capacity=max_batch, kv_gib=max_batch * max_seq_len * per_token / GIB)
            return row

        add(HF_STATIC, max_batch, build_hf)
    return results.report()


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.set_defaults(warmup=1, repeat=3)
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 16 64 256 (quick: 1 4)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 128 (quick: 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256 (quick: 8)")
    parser.add_argument("--anchors", nargs="*", default=["dynamic", "static"], choices=["dynamic", "static"],
                        help="transformers generate variants measured beside rftengine")
    parser.add_argument("--compile", action="store_true", help="also measure Generator(compile=True)")
    parser.add_argument(
        "--logp-batch", type=int, default=64, help="batch whose rollout/trainer |dlogp| is reported",
    )
    long = parser.add_argument_group("--long-tail", "the long-tail rollout of issue #13 (module docstring)")
    long.add_argument(
        "--long-tail", action="store_true",
        help="run the long-tail rollout instead of --batches: one warm-up batch per engine (not --warmup), "
             "then --repeat timed rollouts (the static-cache anchor: one)",
    )
    long.add_argument("--max-batch-sizes", type=int, nargs="+", default=None, help="default: 128 512 (quick: 4 16)")
    long.add_argument("--length-median", type=float, default=200.0, help="lognormal median of max_tokens (quick: /32)")
    long.add_argument("--length-cap", type=int, default=1024, help="largest max_tokens (quick: /32)")
    long.add_argument("--length-sigma", type=float, default=1.0, help="lognormal sigma of max_tokens")
    long.add_argument("--length-seed", type=int, default=0, help="seed of the max_tokens draw")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    quick = args.quick
    if quick and device.type == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: thread hand-off would dominate the smoke figures
    batches = args.batches or ([1, 4] if quick else [1, 16, 64, 256])
    prompt = args.prompt_len or (8 if quick else 128)
    new = args.new_tokens or (8 if quick else 256)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(quick, device, dtype)
    ceiling = ceilings(device, quick)
    if args.long_tail:
        return long_tail(args, model, ceiling, device)
    vocab = model.config.vocab_size
    engines = {"rftengine": Generator(model, max_batch_size=max(batches), max_seq_len=prompt + new)}
    if args.compile:
        engines["rftengine+compile"] = Generator(
            model, max_batch_size=max(batches), max_seq_len=prompt + new, compile=True
        )
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0)

    results = Results("generate", COLUMNS, device, ceiling, args.out)
    for batch in batches:
        prompts = torch.randint(1, vocab, (batch, prompt), device=device)
        ones = torch.ones_like(prompts)
        floor = floor_ms(model, batch, prompt, new, ceiling["copy_gbps"])
        batch_rows = []

        def add(engine, rollout, dlogp=None):
            # each row is in the JSON before the next engine runs: a later failure, OOM or the
            # step's time limit cannot take it away
            rows = attempt(engine, lambda: decode_row(engine, batch, rollout, new, floor, args, dlogp))
            for row in rows:
                row.setdefault("engine", row.pop("name", engine))
                row.setdefault("batch", batch)
            batch_rows.extend(rows)
            results.add(*rows)

        # rftengine first: the anchors are the ones that may run out of memory or time
        for name, gen in engines.items():
            def ours(n, gen=gen):
                return gen.generate(prompts, max_new_tokens=n, eos_token_ids=None, seed=0, **sampling)

            def dlogp(out):
                return mean_abs_dlogp(model, out, sampling["temperature"])

            add(name, ours, dlogp if batch == args.logp_batch or (quick and batch == batches[-1]) else None)
            gen.free()
        for variant in args.anchors:
            extra = {"cache_implementation": "static"} if variant == "static" else {}

            def hf(n, extra=extra):
                return model.generate(
                    prompts, attention_mask=ones, do_sample=True, max_new_tokens=n, min_new_tokens=n,
                    pad_token_id=0, eos_token_id=None, **sampling, **extra,
                )

            add(f"transformers ({variant} cache)", hf)
        static = [r.get("ms_per_step") for r in batch_rows if r["engine"] == "transformers (static cache)"]
        static_step = static[0] if static else None
        for row in batch_rows:
            if static_step and row.get("ms_per_step"):
                row["speedup_vs_static"] = static_step / row["ms_per_step"]
        results.write()

    return results.report()


if __name__ == "__main__":
    main()
