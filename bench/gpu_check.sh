#!/usr/bin/env bash
# The one prepared GPU check, run on a lent GPU machine from the repo root (see bench/README.md):
#   1. the test suite with CUDA visible, 2. the benchmark on the GPU, 3. both TP-Diff stages briefly
#   at paper width (options/tpdiff_stage{1,2}.yml, 11.89M) on the demo data, printing the val PSNR/SSIM.
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
echo "== 2. bench on the GPU (1280x720 frame) =="
timeout 150 $PY bench/run.py --device cuda --size 720x1280 --repeats 3 --json "$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.log" | grep -v Warning | tail -30
fi

[[ $STEPS == *3* ]] || exit 0
echo "== 3. paper-width stages on the demo data =="
timeout 30 "$BIN/tpdiff" make-demo --force >/dev/null
D=datasets_lmdb/demo
ITERS=${ITERS:-300}
BATCH=${BATCH:-8}   # the paper batch; smaller for a CPU dry run
common=(datasets:train:dataroot_blur=$D/train_blur.lmdb datasets:train:dataroot_sharp=$D/train_sharp.lmdb
        datasets:train:gt_size=96 datasets:train:num_worker_per_gpu=4 datasets:train:batch_size_per_gpu=$BATCH
        datasets:val:dataroot_gt=$D/val_sharp.lmdb datasets:val:dataroot_lq=$D/val_blur.lmdb
        train:total_iter=$ITERS val:val_freq=$ITERS logger:save_checkpoint_freq=$ITERS logger:print_freq=50)
S1=experiments/TPDiff_GPUCheck_Stage1/models
timeout 150 "$BIN/basicsr" train -opt options/tpdiff_stage1.yml --force_yml name=TPDiff_GPUCheck_Stage1 "${common[@]}" \
  > "$OUT/stage1.log" 2>&1; echo "stage 1 exit $?"
timeout 150 "$BIN/basicsr" train -opt options/tpdiff_stage2.yml --force_yml name=TPDiff_GPUCheck_Stage2 "${common[@]}" \
  path:pretrain_network_g=$S1/net_g_latest.pth path:pretrain_network_tpe=$S1/net_tpe_latest.pth \
  path:pretrain_network_rb=$S1/net_rb_latest.pth > "$OUT/stage2.log" 2>&1; echo "stage 2 exit $?"
for s in 1 2; do
  echo "-- stage $s: speed, last losses, validation --"
  grep -E "time \(data\)" "$OUT/stage$s.log" | tail -1 | sed -E 's/.*(time \(data\): [0-9.]+ \([0-9.]+\)).*(l_g_total: [^ ]+).*/\1 \2/'
  grep -E "Validation prior|# (psnr|ssim)" "$OUT/stage$s.log" | tail -3
  grep -E "Error|error:" "$OUT/stage$s.log" | tail -3
done
cp -r experiments/TPDiff_GPUCheck_Stage*/train_*.log "$OUT/" 2>/dev/null || true
