#!/usr/bin/env bash
# Measure one multi-GPU node in one go and write the results under $OUT:
#   bash examples/node_benchmark.sh                       # all 8 GPUs of this node
# 1. scaling: the seed's shapes (125M and 350M, micro-batch 32, seq 2048, bf16) under ZeRO-1, 2 and 3, timed on one
#    GPU and on all GPUs with the same per-GPU micro-batch; tools/scaling_table.py pairs them (efficiency).
# 2. large: the 1B and 1.5B presets under ZeRO-2 and ZeRO-3 on all GPUs (tokens/s, MFU, memory per GPU).
# 3. resume: a real training run (synthetic learnable data) saved by all GPUs halfway, resumed on $FEWER GPUs,
#    its losses compared with an uninterrupted run (tools/compare_losses.py).
# Environment: GPUS (8), FEWER (2), OUT, STAGES ("scaling large resume"), PRESETS ("125M 350M"), MICRO_BATCH (32),
# LARGE_PRESETS ("1B 1.5B"), LARGE_MICRO_BATCH (8), ZEROS ("1 2 3"), SEQ (2048), STEPS (10), WARMUP (4),
# RESUME_PRESET (125M), RESUME_ITERS (60), VOCAB (32000), MASTER_PORT (29500, the launcher's), FAST ("on":
# whole-decoder compile and CUDA graphs; ZeRO-3 compiles block by block without graphs, the resume runs without
# graphs; empty: eager, e.g. on CPU).
set -euo pipefail
GPUS=${GPUS:-8}
FEWER=${FEWER:-2}
OUT=${OUT:-runs/node_benchmark}
STAGES=${STAGES:-scaling large resume}
PRESETS=${PRESETS:-125M 350M}
MICRO_BATCH=${MICRO_BATCH:-32}
LARGE_PRESETS=${LARGE_PRESETS-1B 1.5B}
LARGE_MICRO_BATCH=${LARGE_MICRO_BATCH:-8}
ZEROS=${ZEROS:-1 2 3}
SEQ=${SEQ:-2048}
RESUME_PRESET=${RESUME_PRESET:-125M}
RESUME_ITERS=${RESUME_ITERS:-60}
FAST=${FAST-on}
PORT=${MASTER_PORT:-29500}
mkdir -p "$OUT"

speed_flags() {  # speed_flags ZERO [graphs]: the fastest options each ZeRO stage allows
  if [ -z "$FAST" ]; then return; fi
  if [ "$1" = 3 ]; then echo --compile blocks; else echo --compile decoder ${2:+--cuda-graphs}; fi
}

bench() {  # bench NPROC ZERO JSON PRESETS... (micro-batch from $MB)
  local nproc=$1 zero=$2 json=$3
  shift 3
  local args=(--presets "$@" --micro-batch-sizes "$MB" --seq-length "$SEQ" --steps "${STEPS:-10}"
              --warmup "${WARMUP:-4}" --deepspeed_config "ds_configs/zero$zero.json" --baseline --json "$json")
  # shellcheck disable=SC2046
  if [ "$nproc" = 1 ]; then
    CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} python -m megatron_mobilellm.benchmark "${args[@]}" \
      $(speed_flags "$zero" graphs)
  else
    deepspeed --num_gpus "$nproc" --master_port "$PORT" --module megatron_mobilellm.benchmark "${args[@]}" \
      $(speed_flags "$zero" graphs)
  fi
}

case " $STAGES " in *" scaling "*)
  MB=$MICRO_BATCH
  for zero in $ZEROS; do
    # shellcheck disable=SC2086
    bench 1 "$zero" "$OUT/scaling_zero${zero}_1gpu.json" $PRESETS
    # shellcheck disable=SC2086
    bench "$GPUS" "$zero" "$OUT/scaling_zero${zero}_${GPUS}gpu.json" $PRESETS
  done ;;
esac

case " $STAGES " in *" large "*)
  MB=$LARGE_MICRO_BATCH
  if [ -n "$LARGE_PRESETS" ]; then
    for zero in 2 3; do
      # shellcheck disable=SC2086
      bench "$GPUS" "$zero" "$OUT/large_zero${zero}_${GPUS}gpu.json" $LARGE_PRESETS
    done
  fi ;;
esac

case " $STAGES " in *" resume "*)
  data="$OUT/resume/data"
  tokens=$(( RESUME_ITERS * MICRO_BATCH * GPUS * (SEQ + 1) * 11 / 10 ))
  python tools/synthetic_data.py --output-prefix "$data" --tokens "$tokens" --vocab-size "${VOCAB:-32000}" \
    --kind progressions
  half=$(( RESUME_ITERS / 2 ))
  # No CUDA graphs here: on fewer ranks the same global batch needs gradient accumulation, which they refuse.
  # shellcheck disable=SC2046
  train=(--model-size "$RESUME_PRESET" --vocab-size "${VOCAB:-32000}" --data-path "$data" --seq-length "$SEQ"
         --micro-batch-size "$MICRO_BATCH" --global-batch-size $(( MICRO_BATCH * GPUS ))
         --train-iters "$RESUME_ITERS" --lr 5e-4 --lr-warmup-iters 5 --deepspeed_config ds_configs/zero2.json
         --eval-iters 0 --log-interval 1 --save-interval "$half" $(speed_flags 2))
  run() {
    local n=$1
    shift
    deepspeed --num_gpus "$n" --master_port "$PORT" --module megatron_mobilellm.pretrain "${train[@]}" "$@"
  }
  run "$GPUS" --save "$OUT/resume/ref" --load "$OUT/resume/ref" --tensorboard-dir "$OUT/resume/tb_ref"
  run "$GPUS" --save "$OUT/resume/ckpt" --load "$OUT/resume/ckpt" --exit-interval "$half" \
    --tensorboard-dir "$OUT/resume/tb_first_half"
  run "$FEWER" --save "$OUT/resume/ckpt" --load "$OUT/resume/ckpt" --tensorboard-dir "$OUT/resume/tb_fewer"
  python tools/compare_losses.py "$OUT/resume/tb_ref" "$OUT/resume/tb_fewer" | tee "$OUT/resume/compare.txt" ;;
esac

shopt -s nullglob
results=("$OUT"/*.json)
if [ ${#results[@]} -gt 0 ]; then python tools/scaling_table.py "${results[@]}" | tee "$OUT/table.md"; fi
