# Two commands do all the set-up on a fresh machine:
#   make demo   - build .venv with the pinned deps, then run TP-Diff end to end on the embedded demo set
#   make test   - build .venv the same way, then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tpdiff-installed

.PHONY: setup test demo bench clean-demo

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements.txt
	# basicsr 1.4.2 ships only an sdist whose setup.py imports torch: build it against the torch above
	# (no isolated build env, which would download a second torch) and take its deps from requirements.txt.
	$(PY) -m pip install --no-deps --no-build-isolation basicsr==1.4.2
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/tpdiff make-demo --force
	$(PY) -m tpdiff_plugin.tools.check_data datasets_lmdb/demo

bench: $(STAMP)
	$(PY) bench/run.py

clean-demo:
	rm -rf datasets_lmdb/demo experiments/TPDiff_Demo_* results/TPDiff_Demo_*
