# Two commands on a fresh machine:  `make demo` (the main job, end to end on loopback) and
# `make test` (installs the real peers when root, the venv, then runs the whole suite).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test peers bench lint typecheck clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	# Byte-compile now: ssh starts hopcat per connection, and an environment with
	# PYTHONDONTWRITEBYTECODE set would otherwise compile every module on every start.
	$(VENV)/bin/python -m compileall -q src
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python scripts/demo.py

peers:
	bash scripts/install-peers.sh

test: peers $(STAMP)
	$(VENV)/bin/python -m pytest

bench: peers $(STAMP)
	$(VENV)/bin/python bench/relay.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict src

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
