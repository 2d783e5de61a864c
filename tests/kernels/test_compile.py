"""Every Triton kernel of `rftengine.kernels` compiles for the GPU, checked without one.

The launchers themselves pick each launch's configuration: they are called on small CPU
tensors with `JITFunction.run` replaced by a recorder, so block sizes, warps, constexpr flags,
dtypes and strides are whatever the launcher chose for those shapes. Each recorded launch then
goes through Triton's own launch-time specialization (`create_function_from_signature`, the
same binder `JITFunction.run` uses: argument types, 16-byte alignment and divisibility hints)
and `triton.compile(ASTSource(...), target=GPUTarget(...))`, down to a cubin from the ptxas
that ships in the triton wheel. Identical variants are compiled once.

Fails on a compile error, on shared memory or registers above the per-block limits of the
target, and on a `@triton.jit` function of `rftengine.kernels` that no case launches or reaches.
Prints registers, spills and shared memory per variant (`-s` or `-rA`).

sm_90 runs in the default run; `-m compile_all` adds sm_80. The compiles run in a fresh
interpreter without TRITON_INTERPRET (`python -m tests.kernels.test_compile 90` runs one alone).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

VOCABS = (1000, 50257, 128256, 151936)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# a short row (one small block) and one longer than every per-row block (1024), so both
# ends of each launcher's block-size heuristic are compiled
SEQ_LENS = (41, 3000)
ROWS = 3

# Per-block limits (CUDA C Programming Guide, "Technical specifications per compute
# capability"): opt-in shared memory 227 KiB on sm_90 and 163 KiB on sm_80; 255 registers
# a thread and 64 Ki 32-bit registers a block on both.
MAX_SHARED = {90: 227 * 1024, 80: 163 * 1024}
MAX_REGS_THREAD = 255
MAX_REGS_BLOCK = 64 * 1024

_KERNELS_PKG = "rftengine.kernels"


class Launch(NamedTuple):
    case: str       # which launcher call produced it
    fn: object      # the JITFunction
    args: tuple
    kwargs: dict


# ----------------------------------------------------------------------------- kernels


def _is_kernels_module(name: str) -> bool:
    return name == _KERNELS_PKG or name.startswith(_KERNELS_PKG + ".")


@contextlib.contextmanager
def _compilable_kernels():
    """Import `rftengine.kernels` afresh with TRITON_INTERPRET unset, so `@triton.jit` gives
    compilable JITFunctions (the conftest sets it on CPU machines, where it gives interpreted
    ones); restore the interpreted modules for the other tests afterwards."""
    import rftengine

    saved = {n: m for n, m in sys.modules.items() if _is_kernels_module(n)}
    saved_attr = rftengine.__dict__.get("kernels")
    saved_env = os.environ.pop("TRITON_INTERPRET", None)
    for name in saved:
        del sys.modules[name]
    try:
        package = importlib.import_module(_KERNELS_PKG)
        yield {
            info.name: importlib.import_module(f"{_KERNELS_PKG}.{info.name}")
            for info in pkgutil.iter_modules(package.__path__)
        }
    finally:
        for name in [n for n in sys.modules if _is_kernels_module(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
        if saved_attr is None:
            rftengine.__dict__.pop("kernels", None)
        else:
            rftengine.kernels = saved_attr
        if saved_env is not None:
            os.environ["TRITON_INTERPRET"] = saved_env


@contextlib.contextmanager
def _recording(launches: list[Launch], case: list[str]):
    """Record `kernel[grid](...)` calls instead of launching them."""
    from triton.runtime.jit import JITFunction

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(case[0], self, args, kwargs))

    original = JITFunction.run
    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


# ----------------------------------------------------------------------------- cases
# Inputs as the ops hand them to the launchers: masks bool, targets int64, log-prob outputs
# and upstream gradients of fp32 results fp32, user-facing float inputs in any of DTYPES.
# The input dtype changes only loads and stores (all arithmetic is fp32), a mode constexpr
# (estimator, loss type, scale) only the arithmetic: every mode and flag pattern is compiled in
# fp32, and bf16/fp16 with every load and store enabled, instead of the full product.


def _all_or_first(dtype, options):
    """Every option in fp32; in bf16/fp16 the first one (list it with every load/store on)."""
    return list(options) if dtype == torch.float32 else list(options)[:1]


def _logprobs_cases(k, dtype):
    lp = k["logprobs"]
    for vocab in VOCABS:
        targets = torch.zeros(ROWS, dtype=torch.int64)
        keep = torch.ones(ROWS, dtype=torch.bool)
        g = torch.zeros(ROWS)
        for mask, entropy in _all_or_first(dtype, ((keep, True), (None, False))):
            tag = f"V={vocab} {dtype} mask={mask is not None} entropy={entropy}"
            # token_logprobs: [N, V] logits of the input dtype, gradient into a new tensor
            logits = torch.zeros(ROWS, vocab, dtype=dtype)
            yield f"token_logprobs fwd {tag}", lambda: lp.token_logprobs_forward(logits, targets, mask, 0.7, entropy)
            yield f"token_logprobs bwd {tag}", lambda: lp.token_logprobs_backward(
                logits, targets, mask, 0.7, g, g if entropy else None, g, g if entropy else None)
            # linear_token_logprobs on CUDA: fp32 logits chunk written by cuBLAS from half
            # operands, bias in the weight dtype, dlogits in the matmul dtype IN PLACE (the
            # narrowing pass for bf16/fp16); without fp32-out matmuls the chunk is in dtype
            for chunk_dtype in {torch.float32, dtype}:
                chunk = torch.zeros(ROWS, vocab, dtype=chunk_dtype)
                bias = torch.zeros(vocab, dtype=dtype) if entropy else None
                ctag = f"{tag} chunk={chunk_dtype} bias={bias is not None}"
                yield f"linear chunk_stats {ctag}", lambda: lp.chunk_stats(chunk, bias, targets, mask, 0.7, entropy)
                yield f"linear chunk_grads_ {ctag}", lambda: lp.chunk_grads_(
                    chunk, bias, targets, mask, 0.7, g, g if entropy else None, g, g if entropy else None, dtype)


def _kl_cases(k, dtype):
    kl = k["kl"]
    n = ROWS * SEQ_LENS[-1]
    logp, ref, grad = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype), torch.zeros(n)
    keep = torch.ones(n, dtype=torch.bool)
    for name, code in _all_or_first(dtype, kl.KL_ESTIMATORS.items()):
        patterns = ((keep, True, True), (None, True, False), (keep, False, True))
        for mask, want_logp, want_ref in _all_or_first(dtype, patterns):
            tag = f"{name} {dtype} mask={mask is not None}"
            yield f"kl fwd {tag}", lambda: kl.kl_forward(logp, ref, mask, code, 20.0)
            yield f"kl bwd {tag} logp={want_logp} ref={want_ref}", lambda: kl.kl_backward(
                logp, ref, mask, code, 20.0, grad, want_logp, want_ref)


def _ppo_cases(k, dtype):
    ppo = k["ppo"]
    for t in SEQ_LENS:
        x = torch.zeros(ROWS, t, dtype=dtype)
        keep = torch.ones(ROWS, t, dtype=torch.bool)
        row_scale, grad = torch.ones(ROWS), torch.ones(())
        for per_seq, mask, isw, dual in _all_or_first(dtype, ((False, keep, x, 3.0), (True, None, None, None))):
            adv = torch.zeros(ROWS, dtype=dtype) if per_seq else x
            tag = f"T={t} {dtype} adv_per_seq={per_seq} mask={mask is not None} is={isw is not None} dual={dual}"
            args = (x, x, adv, mask, isw, 0.2, 0.28, dual, 20.0)
            yield f"ppo fwd {tag}", lambda: ppo.ppo_policy_forward(*args)
            yield f"ppo bwd {tag}", lambda: ppo.ppo_policy_backward(*args, row_scale, grad)
        for mask, clip in _all_or_first(dtype, ((keep, 0.2), (None, None))):
            tag = f"T={t} {dtype} mask={mask is not None} clip={clip}"
            yield f"value fwd {tag}", lambda: ppo.value_forward(x, x, x, mask, clip)
            yield f"value bwd {tag}", lambda: ppo.value_backward(x, x, x, mask, clip, row_scale, grad)


def _preference_cases(k, dtype):
    pref = k["preference"]
    n = 1500  # pairs: more than one block of 1024
    x, lengths, grad = torch.zeros(n, dtype=dtype), torch.ones(n), torch.zeros(n)
    for name, code in _all_or_first(dtype, pref.DPO_LOSS_TYPES.items()):
        for ref, length in _all_or_first(dtype, ((x, lengths), (None, None))):
            tag = f"{name} {dtype} ref={ref is not None} lengths={length is not None}"
            yield f"dpo fwd {tag}", lambda: pref.dpo_forward(x, x, ref, ref, length, length, code, 0.1, 0.5, 0.1)
            for want_policy, want_ref in _all_or_first(dtype, ((True, True), (True, False), (False, True))):
                yield f"dpo bwd {tag} policy={want_policy} ref={want_ref}", lambda: pref.dpo_backward(
                    x, x, ref, ref, length, length, code, 0.1, 0.5, 0.1, grad, want_policy, want_ref)
    for margin in _all_or_first(dtype, (x, None)):
        tag = f"{dtype} margin_tensor={margin is not None}"
        yield f"bradley_terry fwd {tag}", lambda: pref.bradley_terry_forward(x, x, margin, 0.0, 0.01)
        yield f"bradley_terry bwd {tag}", lambda: pref.bradley_terry_backward(x, x, margin, 0.0, 0.01, grad)
    for t in SEQ_LENS:
        token_logp = torch.zeros(ROWS, t, dtype=dtype)
        keep = torch.ones(ROWS, t, dtype=torch.bool)
        count, g = torch.ones(ROWS), torch.zeros(ROWS)
        for mask, mean in _all_or_first(dtype, ((keep, True), (None, False))):
            tag = f"T={t} {dtype} mask={mask is not None} mean={mean}"
            yield f"sequence_logprobs fwd {tag}", lambda: pref.sequence_logprobs_forward(token_logp, mask, mean)
            yield f"sequence_logprobs bwd {tag}", lambda: pref.sequence_logprobs_backward(
                mask, count, g, (ROWS, t), dtype, mean)


def _advantage_cases(k, dtype):
    gae = k["gae"]
    for t in SEQ_LENS:
        x = torch.zeros(ROWS, t, dtype=dtype)
        keep = torch.ones(ROWS, t, dtype=torch.bool)
        g = torch.zeros(ROWS, t)
        for mask in _all_or_first(dtype, (keep, None)):
            tag = f"T={t} {dtype} mask={mask is not None}"
            yield f"gae fwd {tag}", lambda: gae.gae_forward(x, x, mask, 1.0, 0.95)
            for g_adv, g_ret in _all_or_first(dtype, ((g, g), (g, None), (None, g))):
                yield f"gae bwd {tag} g_adv={g_adv is not None} g_ret={g_ret is not None}", lambda: gae.gae_backward(
                    mask, (ROWS, t), 1.0, 0.95, g_adv, g_ret, dtype, dtype)
    flat = torch.zeros(ROWS * SEQ_LENS[-1], dtype=dtype)
    keep = torch.ones(flat.shape, dtype=torch.bool)
    grad, stats = torch.zeros(flat.shape), torch.zeros(4)
    for mask in _all_or_first(dtype, (keep, None)):
        for shift in _all_or_first(dtype, (False, True)):
            tag = f"{dtype} mask={mask is not None} shift_mean={shift}"
            yield f"whiten moments {tag}", lambda: gae.masked_moments(flat, mask)
            yield f"whiten apply {tag}", lambda: gae.whiten_apply(flat, mask, stats, shift)
            yield f"whiten grad_sums {tag}", lambda: gae.whiten_grad_sums(flat, mask, stats, grad)
            yield f"whiten bwd {tag}", lambda: gae.whiten_backward_apply(flat, mask, stats, grad, shift)
    for n_groups, group_size in ((64, 8), (3, 64)):
        scores = torch.zeros(n_groups * group_size, dtype=dtype)
        g = torch.zeros(scores.shape)
        for name, code in _all_or_first(dtype, sorted(gae.GROUP_SCALES.items(), key=lambda kv: -kv[1])):
            tag = f"{n_groups}x{group_size} {dtype} scale={name}"
            yield f"group_advantages fwd {tag}", lambda: gae.group_advantages_forward(
                scores, group_size, 1.0, code, 1e-6)
            yield f"group_advantages bwd {tag}", lambda: gae.group_advantages_backward(
                scores, group_size, 1.0, code, 1e-6, g)


def _sampling_cases(k, dtype):
    sampling = k["sampling"]
    keys = torch.zeros(ROWS, dtype=torch.int64)
    # (top_k, top_p, log_min_p, with_truncated): greedy, the untruncated race, each search alone
    # and all of them together
    variants = ((0, 1.0, float("-inf"), True), (1, 1.0, float("-inf"), True), (1, 1.0, float("-inf"), False),
                (50, 1.0, float("-inf"), False), (0, 0.9, float("-inf"), True), (0, 1.0, -3.0, False),
                (50, 0.9, -3.0, True))
    for vocab in (VOCABS[0], VOCABS[-1]):
        logits = torch.zeros(ROWS, vocab, dtype=dtype)
        for top_k, top_p, log_min_p, truncated in _all_or_first(dtype, reversed(variants)):
            tag = f"V={vocab} {dtype} top_k={top_k} top_p={top_p} log_min_p={log_min_p} truncated={truncated}"
            yield f"sample_tokens {tag}", lambda: sampling.sample_tokens(
                logits, keys, 0.7, top_k, top_p, log_min_p, truncated)


CASES = (_logprobs_cases, _kl_cases, _ppo_cases, _preference_cases, _advantage_cases, _sampling_cases)


def _record_launches(modules) -> list[Launch]:
    launches: list[Launch] = []
    current = [""]
    with _recording(launches, current):
        for family in CASES:
            for dtype in DTYPES:
                for label, call in family(modules, dtype):
                    current[0] = label
                    call()
    return launches


@pytest.fixture(scope="module")
def kernels_and_launches():
    with _compilable_kernels() as modules:
        yield modules, _record_launches(modules)


# ----------------------------------------------------------------------------- coverage


def _jit_functions(modules) -> dict[str, object]:
    from triton.runtime.jit import JITFunction

    found = {}
    for mod_name, module in modules.items():
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__:
                found[f"{mod_name}.{name}"] = value
    return found


def _callees(fn) -> set:
    """JIT functions a JIT function calls by a global name (the kernels' only call style)."""
    from triton.runtime.jit import JITFunction

    names = {node.id for node in ast.walk(ast.parse(fn.src)) if isinstance(node, ast.Name)}
    return {fn.fn.__globals__[n] for n in names if isinstance(fn.fn.__globals__.get(n), JITFunction)}


def test_every_kernel_is_launched_by_a_case(kernels_and_launches):
    """A kernel or device function that no case launches or reaches fails here: add a case."""
    modules, launches = kernels_and_launches
    every = _jit_functions(modules)
    assert every, "no @triton.jit function found in rftengine.kernels"
    reached, todo = set(), [launch.fn for launch in launches]
    while todo:
        fn = todo.pop()
        if fn not in reached:
            reached.add(fn)
            todo.extend(_callees(fn))
    missing = sorted(name for name, fn in every.items() if fn not in reached)
    assert not missing, f"@triton.jit functions no compile case covers: {missing}"


# ----------------------------------------------------------------------------- compile


def _variants(launches, backend, failures: list[str]):
    """Triton's launch-time specialization of each launch, deduplicated:
    {key: (cases, fn, signature, constexprs, attrs, options)}."""
    from triton.runtime.jit import create_function_from_signature

    variants = {}
    binders = {}
    for launch in launches:
        fn = launch.fn
        try:
            if fn not in binders:
                binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = binders[fn](*launch.args, **launch.kwargs)
            options, signature, constexprs, attrs = fn._pack_args(
                backend, launch.kwargs, bound, specialization, options)
        except Exception as exc:  # noqa: BLE001  arguments Triton cannot bind: report, go on
            failures.append(f"{fn.__name__} [{launch.case}]: {type(exc).__name__}: {exc}")
            continue
        key = repr((fn.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()),
                    sorted(options.__dict__.items())))
        if key in variants:
            variants[key][0].append(launch.case)
        else:
            variants[key] = ([launch.case], fn, signature, constexprs, attrs, options)
    return variants


