#!/usr/bin/env bash
# The one prepared GPU check, run on a lent GPU machine from the repo root (see bench/README.md, "GPU check").
# Phase A, at once: 1. the test suite with CUDA visible (pytest-xdist workers where the image has it), and
#   3. the quality harness (bench/quality.py) on the GPU: at paper width (options/tpdiff_stage{1,2}.yml, 11.89M,
#   96 px patches) the paper's losses, the demo recipe's and the supervised ceiling; at demo width the recipe
#   with and without a cosine decay over the budget, on seeds the CPU runs did not cover.
# Phase B, alone (so its timings are clean): 2. the benchmark on the GPU (a 1280x720 frame, the component
#   profile, the stage-2 training iteration in fp32 and under train.amp: bf16).
# Needs the wheels from bench/fetch_gpu_wheels.sh in .whl/. Logs go to $OUT (the device tool brings back at
# most 8 files, so everything lands in 7 logs and one JSON). Budget: under 9 minutes on one H100.
# Dry run on a CPU: DEVICE=cpu ITERS=4 PAPER_ITERS=2 STEPS=3 bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
STEPS=${STEPS:-"1 2 3"}
DEVICE=${DEVICE:-cuda}
ITERS=${ITERS:-1000}             # demo width: stage-1 iterations per run (the cosine period); stage 2 gets none
PAPER_ITERS=${PAPER_ITERS:-600}  # paper width: stage-1 iterations; stage 2 gets a third
BATCH=${BATCH:-8}                # the paper batch at paper width
TEST_S=${TEST_S:-270}; QUALITY_S=${QUALITY_S:-290}; BENCH_S=${BENCH_S:-150}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-build-isolation .whl/*.whl || exit 1
fi
# the plugin's wheel brings its console scripts (tpdiff, basicsr); the working tree's code wins over the wheel's copy
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total --format=csv
  $PY -c 'import torch, tpdiff_plugin; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$OUT/gpu.txt"
DATA=$(mktemp -d)/demo
$PY -m tpdiff_plugin.cli make-demo --output "$DATA" > /dev/null || exit 1

pids=()
if [[ $STEPS == *1* ]]; then
  echo "== 1. tests (CUDA visible) =="
  XDIST=$($PY -c 'import xdist' 2>/dev/null && echo "-n 6 --dist loadfile")
  (OMP_NUM_THREADS=2 timeout $TEST_S $PY -m pytest -q -p no:cacheprovider $XDIST tests > "$OUT/tests.log" 2>&1;
   echo "exit $?" >> "$OUT/tests.log") &
  pids+=($!)
fi
if [[ $STEPS == *3* ]]; then
  echo "== 3. quality harness: paper width and demo width, $DEVICE =="
  # the demo recipe's keys (options/demo/stage1.yml, round 8) on the paper network
  DR='train.sharp_cycle_trains_rb=false,network_rb.kernel_size=15,train.wave_opt.loss_weight=0.02'
  DR="$DR,train.r1_weight={d_sharp: 0.01, d_blur: 0.01, d_wave: 1.0}"
  DR="$DR,network_d_sharp.highpass_gain=10,network_d_blur.highpass_gain=10"
  DR="$DR,network_g.residual_lowpass=1.0,network_g.residual_notch=true"
  DR="$DR,train.gan_opt.gan_type=lsgan,train.wave_opt.gan_type=lsgan"
  DR="$DR,train.gan_sharp_opt={type: GANLoss, gan_type: lsgan, loss_weight: 0.1}"
  DR="$DR,train.cycle_sharp_opt={type: L1Loss, loss_weight: 1.0}"
  DR="$DR,train.optim_g.lr=5.0e-5,train.optim_d.lr=2.0e-4,s2:train.optim_g.lr=2.0e-5"
  PATCH="datasets.train.gt_size=96,datasets.train.batch_size_per_gpu=$BATCH"
  EVERY=$(( PAPER_ITERS >= 6 ? PAPER_ITERS / 6 : 1 ))
  (timeout $QUALITY_S $PY bench/quality.py --device $DEVICE --data "$DATA" \
    --stage1-opt options/tpdiff_stage1.yml --stage2-opt options/tpdiff_stage2.yml \
    --define "paper=recipe,$PATCH" \
    --define "paper_demo_recipe=paper,$DR" --define "paper_supervised=supervised,$PATCH" \
    --variants paper,paper_demo_recipe,paper_supervised --jobs 3 --threads 2 \
    --iters $PAPER_ITERS --stage2-iters $((PAPER_ITERS / 3)) --eval-every $EVERY --log-every $EVERY \
    --json "$OUT/quality_paper.json" > "$OUT/quality_paper.log" 2>&1;
   echo "exit $?" >> "$OUT/quality_paper.log") &
  pids+=($!)
  COS="train.scheduler={type: CosineAnnealingRestartLR, periods: [$ITERS], restart_weights: [1], eta_min: 1.0e-7}"
  DEMO_EVERY=$(( ITERS >= 4 ? ITERS / 4 : 1 ))
  for seed in 12 13; do
    (timeout $QUALITY_S $PY bench/quality.py --device $DEVICE --data "$DATA" --seed $seed \
      --define "cos=recipe,$COS" --variants recipe,cos --jobs 2 --threads 1 --iters $ITERS --stage2-iters 0 \
      --eval-every $DEMO_EVERY --log-every $DEMO_EVERY > "$OUT/quality_demo_s$seed.log" 2>&1;
     echo "exit $?" >> "$OUT/quality_demo_s$seed.log") &
    pids+=($!)
  done
fi
wait "${pids[@]}" 2>/dev/null
for f in "$OUT"/tests.log "$OUT"/quality_*.log; do
  [ -f "$f" ] && { echo "-- $f"; grep -E "passed|failed|error|^\||input|val |exit|Error" "$f" | tail -40; }
done

if [[ $STEPS == *2* ]]; then
  echo "== 2. bench on the GPU, alone (1280x720; component shares; stage-2 iteration fp32 and bf16) =="
  timeout $BENCH_S $PY bench/run.py --device cuda --size 720x1280 --repeats 3 --amp bf16 --profile \
    > "$OUT/bench.log" 2>&1; echo "exit $?" >> "$OUT/bench.log"
  grep -v Warning "$OUT/bench.log" | tail -60
fi
