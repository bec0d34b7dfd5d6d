#!/usr/bin/env bash
# Perplexity per segment over 100K tokens of Emma (SmolLM2 by default), one budget for all:
# 1,024 keys per kv head per layer (compressed: budget 960 + every 64 = at most 1,024 held).
# Usage: bash benchmarks/compression_ppl.sh [MODEL] [OUTDIR] [extra policy specs...]
# The calibrated policies (qfilters, per-head) read profiles/MODEL.json (`streamattn calibrate`).
# Each policy is one `streamattn stream` run (single thread, so two can share the 2-core VM);
# then benchmarks/segment_table.py tabulates every tokens.csv under OUTDIR.
set -euo pipefail
MODEL=${1:-smollm2}
OUT=${2:-runs/compression_$MODEL}
shift 2 || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
POLICIES=(
  "sinks=4,window=1020"
  "sinks=4,window=64,budget=960,score=tova,every=64"
  "sinks=4,window=64,budget=960,score=snapkv,every=64"
  "sinks=4,window=64,budget=960,score=h2o,every=64"
  "sinks=4,window=64,budget=960,score=knorm,every=64"
  "sinks=4,window=64,budget=960,score=qfilters,every=64"
  "heads=0.2|sinks=4,window=64,budget=3008,score=snapkv,every=64|sinks=4,window=508"
  "$@"
)
PROFILE=profiles/$MODEL.json
for spec in "${POLICIES[@]}"; do
  [ -z "$spec" ] && continue
  name=$(echo "$spec" | tr ',=:|' '_+-~')
  [ -f "$OUT/$name/tokens.csv" ] && continue
  .venv/bin/streamattn stream --model "$MODEL" --policy "$spec" --profile "$PROFILE" --max-tokens 100000 \
    --segment 8192 --out "$OUT/$name"
done
# full attention within the trained length only
[ -f "$OUT/full/tokens.csv" ] || .venv/bin/streamattn stream --model "$MODEL" --policy full --max-tokens 8192 --segment 8192 --out "$OUT/full"
.venv/bin/python benchmarks/segment_table.py "$OUT"/*/tokens.csv --segment 8192
