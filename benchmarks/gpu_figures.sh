#!/usr/bin/env bash
# On a machine with CUDA GPUs (never in CI): the GPU figures of issue 31, each written to benchmarks/results with
# the device named. Training speed in one process and, where there are several GPUs, in one process per GPU
# (torchrun, NCCL); one organ with 5 proposals of the bundled default model.
#     bash benchmarks/gpu_figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then echo "no CUDA GPU here: these figures need one" >&2; exit 1; fi
python benchmarks/training_speed.py --device cuda --settings 16x4
if [ "$gpus" -gt 1 ]; then
    torchrun --standalone --nproc_per_node "$gpus" benchmarks/training_speed.py --device cuda --settings 16x4
fi
python benchmarks/segment_organ.py --device cuda --output benchmarks/results/segment_organ-cuda.json
