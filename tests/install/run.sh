#!/usr/bin/env bash
# The install test (issue 15): what someone who never cloned the repository does, checked end to end.
# Outside CI's fast path (downloads basicsr's dependencies; 5-10 minutes): `make install-test`.
#
#  1. build the plugin's wheel from this checkout;
#  2. make a fresh venv and install torch (the pinned pair, from pip's cache or local wheels), then basicsr the
#     way the README says (`pip install --no-build-isolation basicsr==1.4.2`, with its own dependencies), then
#     the wheel with its dependencies;
#  3. `pip check` must be clean and exactly one OpenCV distribution installed;
#  4. from an empty folder, the README's "Using it with BasicSR" commands: `tpdiff --version`, `tpdiff options
#     list`, `tpdiff make-demo`, a few `basicsr train` iterations of each demo stage (stage 1 by the README's path
#     options/demo/stage1.yml, which this folder does not have; stage 2 from a file `tpdiff options copy` wrote),
#     then `tpdiff deblur --weights` without `--opt`, which must write the deblurred image.
# Any failing step fails the test (set -e). WORK=<dir> keeps the folder (default: a temporary one, removed).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
if [[ -n "${WORK:-}" ]]; then mkdir -p "$WORK"; KEEP=1; else WORK=$(mktemp -d /tmp/tpdiff-install.XXXXXX); KEEP=0; fi
WORK=$(cd "$WORK" && pwd)
trap '[[ $KEEP == 1 ]] || rm -rf "$WORK"' EXIT
step() { echo; echo "== $*"; }
pins() { grep -E "^($1)==" "$REPO/requirements.txt"; }

step "1. wheel from $REPO"
rm -rf "$WORK/wheel" && "$PYTHON" -m pip wheel -q --no-deps -w "$WORK/wheel" "$REPO"
WHEEL=$(ls "$WORK"/wheel/tpdiff_plugin-*.whl)
"$PYTHON" -m zipfile -l "$WHEEL" | grep -c 'tpdiff_plugin/options/.*\.yml' | xargs echo "option files in the wheel:"

step "2. fresh venv in $WORK/venv"
rm -rf "$WORK/venv" && "$PYTHON" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q $(pins 'torch|torchvision') 'setuptools>=70.1' wheel
$PIP install -q --no-build-isolation basicsr==1.4.2
$PIP install -q "$WHEEL"

step "3. pip check, one OpenCV"
$PIP check
OPENCV=$($PIP list --format=freeze | grep -i '^opencv' || true)
echo "$OPENCV"
[[ $(echo "$OPENCV" | grep -c .) == 1 ]] || { echo "FAIL: expected exactly one OpenCV distribution"; exit 1; }
"$WORK/venv/bin/python" -c 'import cv2, tpdiff_plugin; print("cv2", cv2.__version__, "tpdiff_plugin", tpdiff_plugin.__version__)'

step "4. from an empty folder"
rm -rf "$WORK/empty" && mkdir "$WORK/empty" && cd "$WORK/empty"
BIN="$WORK/venv/bin"
"$BIN/tpdiff" --version
"$BIN/tpdiff" options list | tail -n 3
"$BIN/tpdiff" make-demo
"$BIN/tpdiff" options copy demo/stage2 mine
SHORT=(train:total_iter=4 val:val_freq=4 logger:print_freq=2 logger:save_checkpoint_freq=4)
"$BIN/basicsr" train -opt options/demo/stage1.yml --force_yml "${SHORT[@]}"
"$BIN/basicsr" train -opt mine/stage2.yml --force_yml "${SHORT[@]}"
"$BIN/tpdiff" deblur -i datasets_lmdb/demo/real -o deblurred \
    --weights experiments/TPDiff_Demo_Stage2/models/net_g_latest.pth --quiet
ls -l deblurred
[[ -s deblurred/clock_motion.png ]] || { echo "FAIL: tpdiff deblur wrote no image"; exit 1; }
echo; echo "install test: PASSED"
