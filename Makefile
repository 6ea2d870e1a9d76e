# `make demo` and `make test` do all the set-up on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=

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
