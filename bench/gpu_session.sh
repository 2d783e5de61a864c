#!/usr/bin/env bash
# One GPU session in one command: install rftengine beside the preinstalled torch, run the CUDA
# tests with compiled Triton kernels, then every benchmark at the anchor shapes (bench/README.md). Each step
# runs under its own time limit and the whole under one deadline (DEADLINE_S, default 560 s,
# inside the device tool's 600 s per command). Steps run in priority order; a step that no
# longer fits is skipped and named at the end, with the command that runs it in a second call.
# See bench/README.md for the estimates behind the limits and for committing the results.
#
# usage: bash bench/gpu_session.sh OUTDIR [STEP ...]
#   STEP: tests tests_methods linear_logprobs generate fused_heads logprobs sampling losses
#         generate_batches train_step generate_long_tail (default: all of them, in this order)
# environment:
#   PYTHON=python3     the interpreter that holds torch (on the device machines: python3)
#   DEADLINE_S=560     wall-clock budget of the whole script, in seconds
#   QUICK=1            benchmarks with --quick (a CPU dry run of the script)
#   SKIP_INSTALL=1     no pip install when rftengine is already importable (QUICK=1 implies it)
#   PYTEST_WORKERS=8   pytest-xdist workers for the ops/generation tests (0: one process)
# OUTDIR receives session.log and one JSON per benchmark step that ran: 10 files when all do, and the
# device tool returns 8 at most, so run train_step generate_long_tail in a call of their own (bench/README.md).

set -uo pipefail

STEPS_ALL=(tests tests_methods linear_logprobs generate fused_heads logprobs sampling losses generate_batches train_step
    generate_long_tail)

