#!/usr/bin/env bash
# The GPU check in one call (at most 8 minutes): the environment, correctness
# on the GPU against the CPU, a training step against PyTorch CUDA, the limit
# against torchdiffeq, and the largest convergence study that fits.
#
#     bash benchmarks/device_check.sh OUT [--dry-run]     # from the repository root
#
# Writes at most 8 files under OUT: env.json, correctness.json, speed.json,
# limit.json, study.json (one per part, see benchmarks/device_check.py) and
# log.txt (every part's output). Each part runs under its own `timeout`; a part
# that fails or runs out of time is recorded as such and the next one runs. The
# script exits 0 after a summary line per part. `--dry-run`: every part at tiny
# sizes (about a minute on a CPU, with JAX_PLATFORMS=cpu).
set -u

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/device_check.sh OUT [--dry-run]" >&2
    exit 2
fi
OUT=$1
shift
DRY=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY="--dry-run" ;;
        *) echo "unknown argument: $arg (usage: device_check.sh OUT [--dry-run])" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/log.txt"
: >"$LOG"
PY=${PYTHON:-python}

# JAX must not take the GPU's memory for itself: PyTorch runs on it too
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1

start=$(date +%s)
if [ -z "$DRY" ]; then
    # the machine has no network: the image holds the dependencies (and, with
    # luck, the build backend); a failed installation costs at most 40 s, and
    # the source tree is on the path anyway
    timeout 20 "$PY" -m pip install --no-deps --no-build-isolation -q -e . >>"$LOG" 2>&1 ||
        PIP_RETRIES=0 timeout 20 "$PY" -m pip install --no-deps -q -e . >>"$LOG" 2>&1 ||
        echo "pip install -e . failed (see log.txt): running from the source tree" | tee -a "$LOG"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# part:budget in seconds: 400 s, with at most 40 s of installation, 5 s of
# grace per part and the bookkeeping under 8 minutes (480 s)
if [ -z "$DRY" ]; then
    PARTS="env:15 correctness:95 speed:135 limit:45 study:110"
else
    # generous: a CPU shared with other work compiles slowly
    PARTS="env:60 correctness:180 speed:120 limit:90 study:300"
fi
for pb in $PARTS; do
    part=${pb%%:*}
    budget=${pb##*:}
    echo "=== $part (budget $budget s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
    timeout -k 5 "$budget" "$PY" -m benchmarks.device_check "$OUT" --part "$part" \
        --budget "$budget" $DRY >>"$LOG" 2>&1
    rc=$?
    echo "=== $part: exit status $rc" | tee -a "$LOG"
    "$PY" -m benchmarks.device_check "$OUT" --finish "$part" "$rc" >>"$LOG" 2>&1
done
echo "=== summary ($(($(date +%s) - start)) s)" | tee -a "$LOG"
"$PY" -m benchmarks.device_check "$OUT" --summary 2>>"$LOG" | tee -a "$LOG"
exit 0
