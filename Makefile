# Two commands do all the set-up on a fresh machine:
#   make demo   - build .venv with the pinned deps, then run TP-Diff end to end on the embedded demo set
#   make test   - build .venv the same way, then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tpdiff-installed

.PHONY: setup test demo bench quality install-test clean-demo

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# a .venv built before 0.2.0 holds opencv-python-headless and tensorboard, which share their package folders
	# with basicsr's opencv-python and tb-nightly (requirements.txt): remove them first (a no-op on a new .venv)
	$(PY) -m pip uninstall --quiet --yes opencv-python-headless tensorboard
	$(PY) -m pip install -r requirements.txt
	# basicsr 1.4.2 ships only an sdist whose setup.py imports torch: build it against the torch above
	# (no isolated build env, which would download a second torch) and take its deps from requirements.txt.
	$(PY) -m pip install --no-deps --no-build-isolation basicsr==1.4.2
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The main job on the embedded demo set: data, stage 1, stage 2 (from stage 1's checkpoints), test, report.
# Earlier demo runs are archived by basicsr (experiments/*_archived_<time>); `make clean-demo` removes them.
demo: $(STAMP)
	$(VENV)/bin/tpdiff make-demo --force
	$(VENV)/bin/basicsr train -opt options/demo/stage1.yml
	$(VENV)/bin/basicsr train -opt options/demo/stage2.yml
	$(VENV)/bin/basicsr test -opt options/test/demo.yml
	$(VENV)/bin/tpdiff report --results results/TPDiff_Demo_Test --real datasets_lmdb/demo/real \
		--weights experiments/TPDiff_Demo_Stage2/models/net_g_latest.pth --opt options/demo/stage2.yml

bench: $(STAMP)
	$(PY) bench/run.py

# The quality harness (bench/quality.py): demo-size TP-Diff trained from scratch under named variants, side
# by side, against the identity, the supervised ceiling and the CycleGAN baseline, at the demo's 300 + 500
# iterations (about 70 min on 2 free cores, estimated: one variant took 12-15 min per core in round 11).
quality: $(STAMP)
	$(PY) bench/quality.py --jobs 2

# Outside CI's fast path: the wheel installed into a fresh venv next to basicsr, used from an empty folder
# (tests/install/run.sh; 5-10 minutes, downloads basicsr's dependencies).
install-test:
	bash tests/install/run.sh

clean-demo:
	rm -rf datasets_lmdb/demo experiments/TPDiff_Demo_* results/TPDiff_Demo_* results/compare_demo
