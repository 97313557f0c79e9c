# Ratchet: `make install`, `make demo`, `make test`.
VENV ?= .venv
PYTHON ?= python3
# The CPU wheel on a machine without CUDA; set TORCH=torch==2.13.0 with your
# own index for a CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(BIN)/ratchet demo --cycles 3

# Two test processes, one torch thread each: the two cores of the machine the suite is sized for.
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

clean:
	rm -rf $(VENV) .ratchet .pytest_cache
