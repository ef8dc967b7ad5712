#!/usr/bin/env bash
# Checks the course's CUDA path on one GPU and writes every figure into OUT (at most 8.5 minutes):
#
#   bash scripts/gpu_check.sh OUT                 on a CUDA machine
#   bash scripts/gpu_check.sh --dry-run OUT       the script itself, on a CPU, at smoke sizes
#   bash scripts/gpu_check.sh [--dry-run] --only env,pretrain OUT     some steps only
#
# Steps, in order (each one's output goes to OUT/<step>.log, its figures to OUT/<step>.json or .txt):
#   env       python, torch, CUDA, the GPU's name and compute capability, the precision "auto" picks
#   tests     tests/test_device.py and tests/test_train.py (their CUDA cases run only on a GPU)
#   bench     python -m minigpt bench --device cuda (each variant alone on the device)
#   pretrain  the pretraining recipe in bf16 and fp32 on the device against a CPU fp32 reference,
#             then the full recipe on the device through get_pretrained (cached for the lab step)
#   chapters  chapters 05, 06 and 08 in smoke mode on the device, from an empty cache
#   lab       one fine-tuning run of the lab on the device (the full lab settings)
# Every step runs even when an earlier one failed; the summary lists each step's status and the
# script exits with 1 when any failed. MINIGPT_CACHE points into OUT, so nothing outside it is used.
set -u

DRY=0
ONLY="env,tests,bench,pretrain,chapters,lab"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1; shift ;;
        --only) ONLY="$2"; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [ $# -ne 1 ]; then
    echo "usage: bash scripts/gpu_check.sh [--dry-run] [--only STEP,...] OUT" >&2
    exit 2
fi
OUT="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 2
PYTHON="${PYTHON:-python}"

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    SMOKE=--smoke
    BENCH_SIZE=--smoke
    STEPS=""          # the smoke recipe's own 30 steps
    SCALE=4           # a CPU of a few cores is that much slower than a GPU machine at all of it
else
    DEVICE=cuda
    SMOKE=""
    BENCH_SIZE=""
    STEPS="--steps 300"   # long enough for the losses to separate, short enough for the CPU run
    SCALE=1
    if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu_check.sh: torch sees no CUDA device here; use --dry-run on a CPU" >&2
        exit 2
    fi
fi
export MINIGPT_CACHE="$OUT/cache"
export MPLBACKEND=Agg
mkdir -p "$MINIGPT_CACHE"

declare -a SUMMARY=()
FAILED=0
wants() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
step() {  # step NAME LIMIT_SECONDS COMMAND...: run, log, time, record the status
    local name="$1" limit=$(($2 * SCALE))
    shift 2
    wants "$name" || return 0
    echo "== $name ($*)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    tail -n 5 "$OUT/$name.log"
    SUMMARY+=("$name: exit $rc in ${took}s")
    [ "$rc" = 0 ] || FAILED=1
}

# Limits in seconds on a GPU machine (times SCALE on a CPU): 510 s in all, 6-8 minutes expected.
step env 30 "$PYTHON" scripts/gpu_check.py env "$OUT" --device "$DEVICE"
step tests 90 "$PYTHON" -m pytest tests/test_device.py tests/test_train.py -q -rs -p no:cacheprovider -m "not slow"
step bench 60 bash -o pipefail -c "\"$PYTHON\" -m minigpt bench $BENCH_SIZE --device $DEVICE --no-progress | tee \"$OUT/bench.txt\""
# shellcheck disable=SC2086 # STEPS and SMOKE are option lists or empty
step pretrain 120 "$PYTHON" scripts/gpu_check.py pretrain "$OUT" --device "$DEVICE" $SMOKE $STEPS
# The chapters start from an empty cache of their own: they train their base themselves.
# shellcheck disable=SC2086
step chapters 150 env MINIGPT_CACHE="$OUT/cache-chapters" "$PYTHON" scripts/gpu_check.py chapters "$OUT" --device "$DEVICE" $SMOKE
# shellcheck disable=SC2086
step lab 60 "$PYTHON" scripts/gpu_check.py lab "$OUT" --device "$DEVICE" $SMOKE

{
    echo "gpu_check.sh $([ "$DRY" = 1 ] && echo '--dry-run ')on $(hostname) at $(date -u +%FT%TZ)"
    for line in "${SUMMARY[@]}"; do echo "  $line"; done
} | tee "$OUT/summary.txt"
exit "$FAILED"
