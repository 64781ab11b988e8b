#!/usr/bin/env bash
# The GPU check of torch-sttp: one script, one report file, figures rather than verdicts.
#
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--report PATH]
#
# Sections: the environment; the tests marked `cuda` (today: CUDA-graph capture and replay of a training step);
# benchmarks/frames.py in float32 and bfloat16; benchmarks/weights.py (operator calls and the weight path against
# its three-GEMM floor); a converted WRN-28-10 training step and an SNGAN-32 D + G step against dense
# (benchmarks/gpu_steps.py steps); the CUDA kernels of one converted training step (gpu_steps.py kernels).
# Every section runs under a time limit and the report lists the ones that failed; on a single GPU the whole
# check takes about 5 minutes (limits add up to 8; with --device cpu they are three times as long: a CPU smoke
# run on a shared machine is far slower than the GPU they are sized for). It needs only the project installed
# (`pip install -e .` with torch present); the test section also needs pytest and is reported as skipped without it.
#
# The report goes to --report PATH, else to $OUT/gpu_check_report.txt when $OUT is set, else to
# ./gpu_check_report.txt. CI runs `--device cpu --quick` as a smoke test (tests/test_weight_path.py).
set -u

DEVICE=cuda
QUICK=0
REPORT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --report) REPORT="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu" >&2; exit 2 ;; esac

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python}"
if [ -z "$REPORT" ]; then
    if [ -n "${OUT:-}" ]; then REPORT="$OUT/gpu_check_report.txt"; else REPORT="$PWD/gpu_check_report.txt"; fi
fi
mkdir -p "$(dirname "$REPORT")"
: > "$REPORT"
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
FAILED=""
START=$(date +%s)
LIMIT_SCALE=1
[ "$DEVICE" = cpu ] && LIMIT_SCALE=3

# section NAME LIMIT_SECONDS COMMAND...: runs the command, its output into the report, under a time limit
section() {
    local name="$1" limit=$(( $2 * LIMIT_SCALE ))
    shift 2
    local t0=$(date +%s)
    echo "== $name" | tee -a "$REPORT"
    timeout "$limit" "$@" >> "$REPORT" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        echo "-- $name: ok (${dt} s)" | tee -a "$REPORT"
    else
        [ $rc -eq 124 ] && echo "(stopped at the ${limit} s limit)" >> "$REPORT"
        echo "-- $name: FAILED, exit status $rc (${dt} s)" | tee -a "$REPORT"
        FAILED="$FAILED [$name]"
    fi
    echo >> "$REPORT"
}

if [ "$QUICK" = 1 ]; then
    FRAMES_ARGS=(--reps 2 --no-hprod --quick --budget 5)
    WEIGHTS_ARGS=(--models sngan32-d --ranks 16 --quick)
    STEPS_ARGS=(--quick)
    KERNEL_ARGS=(--quick)
else
    FRAMES_ARGS=(--reps 30 --quick)
    WEIGHTS_ARGS=()
    STEPS_ARGS=()
    KERNEL_ARGS=()
fi

section "environment" 60 "$PY" -c "
import platform, torch, torch_sttp
print('python', platform.python_version(), '| torch', torch.__version__, '| torch_sttp from', torch_sttp.__file__)
print('device: $DEVICE', '| cuda available:', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu:', p.name, '| memory %.0f GiB' % (p.total_memory / 2**30), '| capability', '%d.%d' % (p.major, p.minor))
if '$DEVICE' == 'cuda' and not torch.cuda.is_available():
    raise SystemExit('CUDA requested but not available')
"

if "$PY" -c "import pytest" 2>/dev/null; then
    CUDA_TESTS=$(grep -l "mark.cuda" tests/test_*.py | tr '\n' ' ')
    # exit status 5: no test selected (none marked cuda in these files); skipped tests (no GPU) are fine
    section "tests marked cuda" 240 bash -c "'$PY' -m pytest -q -m cuda -p no:cacheprovider -rs $CUDA_TESTS; rc=\$?; [ \$rc -eq 5 ] && rc=0; exit \$rc"
else
    echo "== tests marked cuda" >> "$REPORT"
    echo "-- tests marked cuda: skipped (pytest is not installed: pip install pytest)" | tee -a "$REPORT"
    echo >> "$REPORT"
fi

section "frames float32" 120 "$PY" benchmarks/frames.py --device "$DEVICE" --dtype float32 "${FRAMES_ARGS[@]}"
section "frames bfloat16" 120 "$PY" benchmarks/frames.py --device "$DEVICE" --dtype bfloat16 "${FRAMES_ARGS[@]}"
section "weights" 180 "$PY" benchmarks/weights.py --device "$DEVICE" "${WEIGHTS_ARGS[@]}"
section "training steps" 90 "$PY" benchmarks/gpu_steps.py steps --device "$DEVICE" "${STEPS_ARGS[@]}"
section "kernels of one converted step" 60 "$PY" benchmarks/gpu_steps.py kernels --device "$DEVICE" "${KERNEL_ARGS[@]}"

{
    echo "== summary"
    echo "device: $DEVICE, quick: $QUICK, total $(( $(date +%s) - START )) s"
    echo "figures, not verdicts: the TARGET lines' PASS/FAIL are CPU goals (on a GPU both sides are launch-bound)"
    echo "failed sections: ${FAILED:-none}"
} | tee -a "$REPORT"
echo "report: $REPORT"
[ -z "$FAILED" ]
