#!/usr/bin/env bash
# The GPU figures of README.md and docs/performance.md, on one CUDA GPU, in one command:
#
#   bash scripts/gpu_benchmarks.sh [--out DIR] [--data DIR] [--dry-run] [PART ...]
#
# PARTs, in this order by default (their time limits add up to 57 minutes):
#   tests     tests/test_cuda.py: training and decoding on the GPU (autocast dtype, checkpoints, search)
#   loss      scripts/benchmark_loss.py: the loss over bf16 logits, eager against compiled (minutes)
#   train     scripts/benchmark.py, base and big against MarianMTModel, eager, bf16 (WMT-like batches)
#   compiled  the same with --compile (torch.compile, both sides; warm-up time and graphs reported)
#   batch     base with 32,768-token batches, eager
#   recipe    the base recipe for 3 minutes, averaged, scored on Multi30k test (scripts/recipe.py)
#   decode    scripts/benchmark_decode.py on the recipe's checkpoint, greedy and beam 5 against generate()
#
# Needs `pip install -e ".[dev,bench]"`; runs $PYTHON (default python3). recipe and decode read
# Multi30k from --data (default data/multi30k; the recipe downloads it there when the files are
# missing, so on a machine without internet copy the files there first). Each part runs under its own
# time limit and writes its log (and JSON) into --out (default results/gpu-DATE); a part that fails is
# reported and the next one runs. --dry-run prints each part's command and runs nothing (no GPU
# needed; tests/test_gpu_benchmarks.py checks every printed command against its script's arguments
# and the config schema).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT="results/gpu-$(date -u +%F)"
DATA="data/multi30k"
PARTS=()
DRY_RUN=0
while (($#)); do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --data) DATA=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
        *) PARTS+=("$1"); shift ;;
    esac
done
ALL=(tests loss train compiled batch recipe decode)
((${#PARTS[@]})) || PARTS=("${ALL[@]}")
for part in "${PARTS[@]}"; do
    [[ " ${ALL[*]} " == *" $part "* ]] || { echo "unknown part: $part (one of: ${ALL[*]})"; exit 2; }
done
if ((!DRY_RUN)); then
    "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "no CUDA device"; exit 1; }
    mkdir -p "$OUT"
fi
export PYTHONUNBUFFERED=1

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
    echo "--- $name: exit $rc after $((SECONDS - start)) s"
    grep -v -i "warning" "$OUT/$name.log" | tail -n 24
}

BENCH=("$PY" scripts/benchmark.py --device cuda --precision bf16 --data synthetic --vocab-size 32000
    --warmup 10 --steps 50)
RUN_DIR=runs/base-gpu

((DRY_RUN)) || "$PY" -c "import torch; print(torch.cuda.get_device_name(), '| torch', torch.__version__,
    '| CUDA', torch.version.cuda)" | tee "$OUT/gpu.txt"
for part in "${PARTS[@]}"; do
    case "$part" in
        tests) run tests 300 "$PY" -m pytest -q -rs tests/test_cuda.py ;;
        loss)
            run loss 240 "$PY" scripts/benchmark_loss.py --device cuda --dtype bf16 --vocab 32000 \
                --tokens 16384 --warmup 3 --steps 20 --json "$OUT/loss.json"
            ;;
        train)
            for model in base big; do
                run "train-$model" 300 "${BENCH[@]}" --model "$model" --max-tokens 16384 --compare-hf \
                    --breakdown --json "$OUT/train-$model.json"
            done
            ;;
        compiled)
            for model in base big; do  # the log names the cause of any recompilation
                TORCH_LOGS=recompiles run "compiled-$model" 600 "${BENCH[@]}" --model "$model" \
                    --max-tokens 16384 --compare-hf --compile --json "$OUT/compiled-$model.json"
            done
            ;;
        batch)
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
