# Tessera: every target does its own set-up; a fresh machine needs only Python 3.11+ and make.
SHELL   := /bin/bash
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO_OUT ?= demo-output

.PHONY: setup demo test lint bench clean system-deps package

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: a looser pin (or monai before torch) would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# Debian tools the tests use (dcmtk's storescu/echoscu as a real DICOM peer).
# Installed when we are root; in CI a missing tool fails the run rather than being skipped.
system-deps:
	@bash .ci/system-deps

demo: setup
	$(BIN)/tessera-coordinator demo --sites 3 --rounds 5 --out $(DEMO_OUT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: setup system-deps lint
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q

# The site bundle: PyInstaller one-folder build, stripped and packed into
# dist/tessera-site-<version>-linux-<arch>.tar.gz; prints its sizes (packaging/README.md).
package: setup
	PYTHON=$(BIN)/python bash packaging/build.sh

bench: setup
	@set -o pipefail; for b in benchmarks/[a-z]*.py; do \
	  m=$$(basename $$b .py); [ "$$m" = report ] && continue; echo "== benchmarks.$$m"; \
	  $(BIN)/python -m benchmarks.$$m || exit 1; \
	done | tee .bench.log
	$(BIN)/python -m benchmarks.report .bench.log

clean:
	rm -rf $(VENV) build dist $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache
