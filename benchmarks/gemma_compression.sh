#!/usr/bin/env bash
# Gemma 3 270M: perplexity per segment over 102,400 tokens of Austen for each compressed policy at
# the budget of benchmarks/compression_*.sh (1,024 keys per kv head on the 3 global layers; the 15
# sliding layers keep the model's own 512-token window). One `gemma_stream.py run` per policy
# (single thread; finished ones skipped), every 8th token scored (a subset of the every-4th tokens of
# the sinks+window and dense runs in benchmarks/results/gemma), then one table over the tokens that
# every run scored.
# Usage: bash benchmarks/gemma_compression.sh [OUTDIR]
set -euo pipefail
OUT=${1:-runs/gemma_compression}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
C="sinks=4,window=64,budget=960,every=64"
POLICIES=(
  "$C,score=tova"
  "$C,score=snapkv"
  "heads=1|sinks=4,window=64,budget=1984,score=snapkv,every=64|sinks=4,window=508"
  "$C,score=h2o"
  "$C,score=knorm"
  "$C,score=qfilters"
)
for spec in "${POLICIES[@]}"; do
  slug=$(echo "$spec" | sed 's/=//g; s/,/_/g; s/|/~/g')
  [ -f "$OUT/${slug}_meta.json" ] && continue
  .venv/bin/python benchmarks/gemma_stream.py run --policy "$spec" --tokens 102400 --score-every 8 --out "$OUT"
done
.venv/bin/python benchmarks/gemma_stream.py table benchmarks/results/gemma "$OUT"
