# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-sharding lint wheel-check bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an open torch range with no torch installed pulls a multi-GB CUDA build.
	$(PY) -m pip install --disable-pip-version-check -q torch==2.13.0
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/esmm demo --out demo

test: $(STAMP)
	$(PY) -m pytest

# The TorchRec sharding tests (skipped by `make test` without the `torchrec` extra): the extra,
# then torchrec itself without its dependencies (its metadata asks for the CUDA fbgemm-gpu).
test-sharding: $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev,torchrec]'
	$(PY) -m pip install --disable-pip-version-check -q --no-deps torchrec==1.8.0
	$(PY) -m pytest tests/test_sharding.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

# The package as a user gets it: a wheel (not an editable install) in a fresh virtual
# environment that has only torch 2.13.0, then the demo at its smallest size, run from a folder
# outside the repository so that nothing is imported from src/. 1000 rows is the smallest demo.
WHEEL_CHECK_ROWS ?= 1000
wheel-check: $(STAMP)
	@set -eu; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	start=$$(date +%s); \
	$(PY) -m pip wheel --disable-pip-version-check -q --no-deps -w "$$tmp/dist" .; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --disable-pip-version-check -q --no-compile torch==2.13.0; \
	wheel=$$(ls "$$tmp"/dist/esmm-*.whl); \
	"$$tmp/venv/bin/python" -m pip install --disable-pip-version-check -q --no-compile "$$wheel[serve]"; \
	"$$tmp/venv/bin/python" -m pip check; \
	cd "$$tmp"; \
	"$$tmp/venv/bin/esmm" --version; \
	"$$tmp/venv/bin/python" -c "import esmm, esmm.api; assert esmm.api.__file__.startswith('$$tmp/venv/'), esmm.api.__file__"; \
	"$$tmp/venv/bin/esmm" -q demo --out "$$tmp/demo" --rows $(WHEEL_CHECK_ROWS) --seeds 1; \
	test -s "$$tmp/demo/report.md"; \
	echo "wheel-check: wheel installed and demo run in $$(( $$(date +%s) - start )) s"

clean:
	rm -rf demo .pytest_cache .ruff_cache
