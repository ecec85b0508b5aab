# ddim-edu: two entry points, both run from a fresh clone.
#
#   make demo   create .venv if needed, install torch + ddim-edu, run python -m ddim_edu.demo
#   make test   create .venv if needed, install torch + ddim-edu[dev,compare], run pytest
#
# Pass extra arguments with ARGS, e.g. `make demo ARGS='--help'` or `make test ARGS='-k schedules'`.

# The interpreter used to create .venv (Python >= 3.10).
PYTHON ?= python3
VENV ?= .venv
# The torch release the project is tested with. It is installed before anything else so
# that the package's own `torch>=2.2` is already satisfied. On a CUDA box or a Mac, pip picks
# the right build from PyPI for this pin. Override e.g. `make test TORCH='torch>=2.2'`.
TORCH ?= torch==2.13.0
ARGS ?=

VENV_PY := $(VENV)/bin/python
PIP := $(VENV_PY) -m pip

.DEFAULT_GOAL := help
.PHONY: help demo test venv FORCE

help:
	@echo "make demo   train a small model on 2-D toy data and write figures + tables (outputs/demo/)"
	@echo "make test   run the test suite and the notebooks"
	@echo "Variables: PYTHON=$(PYTHON)  VENV=$(VENV)  TORCH='$(TORCH)'  ARGS='$(ARGS)'"

demo: $(VENV)/.installed-base
	$(VENV_PY) -m ddim_edu.demo $(ARGS)

# DDIM_EDU_FAST=1: the notebooks run with small sizes (their checked outputs are the same).
test: $(VENV)/.installed-dev
	DDIM_EDU_FAST=1 $(VENV_PY) -m pytest $(ARGS)

venv: $(VENV)/.created

# --- helpers ------------------------------------------------------------------------

# Create the virtual environment once; fail loudly if that is impossible.
$(VENV)/.created:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null || { \
	  echo "error: '$(PYTHON)' is missing or older than Python 3.10; run e.g. make $(MAKECMDGOALS) PYTHON=python3.11" >&2; exit 1; }
	@echo "==> $(PYTHON) -m venv $(VENV)"
	@$(PYTHON) -m venv $(VENV) || { \
	  echo "error: could not create $(VENV) with '$(PYTHON) -m venv'." >&2; \
	  echo "       On Debian/Ubuntu install the venv module (e.g. apt install python3-venv), then retry." >&2; exit 1; }
	@$(VENV_PY) -m pip --version >/dev/null 2>&1 || { \
	  echo "error: $(VENV) has no working pip; delete $(VENV) and retry." >&2; exit 1; }
	@touch $@

# Remember which torch requirement was installed, so that changing TORCH reinstalls.
$(VENV)/.torch-spec: FORCE | $(VENV)/.created
	@echo '$(TORCH)' | cmp -s - $@ || echo '$(TORCH)' > $@

# Install stamps: redone when pyproject.toml or TORCH changes, skipped otherwise.
# TORCH is repeated in the second pip call so that no dependency can swap the build out.
$(VENV)/.installed-base: pyproject.toml $(VENV)/.torch-spec
	@echo "==> installing $(TORCH), then ddim-edu (editable) into $(VENV)"
	$(PIP) install "$(TORCH)"
	$(PIP) install "$(TORCH)" -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch-spec
	@echo "==> installing $(TORCH), then ddim-edu[dev,compare] (editable) into $(VENV)"
	$(PIP) install "$(TORCH)"
	$(PIP) install "$(TORCH)" -e ".[dev,compare]"
	@touch $@

FORCE:
