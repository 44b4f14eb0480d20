# The two commands of the README: `make demo` (the main job on the embedded default) and `make test`.
# Both install the environment first (scripts/install.sh: idempotent, seconds when up to date).
VENV ?= .venv
export AKD_VENV := $(abspath $(VENV))

.PHONY: install demo test bench
install:
	bash scripts/install.sh

demo: install
	$(VENV)/bin/akd demo

test: install
	$(VENV)/bin/python -m pytest

bench: install
	$(VENV)/bin/python bench/run.py
