#!/usr/bin/env bash
# ZeRO-3 against ZeRO-2 on one machine in one go; results under $OUT:
#   bash examples/zero3_benchmark.sh
# 1. check: fp32, same seed and data, ZeRO-2 vs ZeRO-3 (ds_configs/zero3.json as shipped), tied and untied
#    embeddings, on 1 GPU and on $GPUS: losses and gradient norms of every iteration must agree to $RTOL
#    (tools/compare_losses.py), and ZeRO-2 on 1 vs $GPUS GPUs is printed beside them as the round-off reference.
#    The runs are independent and untimed, so they run side by side.
# 2. speed: the benchmark's full training step (bf16) for every preset:micro-batch in $SPEED, on each process count
#    in $NPROCS, for every DeepSpeed config[:compile scope] in $CONFIGS, each in its own fresh process, one at a
#    time; tools/zero_stage_table.py then sets each ZeRO-3 row against ZeRO-2 with the same shape and compile mode.
# Environment: GPUS (2), OUT, STAGES ("check speed"), CHECK_PRESET (125M), CHECK_ITERS (30), RTOL (1e-5),
# VOCAB (32000), SPEED ("125M:16 1B:8"), NPROCS ("1 $GPUS"), CONFIGS ("ds_configs/zero2.json ds_configs/zero3.json"),
# SEQ (2048), STEPS (8), WARMUP (3). Exits 1 if a check failed (after running everything asked for).
set -euo pipefail
GPUS=${GPUS:-2}
OUT=${OUT:-runs/zero3_benchmark}
STAGES=${STAGES:-check speed}
CHECK_PRESET=${CHECK_PRESET:-125M}
CHECK_ITERS=${CHECK_ITERS:-30}
RTOL=${RTOL:-1e-5}
VOCAB=${VOCAB:-32000}
SPEED=${SPEED:-125M:16 1B:8}
NPROCS=${NPROCS:-1 $GPUS}
CONFIGS=${CONFIGS:-ds_configs/zero2.json ds_configs/zero3.json}
SEQ=${SEQ:-2048}
mkdir -p "$OUT"
failed=0

port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

launch() {  # launch NPROC MODULE ARGS...: one process on the first GPU, or NPROC ranks on the first NPROC GPUs
  local nproc=$1 module=$2
  shift 2
  if [ "$nproc" = 1 ]; then
    CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} python -m "$module" "$@"
  else
    python -m torch.distributed.run --nproc-per-node "$nproc" --master-port "$(port)" -m "$module" "$@"
  fi
}

case " $STAGES " in *" check "*)
  data="$OUT/check/data"
  python tools/synthetic_data.py --output-prefix "$data" --tokens $(( CHECK_ITERS * 8 * 257 * 2 )) \
    --vocab-size "$VOCAB" --kind progressions --mean-doc-length 200
  pids=()
  for tie in tied untied; do
    for nproc in 1 "$GPUS"; do
      for zero in 2 3; do
        run="$OUT/check/${tie}_${nproc}gpu_zero$zero" untie=()
        if [ "$tie" = untied ]; then untie=(--untie-embeddings); fi
        # Global batch 8 of micro-batches of 4: gradient accumulation on one GPU, none on two.
        launch "$nproc" megatron_mobilellm.pretrain --model-size "$CHECK_PRESET" --vocab-size "$VOCAB" \
          --data-path "$data" --data-cache-path "$run/cache" --seq-length 256 --micro-batch-size 4 \
          --global-batch-size 8 --train-iters "$CHECK_ITERS" --lr 1e-3 --lr-warmup-iters 5 --fp32 \
          --attention-backend eager --num-workers 0 --eval-iters 0 --log-interval 1 \
          --deepspeed_config "ds_configs/zero$zero.json" --tensorboard-dir "$run/tb" \
          ${untie[@]+"${untie[@]}"} >"$run.log" 2>&1 &
        pids+=($!)
      done
    done
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  for tie in tied untied; do
    for nproc in 1 "$GPUS"; do
      echo "== $tie, $nproc GPU(s): ZeRO-2 (a) vs ZeRO-3 (b), fp32" | tee -a "$OUT/check.txt"
      python tools/compare_losses.py "$OUT/check/${tie}_${nproc}gpu_zero2/tb" "$OUT/check/${tie}_${nproc}gpu_zero3/tb" \
        --tag train/loss --tag train/grad_norm --rtol "$RTOL" 2>&1 | tee -a "$OUT/check.txt" || failed=1
    done
    # The noise floor: the same stage on 1 and on $GPUS GPUs differs only in how gradients are summed.
    echo "== reference, $tie: ZeRO-2 on 1 GPU (a) vs on $GPUS GPUs (b), fp32" | tee -a "$OUT/check.txt"
    python tools/compare_losses.py "$OUT/check/${tie}_1gpu_zero2/tb" "$OUT/check/${tie}_${GPUS}gpu_zero2/tb" \
      --tag train/loss --tag train/grad_norm | tee -a "$OUT/check.txt"
  done ;;
esac

case " $STAGES " in *" speed "*)
  for shape in $SPEED; do
    preset=${shape%%:*} micro=${shape##*:}
    for nproc in $NPROCS; do
      for entry in $CONFIGS; do
        config=${entry%%:*} scope=${entry#"$config"}
        name="${preset}_mb${micro}_${nproc}gpu_$(basename "$config" .json)${scope/:/_}"
        echo "== $name"
        launch "$nproc" megatron_mobilellm.benchmark --presets "$preset" --micro-batch-sizes "$micro" \
          --seq-length "$SEQ" --steps "${STEPS:-8}" --warmup "${WARMUP:-3}" --deepspeed_config "$config" \
          --baseline --json "$OUT/$name.json" ${scope:+--compile "${scope#:}"} || failed=1
      done
    done
  done
  shopt -s nullglob
  results=("$OUT"/*.json)
  if [ ${#results[@]} -gt 0 ]; then python tools/zero_stage_table.py "${results[@]}" | tee "$OUT/table.md"; fi ;;
esac
exit "$failed"
