#!/usr/bin/env bash
# The whole job on a laptop-sized default, CPU or GPU, nothing downloaded:
#   corpus from the standard library → SentencePiece tokenizer → jsonl shards → .bin/.idx → 2-rank DeepSpeed
#   ZeRO-2 training with validation + TensorBoard + checkpoint → Hugging Face export → a generated sample.
#   bash examples/quickstart.sh
# Environment: QUICKSTART_DIR (default runs/quickstart), QUICKSTART_ITERS (default 600), QUICKSTART_MB (corpus MB).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
DIR=${QUICKSTART_DIR:-runs/quickstart}
ITERS=${QUICKSTART_ITERS:-600}
MB=${QUICKSTART_MB:-3}
EVAL_INTERVAL=$(( ITERS / 5 > 0 ? ITERS / 5 : 1 ))
rm -rf "$DIR" && mkdir -p "$DIR"
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NPROC=$(python3 -c "import torch; print(min(2, torch.cuda.device_count()))"); PRECISION=--bf16
else
  NPROC=2; PRECISION=--fp32; export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
fi
# The launcher starts ranks in this directory; DeepSpeed exports ./.deepspeed_env's variables to them.
echo "DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}" > "$DIR/.deepspeed_env"

echo "== 1-3. corpus, tokenizer and jsonl shards"
python3 examples/quickstart_data.py corpus --out "$DIR/data" --mb "$MB"
python3 tools/preprocess_jsonl.py --input "$DIR/data/jsonl" --output-prefix "$DIR/data/stdlib" --workers 2 \
  --vocab-size 4096

echo "== 4. training: tiny MobileLLM, $NPROC ranks, ZeRO-2, $ITERS iterations"
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29517}" \
  --module megatron_mobilellm.pretrain \
  --model-size tiny --vocab-size 4096 --data-path "$DIR/data/stdlib" --split 949,50,1 --seq-length 256 \
  --micro-batch-size 8 --global-batch-size 32 --train-iters "$ITERS" --lr 2e-3 --min-lr 2e-4 \
  --lr-warmup-iters $(( ITERS / 20 )) --deepspeed_config ds_configs/zero2.json $PRECISION \
  --eval-interval "$EVAL_INTERVAL" --eval-iters 4 --log-interval 20 --num-workers 0 \
  --save "$DIR/checkpoints" --tensorboard-dir "$DIR/tensorboard" 2>&1 | grep -v -E "Warning|warn\(|^\s*$"

echo "== 5. export to Hugging Face and generate with transformers"
python3 tools/convert_checkpoint_to_hf.py --checkpoint "$DIR/checkpoints" --output "$DIR/hf" \
  --tokenizer-model "$DIR/data/tokenizer.model" --dtype fp32 --verify
python3 tools/generate.py --hf "$DIR/hf" --prompt "Return the number of" --max-new-tokens 40 --temperature 0.7 --top-p 0.9
python3 examples/quickstart_data.py plot --tensorboard-dir "$DIR/tensorboard" --output "$DIR/loss.png"

echo "== 6. where everything is"
cat <<SUMMARY
  data:        $DIR/data/jsonl (shards), $DIR/data/stdlib.bin/.idx, $DIR/data/tokenizer.model
  checkpoint:  $DIR/checkpoints (latest: $(cat "$DIR/checkpoints/latest"))
  export:      $DIR/hf  (AutoModelForCausalLM.from_pretrained("$DIR/hf"))
  loss curve:  $DIR/loss.png
  tensorboard: tensorboard --logdir $DIR/tensorboard
  wall time:   $(( $(date +%s) - start )) s
SUMMARY
