#!/usr/bin/env bash
# The GPU measurements in one script, from the repo root on a machine with one GPU and pixart installed:
#   bash benchmarks/gpu.sh > benchmarks/$(date +%F)-h200.txt 2>&1   (an argument: the folder for the JSONs)
# Each `pixart bench` times diffusers' model and ours (one row per optimization, bf16) in alternation in one
# process; the memory plan's prediction for PixArt-XL/2 at 1024 px is then checked against one real step.
set -euo pipefail
out=${1:-benchmarks}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
pixart() { python3 -m pixart "$@"; }
pixart bench --device cuda --model PixArt-XL/2 --resolution 256 --batch 64 --compare diffusers --compile \
  --iters 10 --warmup 3 --out "$out/xl2-256.json"
pixart bench --device cuda --model PixArt-XL/2 --resolution 512 --batch 32 --compare diffusers --compile \
  --iters 10 --warmup 3 --out "$out/xl2-512.json"
python3 tools/memory_plan.py --model PixArt-XL/2 --resolution 1024 --gpu-gb 141 --measure 16 --checkpoint 0
python3 tools/memory_plan.py --model PixArt-XL/2 --resolution 1024 --gpu-gb 141 --measure 64 --checkpoint 27
# pixart distill's three networks (generator, fake score, frozen teacher) at 512 px: the plan against two real steps
python3 tools/memory_plan.py --dmd --model PixArt-XL/2 --resolution 512 --world 1 --gpu-gb 141 --measure 16
python3 tools/memory_plan.py --dmd --model PixArt-XL/2 --resolution 512 --world 1 --gpu-gb 141 --measure 32 \
  --checkpoint 14
