VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: test test-quick train bench

# (Re)install when the venv is missing or older than pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# One pytest worker per CPU this process may run on (nproc; at most 4: the largest test files bound
# the time beyond that). A file's tests share a worker, so its compiled fixtures are built once.
JOBS := $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
XDIST := -n $(JOBS) --dist loadfile

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST)

# Everyday work: the suite without the real runs and multi-process fault tests (about a minute).
test-quick: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow"

# Train the default preset; extra flags via ARGS, e.g. make train ARGS="highway_fast --num-envs 8".
train: $(STAMP)
	$(PY) train.py $(ARGS)

# Steps per second (env-only, learner-only, end-to-end); e.g. make bench ARGS="highway_fast --workers 1 2 4 8".
bench: $(STAMP)
	$(PY) -m racer_vec.benchmark $(ARGS)
