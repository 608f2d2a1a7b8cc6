# One command each, on a fresh machine: `make demo`, `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Prefect: no analytics (there is no network); the demo keeps its home inside .ckptflow-demo/.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup chromium test lint demo bench clean

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The Prefect UI test's browser: Debian's chromium package (never a browser download). Installed
# where this runs as root (CI does); elsewhere that one test skips, saying so.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } || \
	  echo "make: chromium not installed (not root?): the Prefect UI browser test will skip"

setup: $(VENV)/.installed chromium

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

demo: setup
	$(BIN)/ckptflow demo

bench: setup
	$(BIN)/python bench/convert.py

clean:
	rm -rf $(VENV) .ckptflow-demo .fixtures bench/out
