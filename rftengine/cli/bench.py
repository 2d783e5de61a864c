"""`rftengine bench`: the benchmark modules of rftengine.bench, by suite."""

from __future__ import annotations

import importlib

import torch

from rftengine.errors import UserError


BENCH_SUITES = {
    "kernels": ("bench_logprobs", "bench_linear_logprobs", "bench_fused_heads", "bench_sampling"),
    "losses": ("bench_losses",),
    "generate": ("bench_generate",),
    "train": ("bench_train_step",),
}


def _bench_module(name: str):
    try:
        return importlib.import_module(f"rftengine.bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"rftengine.bench.{name}":
            raise
        return None


def cmd_bench(args) -> int:
    names = [n for suite, mods in BENCH_SUITES.items() if args.suite in (suite, "all") for n in mods]
    modules = {name: _bench_module(name) for name in names}
    missing = [name for name, module in modules.items() if module is None]
    if missing:
        raise UserError(f"benchmark modules not found in rftengine.bench: {', '.join(missing)} (broken install?)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type != "cuda" and not args.quick:
        raise UserError(
            f"the full-size benchmarks (the anchor shapes of bench/README.md, up to ~63 GiB of tensors) need a "
            f"CUDA GPU, got device {device}; run `rftengine bench --quick` for the CPU smoke run"
        )
    argv_common = ["--quick"] if args.quick else []
    for flag in ("device", "warmup", "repeat"):
        if getattr(args, flag) is not None:
            argv_common += [f"--{flag}", str(getattr(args, flag))]
    for name, module in modules.items():
        argv = list(argv_common)
        if args.out_dir is not None:
            argv += ["--out", str(args.out_dir / f"{name}.json")]
        print(f"\n### {name} {' '.join(argv)}".rstrip(), flush=True)
        module.main(argv)
    if torch.device(device).type != "cuda":
        print("\nnote: this ran on CPU: only the smoke figures (that every benchmark runs and agrees) are "
              "meaningful here; speed and memory are measured on a CUDA GPU.")
    return 0
