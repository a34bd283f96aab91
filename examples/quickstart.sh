#!/usr/bin/env bash
# Quickstart on one CPU (or GPU) process, ~1-3 minutes on a laptop:
#   1. pretrain the tiny hybrid (conf/tiny.yaml) on the synthetic reasoning corpus
#   2. evaluate the checkpoint (validation loss, greedy answer accuracy)
#   3. export it to a Hugging Face nemotron_h folder (loads with transformers, no custom code)
#   4. import that folder back into a Megatron checkpoint
#   5. evaluate the imported checkpoint: same validation loss as step 2
#
# Usage (from anywhere; after `make install` or `pip install -e .[hf]`):
#   examples/quickstart.sh                 # ITERS=200 OUT=runs/quickstart
#   ITERS=400 OUT=/tmp/qs examples/quickstart.sh
# Rerunning resumes from OUT's latest checkpoint (nothing to do if ITERS were already reached).
set -euo pipefail
cd "$(dirname "$0")/.."

ITERS=${ITERS:-200}
OUT=${OUT:-runs/quickstart}
if command -v nemo-elastic >/dev/null 2>&1; then
  NE=nemo-elastic
elif [ -x .venv/bin/nemo-elastic ]; then
  NE=.venv/bin/nemo-elastic
else
  echo "nemo-elastic not found: run 'make install' (creates .venv) or 'pip install -e .[hf]'" >&2
  exit 1
fi
PY=$(dirname "$(command -v "$NE")")/python
WARMUP=$(( ITERS < 100 ? ITERS / 5 : 20 ))

echo "== 1. pretrain: conf/tiny.yaml, $ITERS iterations -> $OUT"
$NE pretrain --config conf/tiny.yaml --no-progress \
  train.iters="$ITERS" train.warmup_iters="$WARMUP" output_dir="$OUT"

echo "== 2. eval: $OUT (a run's output dir resolves to checkpoints/latest)"
$NE eval --ckpt "$OUT"

echo "== 3. export: Megatron checkpoint -> Hugging Face nemotron_h in $OUT/hf"
$NE export --ckpt "$OUT" --format hf --out "$OUT/hf" --overwrite
if "$PY" -c "import transformers" >/dev/null 2>&1; then
  "$PY" - "$OUT/hf" <<'EOF'
import sys
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(f"transformers loads it: {type(model).__name__}, "
      f"{sum(p.numel() for p in model.parameters()):,} parameters")
EOF
else
  echo "(transformers not installed: skipping the load check; pip install -e .[hf])"
fi

echo "== 4. import-hf: $OUT/hf -> $OUT/imported"
$NE import-hf "$OUT/hf" --out "$OUT/imported" --overwrite

echo "== 5. eval the imported checkpoint with the tiny recipe's data settings"
# An imported checkpoint stores default data/train sections; match conf/tiny.yaml's.
$NE eval --ckpt "$OUT/imported" \
  data.seq_length=96 data.micro_batch_size=16 data.global_batch_size=16 train.eval_iters=8
echo "done: step 5's val_loss equals step 2's (the round trip is exact in fp32)"
