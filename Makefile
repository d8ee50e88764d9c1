# pgdr: two commands on a fresh machine with Python 3.11+ and make.
#   make demo   the main job on the embedded default (backup, verify-restore, drill)
#   make test   the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
RUN    := PYTHONPATH=plugins $(BIN)/python
# The WAL archiver (barman-cloud) runs as the database server's OS user, so it gets a venv of its own
# made from a Python every user can run (Debian's /usr/bin/python3 where there is one).
# ...in the checkout, unless the server's user (uid 65534 under root) cannot enter it (a checkout under /root):
# then in $(PGDR_SHARED_DIR), where pgdr.physical.archive.archiver_bin_dir looks next.
PGDR_SHARED_DIR ?= /var/lib/pgdr
ARCHIVER        := $(shell if [ "$$(id -u)" = 0 ] && ! setpriv --reuid=65534 --regid=65534 --clear-groups test -x "$(CURDIR)" 2>/dev/null; then echo $(PGDR_SHARED_DIR)/archiver; else echo .pgdr/archiver; fi)
ARCHIVER_STAMP  := $(ARCHIVER)/.installed-$(shell cat requirements-archiver.txt | cksum | cut -d' ' -f1)
ARCHIVER_PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11 /usr/bin/python3 /usr/local/bin/python3) $(PYTHON))

.PHONY: demo test test-fast bench lint lock clean restore archiver

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pgdr needs Python 3.11 or newer")'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

$(ARCHIVER_STAMP): requirements-archiver.txt
	@rm -rf $(ARCHIVER) && mkdir -p $(dir $(ARCHIVER)) && chmod o+rx $(dir $(ARCHIVER))
	$(ARCHIVER_PYTHON) -m venv $(ARCHIVER)
	$(ARCHIVER)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-archiver.txt
	@chmod -R o+rX $(ARCHIVER)
	@touch $@

# barman-cloud-wal-archive / -wal-restore for point-in-time recovery (see README, "Point-in-time recovery").
archiver: $(ARCHIVER_STAMP)

# Without a world-readable Python the archiver cannot be built: the demo and the tests then skip
# point-in-time recovery, saying why, instead of failing.
ARCHIVER_SOFT = @$(MAKE) --no-print-directory archiver || echo "warning: the WAL archiver (barman-cloud) could not be installed: point-in-time recovery is skipped. Install Debian's python3, python3-venv and libpq-dev, then run make archiver." >&2

demo: $(STAMP)
	$(ARCHIVER_SOFT)
	$(RUN) -m pgdr.local.demo

# Break-glass restore without a running Airflow, e.g. make restore ARGS="--database shop --mode replace --confirm shop"
restore: $(STAMP)
	$(RUN) -m pgdr restore $(ARGS)

test: $(STAMP)
	$(ARCHIVER_SOFT)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration and not e2e" $(PYTEST_ARGS)

bench: $(STAMP)
	$(ARCHIVER_SOFT)
	$(BIN)/python bench/run.py $(ARGS)
	$(BIN)/python bench/pitr.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check dags plugins tests

lock: $(STAMP)
	$(BIN)/uv pip compile --universal -p 3.11 --no-header requirements.in -o requirements.txt

clean:
	rm -rf .pgdr
