# Quick start: `make demo` (the main job) and `make test` (CPU mesh of 8 fake devices).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LMMS_EVAL := lmms-eval==0.7.3

.PHONY: test demo install clean

# The stamp depends on setup.py so a change of pins reinstalls. lmms-eval's own requirements would replace our torch
# and protobuf pins: its imports come from the lmms extra (setup.py, LMMS), the package itself without dependencies,
# so tests/test_lmms_eval.py runs it offline.
$(VENV)/.installed: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,lmms]'
	$(PY) -m pip install -q --no-deps $(LMMS_EVAL)
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(VENV)/.installed
	$(PY) launch/demo.py

clean:
	rm -rf $(VENV) .pytest_cache
