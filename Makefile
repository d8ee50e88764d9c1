# pgdr: two commands on a fresh machine with Python 3.11+ and make.
#   make demo   the main job on the embedded default (backup, verify-restore, drill)
#   make test   the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
RUN    := PYTHONPATH=plugins $(BIN)/python

.PHONY: demo test test-fast bench lint lock clean restore

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pgdr needs Python 3.11 or newer")'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(RUN) -m pgdr.local.demo

# Break-glass restore without a running Airflow, e.g. make restore ARGS="--database shop --mode replace --confirm shop"
restore: $(STAMP)
	$(RUN) -m pgdr restore $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration and not e2e" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check dags plugins tests

lock: $(STAMP)
	$(BIN)/uv pip compile --universal -p 3.11 --no-header requirements.in -o requirements.txt

clean:
	rm -rf .pgdr
