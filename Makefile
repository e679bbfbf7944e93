# Two commands matter: `make demo` and `make test`. Both install first (idempotent).
PY ?= python3.11
VENV := .venv
PYTHON := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.9.5
STAMP := $(VENV)/.installed
DEMO_PHOTOS := data/demo_photos/eval/index.json
CATALOG_CACHE := data/cache/.catalog-packages

.PHONY: install test demo lock clean gpu-check

install: $(STAMP) $(DEMO_PHOTOS)

# Installs exactly the pinned lock (no resolution, so no backtracking), then this repo in editable mode.
# --compile-bytecode writes every installed module's .pyc once (~30 s): without it, where PYTHONDONTWRITEBYTECODE
# is set (as on these machines) every process compiles composer's import tree again (import composer: 13 s -> 6 s).
$(STAMP): requirements/lock.txt requirements/nodeps.txt setup.py
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	@$(PYTHON) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) pip install -q --python $(PYTHON) --no-deps -r requirements/lock.txt
	$(UV) pip install -q --python $(PYTHON) --no-deps -r requirements/nodeps.txt
	$(UV) pip install -q --python $(PYTHON) --no-deps --compile-bytecode -e .
	@touch $@

# The small set of real photos yamls/tiny-cpu.yaml trains on (they ship inside scikit-image, scikit-learn, matplotlib).
$(DEMO_PHOTOS): $(STAMP) diffusion/data/demo_photos.json
	$(PYTHON) -c "from diffusion.data import build_demo_photos; build_demo_photos('data/demo_photos')"

# The npm / Debian packages the mini catalog is built from (OpenMoji, Twemoji, OpenClipart), fetched once into the
# cache that convert/commoncatalog_mini.py reads, so that the test suite itself never downloads anything.
$(CATALOG_CACHE): $(STAMP)
	$(PYTHON) -c "from diffusion.data.sources import SOURCES; [SOURCES[s][0]('data/cache') for s in ('openmoji', 'twemoji', 'openclipart')]"
	@touch $@

# Re-pin every package after editing requirements/requirements.in.
lock: install
	$(UV) pip compile -q --python-version 3.11 requirements/requirements.in -o requirements/lock.txt

# One pytest process (tests/conftest.py releases each test module's streaming shared memory when the module ends).
test: install $(CATALOG_CACHE)
	$(PYTHON) -m pytest

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
