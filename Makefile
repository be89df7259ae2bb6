# Two commands set up everything on a fresh machine: `make serve` and `make test`.
# uv itself is installed into the project (.tools/), so nothing needs sudo or a global install.

UV_VERSION := 0.13.9
PYTHON ?= python3
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
INSTALLED := $(VENV)/.installed

MODEL ?= tiny-qwen-image
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=
# The model's own name, then the names apps written for OpenAI's image models send by default
# (docs/clients.md): Open WebUI, LibreChat, n8n and LangChain work against `make serve` as is.
SERVED_NAMES ?= $(MODEL) dall-e-2 dall-e-3 gpt-image-1

.PHONY: install serve test lint typecheck pytest test-clients benchmark clean

install: $(INSTALLED)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# --compile-bytecode: vLLM's and vllm-omni's modules are compiled once here, not on each import
# (this machine sets PYTHONDONTWRITEBYTECODE, so Python never caches them): every `vllm serve`
# and every vllm-omni worker then imports in about a third of the time.
$(INSTALLED): $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --compile-bytecode
	touch $@

serve: install
	$(VENV)/bin/vllm serve $(MODEL) --task image --host $(HOST) --port $(PORT) \
		--served-model-name $(SERVED_NAMES) $(SERVE_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

pytest: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest

# ruff and mypy (about a minute of one core on a fresh clone) run beside pytest, which leaves a
# core idle while its servers start; a failure of either still fails `make test`.
test: install
	$(MAKE) --no-print-directory -j2 lint typecheck pytest

# The client apps that cannot share the main lock with vLLM, each in an environment of its own
# (testing/clients/), run against a real `vllm serve` by tests/clients (pytest of the main venv;
# `make test` does not collect them): LlamaIndex's text-to-image tool (as installed, and on the
# openai 0.28.1 its code needs) and LiteLLM's proxy. About 75 s on 2 CPU cores (7 tests, one
# `vllm serve` and one `litellm --config`), plus the environments' first download.
test-clients: install
	UV_PROJECT_ENVIRONMENT=$(CURDIR)/.venv-clients $(UV) sync --frozen --project testing/clients
	UV_PROJECT_ENVIRONMENT=$(CURDIR)/.venv-clients-openai0 $(UV) sync --frozen --project testing/clients/openai0
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest tests/clients

# All benchmarks, side by side in one run on the embedded model; each writes its table to
# docs/benchmarks/ (summarised in docs/performance.md and docs/reliability.md). About 55 minutes on
# 2 CPU cores.
BENCHMARKS := encoding batch_invariance overhead liveness throughput engine_throughput engines_cpu step_batching omni_previews startup edit_throughput lora soak fuzz memory_admission

benchmark: install
	for name in $(BENCHMARKS); do \
		HF_HUB_OFFLINE=1 $(VENV)/bin/python -m benchmarks.$$name || exit 1; \
	done

clean:
	rm -rf $(VENV) .venv-clients .venv-clients-openai0 $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
