"""Rollout generation: rftengine's Generator against transformers `generate` (dynamic and static cache).

Setting (ANCHORS.md section 2): a random-init Qwen2 config of ~494M parameters (hidden 896, 24
layers, 14 heads / 2 kv heads, vocab 151936, tied embeddings) in bf16, 128-token prompts, 256 new
tokens, sampling at temperature 1 with no EOS (every row runs the full length), batches 1, 16,
64 and 256.

Per engine and batch: ms per decode step = (full rollout - prefill-only rollout) / (new tokens - 1),
tokens/s over the full rollout, and the ratio to the bandwidth floor (weights + the live KV cache
read once per step at the measured copy bandwidth). Also the mean |rollout logp - trainer logp|
over response tokens: the trainer recomputes the rollout with a plain HF forward + token_logprobs.
`--quick`: a tiny config on the CPU that finishes in seconds.
"""

from __future__ import annotations

import torch

from rftengine.bench.harness import Results, attempt, base_parser, ceilings, error_row, measure
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
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize
    kv_bytes = batch * (prompt + new / 2) * per_token
    return (weight_bytes + kv_bytes) / (copy_gbps * 1e9) * 1e3


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
