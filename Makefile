# Quick start: `make demo` (the main job) and `make test` (CPU mesh of 8 fake devices).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo install clean

# The stamp depends on setup.py so a change of pins reinstalls.
$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(VENV)/.installed
	$(PY) launch/demo.py

clean:
	rm -rf $(VENV) .pytest_cache
