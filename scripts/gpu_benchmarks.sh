#!/usr/bin/env bash
# The GPU figures of README.md and docs/performance.md, on one CUDA GPU, in one command:
#
#   bash scripts/gpu_benchmarks.sh [--out DIR] [--data DIR] [--dry-run] [PART ...]
#
# PARTs, in this order by default (their time limits add up to 60 minutes; each fits in 10 minutes):
#   tests          tests/test_cuda.py: training and decoding on the GPU (autocast dtype, checkpoints, search)
#   loss           scripts/benchmark_loss.py: the loss over bf16 logits, eager against compiled (minutes)
#   train-base     scripts/benchmark.py, base against MarianMTModel, eager, bf16 (WMT-like batches)
#   train-big      the same for big
#   sync-base      base with --read-every-step: what a host wait in every step costs (against train-base)
#   compiled-base  base with --compile (torch.compile, both sides; warm-up time and graphs reported)
#   compiled-big   the same for big
#   batch-base     base with 32,768-token batches, eager
#   recipe         the base recipe for 3 minutes, averaged, scored on Multi30k test (scripts/recipe.py)
#   decode         scripts/benchmark_decode.py on the recipe's checkpoint, greedy and beam 5 against generate()
# `train` and `compiled` name both of their parts.
#
# Needs `pip install -e ".[dev,bench]"` (or the packages on PYTHONPATH: the repository itself is put
# there); runs $PYTHON (default python3). recipe and decode read Multi30k from --data (default
# data/multi30k; the recipe downloads it there when the files are missing, so on a machine without
# internet copy the files there first). Each part runs under its own time limit and writes its log (and
# JSON) into --out (default results/gpu-DATE); a part that fails is reported, the next one runs, and the
# script exits with 1. --dry-run prints each part's command and runs nothing (no GPU needed;
# tests/test_gpu_benchmarks.py checks every printed command against its script's arguments and the
# config schema).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

PY=${PYTHON:-python3}
OUT="results/gpu-$(date -u +%F)"
DATA="data/multi30k"
PARTS=()
DRY_RUN=0
while (($#)); do
    case "$1" in
        --out | --data) (($# > 1)) || { echo "$1 needs a folder" >&2; exit 2; }
            if [[ $1 == --out ]]; then OUT=$2; else DATA=$2; fi
            shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
        train | compiled) PARTS+=("$1-base" "$1-big"); shift ;;
        *) PARTS+=("$1"); shift ;;
    esac
done
ALL=(tests loss train-base train-big sync-base compiled-base compiled-big batch-base recipe decode)
((${#PARTS[@]})) || PARTS=("${ALL[@]}")
for part in "${PARTS[@]}"; do
    [[ " ${ALL[*]} " == *" $part "* ]] || { echo "unknown part: $part (one of: ${ALL[*]})"; exit 2; }
done
if ((!DRY_RUN)); then
    "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "no CUDA device"; exit 1; }
    mkdir -p "$OUT"
fi
export PYTHONUNBUFFERED=1
FAILED=0

run() {  # run NAME SECONDS COMMAND...: log to $OUT/NAME.log, print its tail
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    if ((DRY_RUN)); then
        printf '%s %s' "$name" "$limit"
        printf ' %q' "$@"
        echo
        return
    fi
    echo "=== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    ((rc == 0)) || FAILED=1
    echo "--- $name: exit $rc after $((SECONDS - start)) s"
    grep -v -i "warning" "$OUT/$name.log" | tail -n 24
}

BENCH=("$PY" scripts/benchmark.py --device cuda --precision bf16 --data synthetic --vocab-size 32000
    --warmup 10 --steps 50)
# The recipe's run goes with the figures (decode, maybe a later call with the same --out, reads it);
# its checkpoints are not versioned (.gitignore).
RUN_DIR="$OUT/run-base"

((DRY_RUN)) || "$PY" -c "import torch; print(torch.cuda.get_device_name(), '| torch', torch.__version__,
    '| CUDA', torch.version.cuda)" | tee "$OUT/gpu.txt"
for part in "${PARTS[@]}"; do
    case "$part" in
        tests) run tests 300 "$PY" -m pytest -q -rs tests/test_cuda.py ;;
        loss)
            run loss 240 "$PY" scripts/benchmark_loss.py --device cuda --dtype bf16 --vocab 32000 \
                --tokens 16384 --warmup 3 --steps 20 --json "$OUT/loss.json"
            ;;
        train-base | train-big)
            run "$part" 300 "${BENCH[@]}" --model "${part#train-}" --max-tokens 16384 --compare-hf \
                --breakdown --json "$OUT/$part.json"
            ;;
        compiled-base | compiled-big)  # the log names the cause of any recompilation
            TORCH_LOGS=recompiles run "$part" 540 "${BENCH[@]}" --model "${part#compiled-}" \
                --max-tokens 16384 --compare-hf --compile --json "$OUT/$part.json"
            ;;
        sync-base)
            run sync-base 300 "${BENCH[@]}" --model base --max-tokens 16384 --read-every-step \
                --json "$OUT/sync-base.json"
            ;;
        batch-base)
            run batch-base 300 "${BENCH[@]}" --model base --max-tokens 32768 --compare-hf \
                --json "$OUT/batch-base.json"
            ;;
        recipe)
            run recipe 480 "$PY" scripts/recipe.py base "data.dir=$DATA" "run_dir=$RUN_DIR" \
                train.max_time_min=3 --average 5 --json "$OUT/recipe-base.json"
            ;;
        decode)
            run decode 300 "$PY" scripts/benchmark_decode.py --ckpt "$RUN_DIR/checkpoints/latest.pt" \
                --data-dir "$DATA" --device cuda --dtype bf16 --beams 1,5 --repeat 2 --json "$OUT/decode.json"
            ;;
    esac
done
((DRY_RUN)) || echo "logs and JSON in $OUT"
exit $FAILED
