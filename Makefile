# From a fresh clone: `make test` installs everything into .venv and runs the suite;
# `make reference DATA=...` installs, fetches HAM10000 if absent, and trains the reference recipe.
PYTHON ?= python3
VENV ?= .venv
DATA ?= data/ham10000
CONFIG ?= configs/b1.yaml
RUN ?= runs/reference
TRAIN_FLAGS ?=

.PHONY: install browser test data reference

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Headless Chromium renders report.html in a test. Best effort: only as root with apt-get, never failing the
# build; without it that one test skips and says why.
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "note: Chromium not installed (needs root and apt-get); the report.html rendering test will skip"

test: install browser
	$(VENV)/bin/python -m pytest

data: install
	test -f $(DATA)/HAM10000_metadata.csv || $(VENV)/bin/lesionkit download --to $(DATA)

reference: data
	$(VENV)/bin/lesionkit train --config $(CONFIG) --data-dir $(DATA) --out $(RUN) $(TRAIN_FLAGS)
