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

test: $(STAMP)
	$(PY) -m pytest -q

# Everyday work: the suite without the real runs and multi-process fault tests (about a minute).
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Train the default preset; extra flags via ARGS, e.g. make train ARGS="highway_fast --num-envs 8".
train: $(STAMP)
	$(PY) train.py $(ARGS)

# Steps per second (env-only, learner-only, end-to-end); e.g. make bench ARGS="highway_fast --workers 1 2 4 8".
bench: $(STAMP)
	$(PY) -m racer_vec.benchmark $(ARGS)
