#!/usr/bin/env bash
# Streaming recall at one budget (1,024 keys per kv head per layer) for every policy family, one
# `streamattn recall` run per policy (OUTDIR/<policy>/; finished ones are skipped), then one table.
# Usage: bash benchmarks/compression_recall.sh [MODEL] [PROFILE] [OUTDIR] [TRIALS] [DISTANCES]
# Compressed: budget 960 + every 64 (at most 1,024 held). Per-head: the best 20% heads (by the
# profile) keep Compressed(4, 64, 3008, snapkv, 64) (at most 3,072), the others SinkWindow(4, 508):
# 0.2 * 3072 + 0.8 * 512 = 1,024 keys per head on average. Gemma 3 (gemma3-270m) has one kv head on
# each of its 3 global layers (the policy's layers): its best head keeps Compressed(4, 64, 1984,
# snapkv, 64) (at most 2,048), the other two SinkWindow(4, 508): (2048 + 2 * 512) / 3 = 1,024.
set -euo pipefail
MODEL=${1:-smollm2}
PROFILE=${2:-profiles/smollm2.json}
OUT=${3:-runs/recall_compression_$MODEL}
TRIALS=${4:-8}
DISTANCES=${5:-256,1K,4K}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
C="sinks=4,window=64,budget=960,every=64"
case "$MODEL" in
  gemma3-270m) PER_HEAD="heads=1|sinks=4,window=64,budget=1984,score=snapkv,every=64|sinks=4,window=508" ;;
  *) PER_HEAD="heads=0.2|sinks=4,window=64,budget=3008,score=snapkv,every=64|sinks=4,window=508" ;;
esac
POLICIES=(
  "sinks=4,window=1020"
  "$C,score=tova"
  "$C,score=snapkv"
  "$PER_HEAD"
  "$C,score=qfilters"
  "$C,score=h2o"
  "$C,score=knorm"
  "full"
)
for spec in "${POLICIES[@]}"; do
  name=$(echo "$spec" | tr ',=:|' '_+-~')
  [ -f "$OUT/$name/recall.csv" ] && continue
  .venv/bin/streamattn recall --model "$MODEL" --profile "$PROFILE" --trials "$TRIALS" --distances "$DISTANCES" \
    --out "$OUT/$name" --policy "$spec"
done
.venv/bin/python benchmarks/recall_table.py "$OUT"/*/recall.csv