_USAGE = re.compile(r"Function (\w+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers a thread, local-memory bytes a thread: the spill space) from the cubin,
    read by the cuobjdump that ships with Triton (no driver needed)."""
    from triton.tools.disasm import path_to_cuobjdump

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([path_to_cuobjdump(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    match = _USAGE.search(out)
    assert match, f"cannot parse cuobjdump resource usage:\n{out}"
    return int(match.group(2)), int(match.group(3)) + int(match.group(5))


def compile_every_launch(arch: int) -> tuple[str, list[str]]:
    """Compile every launch the cases record for sm_<arch>: (the table, the failures)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    failures: list[str] = []
    rows = []
    start = time.perf_counter()
    with _compilable_kernels() as modules:
        launches = _record_launches(modules)
        target = GPUTarget("cuda", arch, 32)
        variants = _variants(launches, make_backend(target), failures)
        for cases, fn, signature, constexprs, attrs, options in variants.values():
            label = f"{fn.__name__} [{cases[0]}]" + (f" (+{len(cases) - 1} same)" if len(cases) > 1 else "")
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
            except Exception as exc:  # noqa: BLE001  a compile error of any stage: report every variant
                failures.append(f"{label}: {type(exc).__name__}: {str(exc).strip()[:2000]}")
                continue
            regs, local = _resource_usage(compiled.asm["cubin"])
            shared = compiled.metadata.shared
            warps = compiled.metadata.num_warps
            rows.append((fn.__name__, warps, regs, local // 4, shared, cases[0]))
            if shared > MAX_SHARED[arch]:
                failures.append(f"{label}: {shared} B shared memory > {MAX_SHARED[arch]} B per block on sm_{arch}")
            if regs > MAX_REGS_THREAD or regs * warps * 32 > MAX_REGS_BLOCK:
                failures.append(f"{label}: {regs} registers x {warps * 32} threads > the per-block limits "
                                f"({MAX_REGS_THREAD} a thread, {MAX_REGS_BLOCK} a block)")
    lines = [
        f"sm_{arch}: {len(variants)} variants from {len(launches)} launches, compiled in "
        f"{time.perf_counter() - start:.1f} s (spills: 32-bit words of local memory a thread)",
        f"{'kernel':<28} {'warps':>5} {'regs':>4} {'spills':>6} {'smem B':>7}  first case",
    ]
    for name, warps, regs, spills, shared, case in sorted(rows, key=lambda r: (r[0], -r[2])):
        lines.append(f"{name:<28} {warps:>5} {regs:>4} {spills:>6} {shared:>7}  {case}")
    return "\n".join(lines), failures


def _marker_selected(config, marker: str) -> bool:
    expr = config.getoption("markexpr") or ""
    return marker in expr and f"not {marker}" not in expr


@pytest.mark.compile_all
@pytest.mark.parametrize("arch", [90, 80], ids=["sm_90", "sm_80"])
def test_every_kernel_compiles(arch, request):
    if arch != 90 and not _marker_selected(request.config, "compile_all"):
        pytest.skip("sm_80 compiles with `-m compile_all`; the default run checks sm_90")
    # A fresh interpreter without TRITON_INTERPRET: with it set when triton was first imported
    # (the conftest does so on CPU machines), triton.language's own helpers are interpreted
    # functions, and what the compiler then does with them depends on the triton version.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.test_compile", str(arch)],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
    )
    print("\n" + proc.stdout)
    assert proc.returncode == 0, f"{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"


def _main(argv: list[str]) -> int:
    """`python -m tests.kernels.test_compile ARCH`: compile for sm_ARCH, print the table, and
    exit 1 with the failures listed if any."""
    warnings.filterwarnings("ignore", "TRITON_DEFAULT_FP_FUSION")  # Triton's own notice
    table, failures = compile_every_launch(int(argv[0]))
    print(table)
    if failures:
        print(f"\n{len(failures)} FAILURES:\n" + "\n".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
