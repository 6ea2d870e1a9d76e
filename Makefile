# `make demo` and `make test` do all the set-up on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
RUN_DIR ?= runs/demo
# Two pytest workers (pytest-xdist), one test file per worker at a time so that a file's module fixtures (a
# Ray head, the demo job) stay in one process: 1.5x faster on 2 cores, as much of the suite waits on process
# start-ups and Ray. `make test PYTEST_ARGS=` runs it in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: demo test install lint bench clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	@rm -f $(VENV)/.installed-*; touch $@

demo: install
	$(VENV)/bin/distill run --recipe demo --run-dir $(RUN_DIR)
	$(VENV)/bin/distill collect $(RUN_DIR)

# pytest exits 5 when it collects no tests: that is a failure of the suite, not a pass.
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check pipeline workers manifests tests benchmarks

bench: install
	$(PY) benchmarks/bench_ingest.py

clean:
	rm -rf runs .pytest_cache
