# Two commands matter: `make demo` and `make test`. Both install first (idempotent).
PY ?= python3.11
VENV := .venv
PYTHON := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.9.5
STAMP := $(VENV)/.installed
DEMO_PHOTOS := data/demo_photos/eval/index.json
CATALOG_CACHE := data/cache/.catalog-packages
TEST_WORKERS ?= 2
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install test demo lock clean gpu-check

install: $(STAMP) $(DEMO_PHOTOS)

# Installs exactly the pinned lock (no resolution, so no backtracking), then this repo in editable mode.
# --compile-bytecode writes every installed module's .pyc once (~30 s): without it, where PYTHONDONTWRITEBYTECODE
# is set (as on these machines) every process compiles composer's import tree again (import composer: 13 s -> 6 s).
# A line before each step says what comes and about how long it takes (the installs themselves are quiet).
$(STAMP): requirements/lock.txt requirements/nodeps.txt setup.py
	@echo "make install: the virtual environment $(VENV) and uv $(UV_VERSION)..."
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	@$(PYTHON) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	@echo "make install: the pinned packages of requirements/lock.txt (~2 min; torch and CUDA wheels are large)..."
	$(UV) pip install -q --python $(PYTHON) --no-deps -r requirements/lock.txt
	@echo "make install: the packages of requirements/nodeps.txt..."
	$(UV) pip install -q --python $(PYTHON) --no-deps -r requirements/nodeps.txt
	@echo "make install: this repository (editable) and every module's bytecode (~30 s)..."
	$(UV) pip install -q --python $(PYTHON) --no-deps --compile-bytecode -e .
	@touch $@
	@echo "make install: the packages are installed"

# The small set of real photos yamls/tiny-cpu.yaml trains on (they ship inside scikit-image, scikit-learn, matplotlib).
$(DEMO_PHOTOS): $(STAMP) diffusion/demo/photos.json
	@echo "make install: the demo photos into data/demo_photos..."
	$(PYTHON) -c "from diffusion.demo.photos import build_demo_photos; build_demo_photos('data/demo_photos')"

# The npm / Debian packages the mini catalog is built from (OpenMoji, Twemoji, OpenClipart), fetched once into the
# cache that convert/commoncatalog_mini.py reads, so that the test suite itself never downloads anything.
$(CATALOG_CACHE): $(STAMP)
	@echo "make test: the OpenMoji, Twemoji and OpenClipart packages into data/cache (once)..."
	$(PYTHON) -c "from diffusion.data.sources import SOURCES; [SOURCES[s][0]('data/cache') for s in ('openmoji', 'twemoji', 'openclipart')]"
	@touch $@

# Re-pin every package after editing requirements/requirements.in.
lock: install
	$(UV) pip compile -q --python-version 3.11 requirements/requirements.in -o requirements/lock.txt

# One pytest run over TEST_WORKERS pytest-xdist workers (one torch thread each, whole files per worker, so a file's
# module fixtures are built once); tests/conftest.py releases each module's streaming shared memory when it ends.
# TEST_WORKERS=0 runs every test in this one process.
# tests/test_app.py drives a headless Chromium: installed here with apt-get (Debian's chromium) when it is missing.
test: install $(CATALOG_CACHE)
	@command -v chromium >/dev/null || ! command -v apt-get >/dev/null || { \
		echo "make test: installing Chromium for the browser test (apt-get install chromium, ~1 min)..."; \
		{ $(SUDO) apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; } || \
		echo "make test: Chromium could not be installed: tests/test_app.py's browser test will fail"; }
	$(PYTHON) -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

demo: install
	$(PYTHON) scripts/demo.py $(DEMO_ARGS)

# Every full recipe at reduced width for ~20 steps on one CUDA GPU (bf16 autocast, FSDP over one process, SDPA,
# compile where the recipe asks): step time, peak memory, MFU, loss; exit 1 on any failure, 2 without a GPU.
# Runs with the machine's own python and torch (no install: `make install` would pin torch); the packages it
# lacks come as wheels: GPU_CHECK_ARGS='--wheels DIR' (scripts/gpu_check.py --download-wheels DIR fetches them).
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) outputs data