usage() {
    sed -n '9,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    usage
    exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_ARG=$1
shift
STEPS=("$@")
if [[ ${#STEPS[@]} -eq 0 ]]; then
    STEPS=("${STEPS_ALL[@]}")
fi
for s in "${STEPS[@]}"; do
    if [[ " ${STEPS_ALL[*]} " != *" $s "* ]]; then
        echo "unknown step '$s'; steps: ${STEPS_ALL[*]}" >&2
        exit 2
    fi
done
mkdir -p "$OUT_ARG" || exit 2
OUT=$(cd "$OUT_ARG" && pwd)

PY=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-560}
QUICK=${QUICK:-0}
START=$SECONDS
RESERVE_S=20    # timeout's --kill-after grace plus the closing summary
MIN_STEP_S=20   # a step is not started with less time than this

# A step's limit in seconds: typical time from bench/README.md, with margin.
declare -A LIMIT=(
    [setup]=150 [tests]=210 [tests_methods]=90 [linear_logprobs]=150 [generate]=240
    [fused_heads]=120 [logprobs]=60 [sampling]=60 [losses]=150 [generate_batches]=90 [train_step]=240
    [generate_long_tail]=300
)

SUMMARY=()
RERUN=()
FAILED=0

log() { printf '\n### [%4ss] %s\n' "$((SECONDS - START))" "$*"; }

# run_step NAME CMD...: run CMD under min(its limit, the time left before the deadline).
run_step() {
    local name=$1
    shift
    local left=$((DEADLINE_S - (SECONDS - START) - RESERVE_S))
    local limit=${LIMIT[$name]}
    ((left < limit)) && limit=$left
    if ((limit < MIN_STEP_S)); then
        log "$name: SKIPPED, ${left}s left before the ${DEADLINE_S}s deadline"
        SUMMARY+=("$(printf '%-18s %-9s %6s %6s' "$name" skipped - "$limit")")
        RERUN+=("$name")
        FAILED=1
        return
    fi
    log "$name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=15 "$limit" "$@"
    local rc=$? status=ok
    if ((rc == 124 || rc == 137)); then
        status=timeout
        RERUN+=("$name")
    elif ((rc != 0)); then
        status="rc=$rc"
    fi
    ((rc != 0)) && FAILED=1
    log "$name: $status after $((SECONDS - t0))s"
    SUMMARY+=("$(printf '%-18s %-9s %6s %6s' "$name" "$status" "$((SECONDS - t0))" "$limit")")
}

# -- setup ------------------------------------------------------------------------------------

LINKS=()
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    local l
    for l in "${LINKS[@]}"; do
        [[ -L $l ]] && rm -f "$l"
    done
}

install_project() {
    # Wheels carried in .whl/ (e.g. liger-kernel, see bench/README.md): beside the image's packages.
    if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
        local site=/tmp/rftengine-session/site
        echo "installing the carried wheels: $(cd "$REPO/.whl" && echo ./*.whl)"
        timeout --kill-after=10 120 "$PY" -m pip install -q --no-index --no-deps --no-compile \
            --upgrade --target "$site" "$REPO"/.whl/*.whl &&
            export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if [[ $QUICK != 0 || ${SKIP_INSTALL:-0} != 0 ]] && "$PY" -c "import rftengine.kernels, rftengine.bench" 2>/dev/null; then
        echo "install skipped: rftengine already importable"
        return 0
    fi
    # --no-deps keeps the preinstalled torch/triton/transformers; --no-index: the machine is offline.
    if timeout --kill-after=10 "${LIMIT[setup]}" \
        "$PY" -m pip install --no-deps --no-build-isolation --no-index -e "$REPO"; then
        return 0
    fi
    echo "pip install -e failed: building rftengine._C in place and importing from the tree"
    (cd "$REPO" && timeout --kill-after=10 "${LIMIT[setup]}" "$PY" setup.py build_ext --inplace) || echo "build_ext failed: rftengine._C (sequence packing) unavailable"
    # setup.py maps kernels/ and bench/ into the package; without an install, links do it.
    local sub
    for sub in kernels bench; do
        if [[ ! -e $REPO/rftengine/$sub ]]; then
            ln -s "../$sub" "$REPO/rftengine/$sub" && LINKS+=("$REPO/rftengine/$sub")
        fi
    done
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
}

report_environment() {
    command -v nvidia-smi >/dev/null && nvidia-smi
    command -v nvidia-smi >/dev/null &&
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    "$PY" - <<'EOF'
import hashlib, importlib, pathlib, platform, sys
import torch
print(f"python {platform.python_version()} at {sys.executable}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
for name in ("triton", "transformers", "liger_kernel", "xdist", "pytest_timeout"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '(no __version__)')}")
    except Exception as err:
        print(f"{name}: not importable ({type(err).__name__})")
import rftengine, rftengine.kernels, rftengine.bench.harness
print(f"rftengine from {pathlib.Path(rftengine.__file__).parent}, kernels from {pathlib.Path(rftengine.kernels.__file__).parent}")
try:
    from rftengine import _C  # noqa: F401
    print("rftengine._C: built")
except ImportError as err:
    print(f"rftengine._C: NOT built ({err})")
root = pathlib.Path(rftengine.__file__).parent.parent
digest = hashlib.sha256()
for d in ("rftengine", "kernels", "bench"):
    for f in sorted((root / d).rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if not rel.startswith(("rftengine/kernels/", "rftengine/bench/")):  # the fallback's links
            digest.update(rel.encode() + b"\0" + f.read_bytes())
print(f"source digest (rftengine/, kernels/, bench/ *.py): {digest.hexdigest()[:16]}")
EOF
}

# setup runs in this shell, not under `timeout` (the fallback exports PYTHONPATH); its one
# command that could hang, pip, has its own limit.
setup() {
    local t0=$SECONDS rc=0
    log "setup: install and environment"
    install_project || rc=1
    ((rc == 0)) && { report_environment || rc=1; }
    if ((rc == 0)) && [[ $QUICK == 0 ]] &&
        ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "no CUDA device visible: this script is for a GPU machine (QUICK=1 for a CPU dry run)"
        rc=1
    fi
    local status=ok
    ((rc != 0)) && status=failed
    log "setup: $status after $((SECONDS - t0))s"
    SUMMARY+=("$(printf '%-18s %-9s %6s %6s' setup "$status" "$((SECONDS - t0))" -)")
    return $rc
}

# -- steps ------------------------------------------------------------------------------------

pytest_args() {
    local args=(-q -p no:cacheprovider -rfE --durations=15 --maxfail=25)
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        args+=(--timeout=240)
    fi
    printf '%s\n' "${args[@]}"
}

# bench STEP SCRIPT ARGS...: run bench/bench_SCRIPT.py as step STEP, its JSON into OUTDIR/STEP.json
bench() {
    local step=$1 script=$2
    shift 2
    local quick=()
    [[ $QUICK != 0 ]] && quick=(--quick)
    run_step "$step" "$PY" -m "rftengine.bench.bench_$script" "${quick[@]}" --out "$OUT/$step.json" "$@"
}

main() {
    log "rftengine GPU session: steps ${STEPS[*]}; deadline ${DEADLINE_S}s; outputs in $OUT"
    cd "$REPO" || return 1
    # Compiled kernels on the GPU: never the interpreter, never a forced backend.
    unset TRITON_INTERPRET RFTENGINE_BACKEND
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/rftengine-session/triton}
    export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/rftengine-session/inductor}

    trap cleanup EXIT
    if ! setup; then
        log "setup failed: nothing else runs"
        print_summary
        return 1
    fi

    local workers=${PYTEST_WORKERS:-8}
    [[ $QUICK != 0 && -z ${PYTEST_WORKERS:-} ]] && workers=0
    local base
    mapfile -t base < <(pytest_args)
    local par=()
    if ((workers > 0)) && "$PY" -c "import xdist" 2>/dev/null; then
        par=(-n "$workers")
    fi

    local s
    for s in "${STEPS[@]}"; do
        case $s in
            tests) run_step tests "$PY" -m pytest "${base[@]}" "${par[@]}" tests/ops tests/generation tests/kernels/test_sampling_kernel.py ;;
            tests_methods) run_step tests_methods "$PY" -m pytest "${base[@]}" -m cuda tests/methods ;;
            linear_logprobs | fused_heads | logprobs | sampling | losses) bench "$s" "$s" ;;
            train_step) bench train_step train_step ;;
            generate)
                # anchor §2 (bench/README.md): batch 64 beside both transformers anchors
                local b=(--batches 64)
                [[ $QUICK != 0 ]] && b=(--batches 4)
                bench generate generate "${b[@]}" --anchors dynamic static
                ;;
            generate_batches)
                # the other batch sizes, rftengine alone (the anchors' compiles would not fit)
                local b=(--batches 1 16 256)
                [[ $QUICK != 0 ]] && b=(--batches 1 2)
                bench generate_batches generate "${b[@]}" --anchors
                ;;
            generate_long_tail)
                # issue #13: continuous batching against fixed batches and the static cache on a long-tailed mix
                bench generate_long_tail generate --long-tail
                ;;
        esac
    done
    print_summary
    return $FAILED
}

print_summary() {
    log "summary (${DEADLINE_S}s deadline, $((SECONDS - START))s used)"
    printf '%-18s %-9s %6s %6s\n' step status secs limit
    printf '%s\n' "${SUMMARY[@]}"
    if ((${#RERUN[@]})); then
        echo "not finished: ${RERUN[*]}; run them in a second call:"
        echo "  bash bench/gpu_session.sh OUTDIR ${RERUN[*]}"
    fi
    "$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    data = json.loads(path.read_text())
    c = data.get("ceilings", {})
    partial = "" if data.get("complete", True) else " (INCOMPLETE: the step stopped before its last row)"
    print(f"\n{path.name}: {data.get('suite')} on {data['environment'].get('device')}; "
          f"matmul {c.get('matmul_tflops', 0):.0f} TFLOP/s, copy {c.get('copy_gbps', 0):.0f} GB/s{partial}")
    for row in data.get("results", []):
        name = str(row.get("name") or row.get("engine"))
        keys = ("method", "shape", "op", "batch", "ms", "ms_per_step", "x_floor", "x_linear", "extra_gib", "dlogp_mean",
                "speedup", "mem_ratio", "loss_err", "max_batch_size", "wall_s", "x_no_compaction", "x_hf_static",
                "lengths_ok", "target_met", "error")
        print("  " + name + ": " + ", ".join(
            f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
            for k in keys if row.get(k) is not None
        ))
EOF
    ls -l "$OUT"
}

main 2>&1 | tee "$OUT/session.log"
exit "${PIPESTATUS[0]}"
