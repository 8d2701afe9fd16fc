#!/usr/bin/env bash
# The device check of docs/GPU.md in one script: the embedded base (tiny16) and the tiny random
# Idefics3 and Qwen2-VL (build-tiny) through `run --method leaml` on DEVICE (default cuda), then, where the
# machine has two or more GPUs (or with DEVICE=cpu: two CPU processes), the same method under
# `accelerate launch` with 2 processes and as a background job with --processes 2; where vLLM
# is installed, the pseudo stage with --engine hf and --engine vllm on one generator (the same
# pairs?). Prints one line per command (seconds, accuracy, the device and dtype each load
# reported) and a markdown table for docs/GPU.md at the end.
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
"$PY" -m leaml build-tiny --arch qwen2_vl --out "$WORK/qwen2_vl" >/dev/null

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
one qwen2_vl "$WORK/qwen2_vl"
GPUS=0
if [ "$DEVICE" != cpu ]; then
    GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
fi
if [ "$DEVICE" = cpu ] || [ "$GPUS" -ge 2 ]; then
    two tiny16 tiny16
    two idefics3 "$WORK/idefics3"
    two qwen2_vl "$WORK/qwen2_vl"
fi

job2() {  # job2 NAME BASE: run --background --processes 2 (it starts a worker), until it ends
    local t0 id dev=()
    [ "$DEVICE" = cpu ] && dev=(--device cpu)
    t0=$(date +%s%N)
    id=$("$PY" -m leaml --home "$HOME_DIR" run --project demo --method leaml --label-fraction 0.25 \
        --base-model "$2" "${dev[@]}" --background --processes 2 "${KNOBS[@]}" | tail -n 1)
    while "$PY" -m leaml --home "$HOME_DIR" jobs show "$id" --json | "$PY" -c \
            'import json,sys; sys.exit(json.load(sys.stdin)["status"] not in ("queued", "running"))'; do
        sleep 2
    done
    "$PY" -m leaml --home "$HOME_DIR" jobs show "$id" --json >"$WORK/$1-job.out"
    echo "job $id: $("$PY" -c 'import json,sys; j=json.load(sys.stdin); print(j["status"], "-", j["message"])' <"$WORK/$1-job.out")"
    ROWS+=("| \`run --background --processes 2 --base-model $1\` (job $id) | $(since "$t0") | see jobs show | log: $HOME_DIR/jobs |")
}

engines() {  # where vLLM is installed: one generator, its pseudo pairs by hf and by vllm
    local gen t0 note
    cp -r "$HOME_DIR" "$WORK/hf"
    gen=$("$PY" -m leaml --home "$WORK/hf" generator --project demo --label-fraction 0.25 \
        --base-model tiny16 --device "$DEVICE" "${KNOBS[@]}" 2>/dev/null | tail -n 1)
    cp -r "$WORK/hf" "$WORK/vllm"  # the same generator run in both (no writer is left)
    for engine in hf vllm; do
        t0=$(date +%s%N)
        note=ok
        "$PY" -m leaml --home "$WORK/$engine" pseudo --project demo --generator-run "$gen" \
            --engine "$engine" --device "$DEVICE" "${KNOBS[@]}" --json \
            >"$WORK/pseudo-$engine.out" 2>"$WORK/pseudo-$engine.err" || note=$(tail -n 1 "$WORK/pseudo-$engine.err")
        echo "pseudo --engine $engine: $(since "$t0")s, $note, $(tail -n 1 "$WORK/pseudo-$engine.out")"
        ROWS+=("| \`pseudo --engine $engine\` (tiny16 generator $gen) | $(since "$t0") | - | ${note//|/ } |")
    done
    "$PY" - "$gen" "$WORK/hf/leaml.db" "$WORK/vllm/leaml.db" <<'PYEOF'
import sqlite3, sys
q = "SELECT image_id, question, answer, confidence FROM qa WHERE origin = 'pseudo' AND gen_run_id = ?"
a, b = ({r[:2]: r[2:] for r in sqlite3.connect(p).execute(q, [int(sys.argv[1])])} for p in sys.argv[2:])
same = [k for k in a if k in b and a[k][0] == b[k][0]]
diff = max((abs(a[k][1] - b[k][1]) for k in same), default=0.0)
print(f"pairs hf {len(a)}, vllm {len(b)}, same answer {len(same)}, "
      f"max confidence difference there {diff:.4f}")
PYEOF
}

job2 tiny16 tiny16
if "$PY" -c 'import vllm' 2>/dev/null; then
    engines
else
    echo "vLLM not installed: pseudo --engine vllm skipped"
fi

echo
echo "| command | seconds | accuracy | loads (count, device, dtype) |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo "(logs in $WORK)"
