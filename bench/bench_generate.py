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

from rftengine.bench.harness import base_parser, ceilings, measure, report
from rftengine.generation import Generator
from rftengine.ops import token_logprobs

COLUMNS = [
    "engine", "batch", "ms_per_step", "tokens_per_second", "floor_ms", "x_floor", "speedup_vs_static", "dlogp_mean",
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


def decode_row(engine, batch, full, prefill_only, new, floor):
    if full["ms"] is None or prefill_only["ms"] is None:
        return {"engine": engine, "batch": batch, "error": full.get("error") or prefill_only.get("error")}
    step = (full["ms"] - prefill_only["ms"]) / (new - 1)
    return {
        "engine": engine, "batch": batch, "ms_per_step": step, "tokens_per_second": batch * new / full["ms"] * 1e3,
        "floor_ms": floor, "x_floor": step / floor, "rollout_ms": full["ms"], "prefill_ms": prefill_only["ms"],
        "peak_gib": full["peak_gib"],
    }


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

    rows = []
    for batch in batches:
        prompts = torch.randint(1, vocab, (batch, prompt), device=device)
        ones = torch.ones_like(prompts)
        floor = floor_ms(model, batch, prompt, new, ceiling["copy_gbps"])
        static_step = None
        anchor_rows = []
        for variant in args.anchors:
            extra = {"cache_implementation": "static"} if variant == "static" else {}

            def hf(n, extra=extra):
                return model.generate(
                    prompts, attention_mask=ones, do_sample=True, max_new_tokens=n, min_new_tokens=n,
                    pad_token_id=0, eos_token_id=None, **sampling, **extra,
                )

            full = measure(f"hf-{variant}", lambda: hf(new), device, args.warmup, args.repeat)
            pre = measure(f"hf-{variant}-prefill", lambda: hf(1), device, args.warmup, args.repeat)
            row = decode_row(f"transformers ({variant} cache)", batch, full, pre, new, floor)
            if variant == "static":
                static_step = row.get("ms_per_step")
            anchor_rows.append(row)
        for name, gen in engines.items():
            def ours(n, gen=gen):
                return gen.generate(prompts, max_new_tokens=n, eos_token_ids=None, seed=0, **sampling)

            full = measure(name, lambda: ours(new), device, args.warmup, args.repeat)
            pre = measure(f"{name}-prefill", lambda: ours(1), device, args.warmup, args.repeat)
            row = decode_row(name, batch, full, pre, new, floor)
            if batch == args.logp_batch or (quick and batch == batches[-1]):
                row["dlogp_mean"] = mean_abs_dlogp(model, ours(new), sampling["temperature"])
            anchor_rows.append(row)
        for row in anchor_rows:
            if static_step and row.get("ms_per_step"):
                row["speedup_vs_static"] = static_step / row["ms_per_step"]
        rows += anchor_rows
        for gen in engines.values():
            gen.free()

    return report("generate", rows, COLUMNS, device, ceiling, args.out)


if __name__ == "__main__":
    main()
