#!/usr/bin/env bash
# The GPU measurements of the throughput issue, in one script (run on a lent H200 from the repo root):
#   bash benchmarks/gpu.sh > benchmarks/$(date +%F)-h200.txt 2>&1
# Each `pixart bench` times diffusers' model and ours (one row per optimization, bf16) in alternation in one process.
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
for res in 256 512; do
  pixart bench --device cuda --model PixArt-XL/2 --resolution "$res" --batch 64 --compare diffusers --compile \
    --iters 20 --warmup 5 --out "benchmarks/xl2-${res}.json"
done
