#!/usr/bin/env bash
# The training-throughput table of docs/bench-training.md ("Step overhead"), in one pass of under 8 minutes on
# an H200 (the sum of the step limits below: 300 + 120 + 45 s):
#   1. throughput.md: peer loop vs ours (all options) for resnet32x4 -> ShuffleV1 and -> resnet8x4, KD and
#      KDiffusion (ML + TG, m = 4), batch 64 and 256, fp32 and bf16 (+ channels_last), and each option's own
#      effect at batch 64 (bench_throughput.py; the tables are rewritten after every cell, so a cut run keeps its part);
#   2. throughput-graphs.md: CUDA graphs (torch.compile reduce-overhead) on top of all options, batch 64;
#   3. profile.md: wall vs kernel time and launches per step, KD and KDiffusion, batch 64 (profile_step.py).
# Usage: bash benchmarks/gpu_throughput.sh [OUT_DIR]   (also: bash benchmarks/gpu_checks.sh OUT_DIR throughput)
set -uo pipefail
out=${1:-gpu-throughput}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PIPELINE_PROGRESS=0
py=${PYTHON:-python3}
cores=$(nproc)
workers=$((cores > 10 ? 8 : (cores > 2 ? cores - 2 : 1)))

# shellcheck source=benchmarks/gpu_step.sh
source "$(dirname "$0")/gpu_step.sh"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    echo "cores $cores, loader workers $workers"
} >"$out/summary.txt" 2>&1
cat "$out/summary.txt"

step throughput 300 "$py" benchmarks/bench_throughput.py --device cuda --workers "$workers" \
    --variants peer,all,all+channels_last,before,+inference_mode,+batched_chain,+device_data,+defer_metrics,+fused_sgd \
    --out "$out/throughput.md"
step throughput-graphs 120 "$py" benchmarks/bench_throughput.py --device cuda --workers "$workers" \
    --pairs resnet32x4:ShuffleV1 --batches 64 --variants all,all+cuda_graphs --out "$out/throughput-graphs.md"
step profile 45 "$py" benchmarks/profile_step.py --device cuda --batch 64 --out "$out/profile.md"
cat "$out"/*.md
grep -h "FAILED" "$out"/*.log
cat "$out/summary.txt"
