#!/usr/bin/env bash
# One script that proves the GPU path on a bare single-GPU box, one line per check:
#   bash scripts/gpu_check.sh [--cpu] [--wheels DIR]
#
# Needs Python 3.12 with a CUDA build of torch. --wheels DIR installs the wheels in DIR first
# with no package index (megatron-core, transformers, tokenizers, safetensors, pytest and
# their small dependencies, brought along; no registry is reachable on such a box). Then it
# builds the csrc extension (CUDA sources included) in place, runs the CUDA kernel tests and opcheck (`gpu`-marked tests), and
# `scripts/gpu_check.py`: kernel bandwidth vs a device-to-device copy, actor log-probs (local
# spec, fp32 and bf16) vs transformers, a train step and a checkpoint save/load/step round
# trip, the NaN-gradient stop, and peak memory vs the estimate. Every check prints
# `CHECK <name> PASS|FAIL <figure>`; the exit status is 1 if any failed.
#
# --cpu runs the same checks on CPU at a tiny size (CI): the extension already built is used
# (built only when missing, without CUDA), and the CPU opcheck tests stand in for the CUDA ones.
# PYTHON selects the interpreter (default: python3).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
CPU=0
WHEELS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1 ;;
        --wheels) WHEELS="$2"; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
FAILED=0
START=$(date +%s)
check() {  # check NAME PASS|FAIL FIGURE
    printf 'CHECK %-14s %s %s\n' "$1" "$2" "$3"
    [ "$2" = PASS ] || FAILED=1
}

if [ -n "$WHEELS" ]; then
    if "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl; then
        check wheels PASS "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS"
    else
        check wheels FAIL "pip install from $WHEELS failed"
    fi
fi

if [ "$CPU" = 1 ]; then
    DEVICE=cpu
    export CTPO_CPU_MODE=on
    if "$PY" -c "import torch, ctpo_megatron._C" >/dev/null 2>&1; then  # _C needs torch loaded first
        check build PASS "--cpu: using the extension already built"
    else
        t0=$(date +%s)
        if CTPO_FORCE_CPU=1 "$PY" setup.py -q build_ext --inplace >/tmp/gpu_check_build.log 2>&1; then
            check build PASS "CPU extension built in $(( $(date +%s) - t0 )) s"
        else
            check build FAIL "see /tmp/gpu_check_build.log"
        fi
    fi
    KERNEL_TESTS=(tests/unit/test_ops_scan.py tests/unit/test_ops_ctpo_loss.py -k opcheck)
else
    DEVICE=cuda
    t0=$(date +%s)
    if "$PY" setup.py -q build_ext --inplace >/tmp/gpu_check_build.log 2>&1 \
        && "$PY" -c "import sys; from ctpo_megatron.ops import extension_backends as e; sys.exit('cuda' not in e())"; then
        check build PASS "CUDA extension built in $(( $(date +%s) - t0 )) s"
    else
        check build FAIL "no CUDA backend after the build; see /tmp/gpu_check_build.log"
    fi
    KERNEL_TESTS=(-m gpu tests/unit/test_ops_cuda.py tests/unit/test_gpu_path.py)
fi

t0=$(date +%s)
OUT=$("$PY" -m pytest -q -p no:cacheprovider -rs "${KERNEL_TESTS[@]}" 2>&1)
RC=$?
SUMMARY=$(printf '%s\n' "$OUT" | tail -n 1)
if [ $RC -eq 0 ] && ! printf '%s' "$SUMMARY" | grep -q skipped; then
    check kernel_tests PASS "$SUMMARY ($(( $(date +%s) - t0 )) s)"
else
    printf '%s\n' "$OUT" | tail -n 30
    check kernel_tests FAIL "$SUMMARY"
fi

"$PY" "$ROOT/scripts/gpu_check.py" --device "$DEVICE" 2>/tmp/gpu_check_stderr.log || FAILED=1
[ $FAILED = 0 ] || tail -n 40 /tmp/gpu_check_stderr.log >&2
echo "gpu_check.sh: $([ $FAILED = 0 ] && echo 'all checks passed' || echo 'FAILED') in $(( $(date +%s) - START )) s"
exit $FAILED
