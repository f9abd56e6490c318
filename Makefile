# Quick start: `make demo` and `make test`.  Both create .venv on first use,
# install aiocoloc (editable) with its test, bench and uvloop extras, and
# build the Cython extension in place.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
EXT_SOURCES := aiocoloc/_ring.pyx aiocoloc/_ring.pxd $(wildcard aiocoloc/_ring_*.pxi) aiocoloc/shm/_atomic.pyx aiocoloc/includes/atomics.h \
	aiocoloc/transport/data_path.py aiocoloc/transport/data_path.pxd \
	aiocoloc/notify/spin_policy.py aiocoloc/notify/spin_policy.pxd aiocoloc/notify/waking.py aiocoloc/notify/waking.pxd
PYTEST_ARGS ?=

.PHONY: all venv build demo test lint typecheck pytest soak fuzz bench clean

all: build

$(INSTALLED): pyproject.toml setup.cfg setup.py
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "aiocoloc needs Python >= 3.11 (PYTHON=$(PYTHON))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet 'setuptools>=64' wheel 'Cython>=3.0'
	$(PY) -m pip install --quiet --no-build-isolation -e '.[test,bench,uvloop]'
	touch $@

venv: $(INSTALLED)

# Rebuilds the extension whenever its sources changed (a no-op otherwise).
build: $(INSTALLED) $(EXT_SOURCES)
	$(PY) setup.py --quiet build_ext --inplace

demo: build
	$(PY) examples/demo.py

lint: $(INSTALLED)
	$(PY) -m ruff check aiocoloc discovery tests bench examples
	$(PY) -m ruff format --check aiocoloc discovery tests bench examples

typecheck: $(INSTALLED)
	$(PY) -m mypy

pytest: build
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# Long runs, not part of `make test`.  SOAK_SECONDS per loop; FUZZ_SCALE
# multiplies the examples of every property, model and fuzz test.
SOAK_SECONDS ?= 300
FUZZ_SCALE ?= 20

soak: build
	AIOCOLOC_SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest tests/soak $(PYTEST_ARGS)

fuzz: build
	AIOCOLOC_FUZZ_SCALE=$(FUZZ_SCALE) $(PY) -m pytest --timeout=0 \
		tests/test_ring_fuzz.py tests/test_ring_model.py tests/test_pipe_model.py \
		tests/test_handshake_fuzz.py tests/test_control.py tests/test_pool.py $(PYTEST_ARGS)

bench: build
	$(PY) bench/ring.py
	$(PY) bench/proportional.py
	$(PY) bench/streams.py
	$(PY) bench/many.py
	$(PY) bench/http_bodies.py
	$(PY) bench/discovery.py

clean:
	rm -rf build $(VENV) aiocoloc/*.so aiocoloc/*.c aiocoloc/shm/*.so aiocoloc/shm/*.c aiocoloc/transport/*.so aiocoloc/transport/*.c aiocoloc/notify/*.so aiocoloc/notify/*.c *.egg-info .pytest_cache .mypy_cache .hypothesis
