#!/usr/bin/env bash
# The seed's MobileLLM recipe on 1×8 or N×8 GPUs:
#   bash examples/pretrain_mobilellm.sh 125M                       # one 8-GPU node
#   HOSTFILE=examples/hostfile bash examples/pretrain_mobilellm.sh 350M   # every node in the hostfile
# AdamW (0.9, 0.95, eps 1e-8), weight decay 0.1, grad clip 1.0, bf16, seq 2048, 32 sequences per GPU,
# warmup from 0 over 1000 iterations then half-cosine to 10% of the peak; peak lr 5e-4 per 8 GPUs, scaled
# linearly with the global batch (2e-3 on 4×8). Extra arguments are passed to the trainer, e.g.
# `--attention-backend fa4` for FlashAttention-4 where `pip install '.[fa4]'` works (+3–3.5 % at 125M on H200).
# Environment: DATA (data-path), OUT (run dir), HOSTFILE, MASTER_ADDR, GPUS_PER_NODE, NODES, MICRO_BATCH,
# TRAIN_ITERS, DS_CONFIG, COMPILE (decoder|blocks|empty for eager), CUDA_GRAPHS (1, the default: replay the compiled
# forward and backward as CUDA graphs where the trainer allows it — compiled, not ZeRO-3, one micro-batch per step;
# CUDA_GRAPHS=0 turns them off, e.g. with a --global-batch-size that needs gradient accumulation), DRY_RUN=1 (print
# the command only).
set -euo pipefail
SIZE=${1:?usage: pretrain_mobilellm.sh SIZE [trainer args...] (SIZE: 125M 350M 600M 1B 1.5B)}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [ -n "${HOSTFILE:-}" ]; then
  NODES=${NODES:-$(grep -cE '^[^#[:space:]]' "$HOSTFILE")}
else
  NODES=${NODES:-1}
fi
MICRO_BATCH=${MICRO_BATCH:-32}
GLOBAL_BATCH=$((MICRO_BATCH * GPUS_PER_NODE * NODES))
LR=$(python3 -c "print(5e-4 * $GLOBAL_BATCH / 256)")
MIN_LR=$(python3 -c "print(0.1 * $LR)")
DATA=${DATA:-data/mobilellm_text_document}
# ZeRO-1 was fastest on the H200 for the small presets; ZeRO-2 also shards gradients for 1B and up.
case "$SIZE" in 1B|1.5B) DEFAULT_DS=ds_configs/zero2.json ;; *) DEFAULT_DS=ds_configs/zero1.json ;; esac
DS=${DS_CONFIG:-$DEFAULT_DS}
zero3=0
grep -qE '"stage"[[:space:]]*:[[:space:]]*3' "$DS" && zero3=1
# The whole decoder compiled as one graph: 1.2x over per-block compile on thin models (docs/performance.md).
# Under ZeRO-3 eager is faster: its parameter hooks make compiled blocks recompile (86 % vs 54 % of ZeRO-2's speed
# on 2 H200s, docs/performance.md), so ZeRO-3 runs eager unless COMPILE says otherwise.
if [ "$zero3" = 1 ]; then COMPILE=${COMPILE-}; else COMPILE=${COMPILE-decoder}; fi
# CUDA graphs over the compiled decoder (docs/performance.md: +5-10 %, losses as the eager run's, validation
# included). The recipe's global batch is micro × GPUs, one micro-batch per step, which --cuda-graphs requires.
graphs=()
if [ -n "$COMPILE" ] && [ "${CUDA_GRAPHS:-1}" = 1 ] && [ "$zero3" = 0 ]; then
  graphs=(--cuda-graphs)
fi
OUT=${OUT:-runs/mobilellm-$SIZE}
if [ -n "${HOSTFILE:-}" ]; then launcher=(--hostfile "$HOSTFILE"); else launcher=(--num_gpus "$GPUS_PER_NODE"); fi
cmd=(deepspeed "${launcher[@]}" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"}
     --module megatron_mobilellm.pretrain
     --model-size "$SIZE" --data-path $DATA --split 969,30,1 --seq-length 2048
     --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "${TRAIN_ITERS:-480000}"
     --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters 1000 --lr-decay-style cosine
     --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 --bf16
     --deepspeed_config "$DS" ${COMPILE:+--compile "$COMPILE"} ${graphs[@]+"${graphs[@]}"}
     --save "$OUT/checkpoints" --load "$OUT/checkpoints" --save-interval 1000
     --eval-interval 1000 --eval-iters 10 --log-interval 10 --tensorboard-dir "$OUT/tensorboard" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
