#!/usr/bin/env bash
# The device check of docs/GPU.md in one script: the embedded base (tiny16) and the tiny random
# Idefics3 (build-tiny) through `run --method leaml` on DEVICE (default cuda), then, where the
# machine has two or more GPUs (or with DEVICE=cpu: two CPU processes), the same method under
# `accelerate launch` with 2 processes. Prints one line per command (seconds, accuracy, the
# device and dtype each load reported) and a markdown table for docs/GPU.md at the end.
#
#   bash bench/bench_gpu_check.sh                 # on a GPU machine
#   DEVICE=cpu N_TRAIN=8 bash bench/bench_gpu_check.sh   # the same path on a CPU, small
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
N_TRAIN=${N_TRAIN:-60}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/leaml-gpu-check.XXXXXX")
HOME_DIR=$WORK/home
KNOBS=(--set generator.max_qa_steps=40 --set finetune.max_steps=40 --set max_new_tokens=8)
if [ "$DEVICE" = cpu ]; then
    KNOBS=(--set generator.min_qa_steps=4 --set generator.max_qa_steps=4 --set generator.batch_size=4
           --set pseudo.k=2 --set pseudo.max_new_tokens=16 --set pseudo.chunk=3
           --set finetune.min_steps=2 --set finetune.max_steps=2 --set finetune.batch_size=4
           --set finetune.vision_warmup_epochs=0 --set max_new_tokens=4)
fi
ROWS=()

"$PY" -m leaml --home "$HOME_DIR" demo --data-only --n-train "$N_TRAIN" --n-test 4 >/dev/null
"$PY" -m leaml build-tiny --arch idefics3 --out "$WORK/idefics3" >/dev/null

since() {  # seconds since a `date +%s%N`, one decimal
    local ms=$(( ($(date +%s%N) - $1) / 1000000 ))
    echo "$((ms / 1000)).$(( (ms % 1000) / 100 ))"
}

record() {  # record NAME SECONDS OUT ERR
    local acc loads
    acc=$(tail -n 1 "$3" | "$PY" -c 'import json,sys; print(json.loads(sys.stdin.read())["accuracy"])')
    loads=$(grep -o 'on [a-z0-9:]*, torch\.[a-z0-9]*' "$4" | sort | uniq -c | tr -s ' ' | paste -sd ';' -)
    echo "$1: ${2}s, accuracy $acc, loads:$loads"
    ROWS+=("| \`$1\` | $2 | $acc | $loads |")
}

one() {  # one NAME BASE: run --method leaml in one process on DEVICE
    local t0
    t0=$(date +%s%N)
    "$PY" -m leaml --home "$HOME_DIR" run --project demo --method leaml --label-fraction 0.25 \
        --base-model "$2" --device "$DEVICE" "${KNOBS[@]}" --json >"$WORK/$1.out" 2>"$WORK/$1.err"
    record "run --method leaml --base-model $1 --device $DEVICE" "$(since "$t0")" \
        "$WORK/$1.out" "$WORK/$1.err"
}

two() {  # two NAME BASE: the same under accelerate launch, 2 processes
    local t0 env=()
    [ "$DEVICE" = cpu ] && env=(ACCELERATE_USE_CPU=1)
    t0=$(date +%s%N)
    env "${env[@]}" "$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no --main_process_ip 127.0.0.1 --main_process_port 29533 \
        -m leaml --home "$HOME_DIR" run --project demo --method leaml --label-fraction 0.25 \
        --base-model "$2" "${KNOBS[@]}" --json >"$WORK/$1-2.out" 2>"$WORK/$1-2.err"
    record "accelerate launch --num_processes 2 -m leaml run --base-model $1" "$(since "$t0")" \
        "$WORK/$1-2.out" "$WORK/$1-2.err"
}

one tiny16 tiny16
one idefics3 "$WORK/idefics3"
GPUS=0
if [ "$DEVICE" != cpu ]; then
    GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
fi
if [ "$DEVICE" = cpu ] || [ "$GPUS" -ge 2 ]; then
    two tiny16 tiny16
    two idefics3 "$WORK/idefics3"
fi

echo
echo "| command | seconds | accuracy | loads (count, device, dtype) |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo "(logs in $WORK)"
