#!/usr/bin/env bash
# The one prepared GPU check, run on a lent GPU machine from the repo root (see bench/README.md):
#   1. the test suite with CUDA visible, 2. the benchmark on the GPU, 3. the quality harness
#   (bench/quality.py) on the demo data at demo width and at paper width (options/tpdiff_stage{1,2}.yml,
#   11.89M): val PSNR/SSIM/artifact curves of TP-Diff against the supervised ceiling (and the CycleGAN baseline).
# Needs the wheels from bench/fetch_gpu_wheels.sh in .whl/. Logs go to $OUT (the device tool's folder).
# Budget: about 8-10 minutes on one H100 (each step has its own timeout).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
STEPS=${STEPS:-"1 2 3"}   # e.g. STEPS=3 to run only the training step
BIN=$(dirname "$($PY -c 'import sys; print(sys.executable)')")
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-build-isolation .whl/*.whl || exit 1
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -c 'import torch, tpdiff_plugin; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee -a "$OUT/gpu.txt"

if [[ $STEPS == *1* ]]; then
echo "== 1. tests (CUDA visible) =="
timeout 240 $PY -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" | tail -5
fi

if [[ $STEPS == *2* ]]; then
echo "== 2. bench on the GPU (1280x720 frame; the stage-2 training iteration in fp32 and under train.amp: bf16) =="
timeout 150 $PY bench/run.py --device cuda --size 720x1280 --repeats 3 --amp bf16 --json "$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.log" | grep -v Warning | tail -33
fi

[[ $STEPS == *3* ]] || exit 0
echo "== 3. quality harness on the demo data: demo width, then paper width (11.89M) =="
ITERS=${ITERS:-1500}     # stage-1 iterations per variant; stage 2 gets half
BATCH=${BATCH:-8}        # the paper batch at paper width
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu STEPS=3 ITERS=12 BATCH=1: a dry run here
DR='train.sharp_cycle_trains_rb=false,train.r1_weight=1.0,network_rb.kernel_size=15,train.wave_opt.loss_weight=0.02'
DR="$DR,network_g.residual_lowpass=1.0"
DR="$DR,train.gan_sharp_opt={type: GANLoss, gan_type: lsgan, loss_weight: 0.1}"
DR="$DR,train.cycle_sharp_opt={type: L1Loss, loss_weight: 1.0}"   # the demo recipe's loss keys
timeout 200 $PY bench/quality.py --device $DEVICE --variants recipe,supervised,cycle --iters $ITERS \
  --stage2-iters $((ITERS / 2)) --eval-every $((ITERS / 6)) --json "$OUT/quality_demo.json" --out "$OUT/quality_demo" \
  2>&1 | tee "$OUT/quality_demo.log" | grep -E "^\||input|done|FAILED"
timeout 240 $PY bench/quality.py --device $DEVICE --stage1-opt options/tpdiff_stage1.yml --stage2-opt options/tpdiff_stage2.yml \
  --define "paper=recipe,datasets.train.gt_size=96,datasets.train.batch_size_per_gpu=$BATCH" \
  --define "paper_demo_recipe=paper,$DR" --variants paper,paper_demo_recipe,supervised --iters $((ITERS / 3)) \
  --stage2-iters $((ITERS / 6)) --eval-every $((ITERS / 12)) --json "$OUT/quality_paper.json" --out "$OUT/quality_paper" \
  2>&1 | tee "$OUT/quality_paper.log" | grep -E "^\||input|done|FAILED"
