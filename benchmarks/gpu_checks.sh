#!/usr/bin/env bash
# What only a CUDA machine can show, in one short pass (at most about 9 minutes: the sum of the step limits below):
#   1. the tests marked gpu/tensorrt (AMP, channels_last, torch.compile, deterministic resume, TF32-off fusion);
#   2. the default run end to end on the GPU, fp32 and bf16+channels_last, with its manifests;
#   3. the mixed-precision training benchmark (fp32 vs bf16 vs channels_last+bf16, KDiffusion vs KD);
#   4. the whole test suite with a GPU present (tests must not assume a CPU-only machine).
# Logs land in $1 (default: gpu-checks/). Each step has its own time limit so that one hang costs only its share.
# With a second argument `throughput`, it runs the training-throughput pass instead (benchmarks/gpu_throughput.sh:
# peer loop vs ours and each step-overhead option, under 8 minutes on an H200), a device call of its own.
# Usage: bash benchmarks/gpu_checks.sh [OUT_DIR] [throughput]
set -uo pipefail
out=${1:-gpu-checks}
if [[ ${2:-} == throughput ]]; then
    exec bash "$(dirname "$0")/gpu_throughput.sh" "$out"
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PIPELINE_PROGRESS=0
py=${PYTHON:-python3}
runs=$(mktemp -d)  # fresh run folders: a rerun of this script times every stage again
cores=$(nproc)

# shellcheck source=benchmarks/gpu_step.sh
source "$(dirname "$0")/gpu_step.sh"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$py" -c "import torch, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| onnxruntime', ort.__version__, ort.get_available_providers())"
    "$py" -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>/dev/null || echo "tensorrt: not installed"
} >"$out/summary.txt" 2>&1
cat "$out/summary.txt"

step tests-gpu 150 "$py" -m pytest -q -rs -p no:cacheprovider -m "gpu or tensorrt" tests
step run-fp32 90 "$py" -m pipeline run all --out "$runs/fp32" --device cuda
step run-bf16 90 "$py" -m pipeline run all --out "$runs/bf16" --device cuda \
    --set training.amp=bf16 --set training.channels_last=true
for run in fp32 bf16; do
    "$py" -m pipeline inspect "$runs/$run" >>"$out/run-$run.log" 2>&1
done
step bench-gpu 120 "$py" benchmarks/bench_ddp.py gpu --teacher resnet32x4 --student ShuffleV1 \
    --methods kdiffusion,kd --modes fp32,bf16,channels_last+bf16 --batch 512 --steps 15 --workers $((cores > 2 ? cores - 2 : 1)) --repeats 2
step tests-all 100 "$py" -m pytest -q -n $((cores < 12 ? cores : 12)) -p no:cacheprovider tests
tail -n 25 "$out"/*.log
cat "$out/summary.txt"
