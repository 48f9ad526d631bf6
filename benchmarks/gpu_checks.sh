#!/usr/bin/env bash
# Every GPU measurement of the project in one pass that stops itself inside a budget (default 520 s, under the
# 9 minutes one lent GPU call allows), keeping what it finished:
#   1. preflight: versions, GPU, CPU, the project importable, the data present (fails in seconds, not minutes);
#   2. throughput.md: our training loop vs the plain peer loop, KD and KDiffusion, batch 64 and 256, fp32 and
#      bf16 (+ channels_last); with GPU_CHECKS_ABLATION=1 each step-overhead option's own effect at batch 64;
#   3. profile.md: wall vs kernel time and launches per step at batch 64 (profile_step.py);
#   4. the full-data Fashion-MNIST rows: a sweep of vanilla, KD and KDiffusion x 3 seeds on all 60,000 training
#      images (preset fmnist-wrn_16_2-mobile_half-gpu), the teacher trained once there (fmnist.md, fmnist.json,
#      the sweep's report, and the teacher's weights to import elsewhere), while
#   5. the tests marked gpu/tensorrt run beside it (they assert no timings, so sharing the GPU is harmless).
# The step limits are cut to what is left of the budget; a cut step keeps its partial tables. Everything lands in
# OUT: small text files plus results.tar.gz (manifests, histories, logs, reports; no weights).
#
# Usage: bash benchmarks/gpu_checks.sh [OUT_DIR] [--rehearse]
#   --rehearse: the same steps on the CPU in a minute or two (tiny sizes; FMNIST_ROOT may then hold any small
#               set of the four IDX files, unchecked), so a typo never costs a GPU call; CI runs it
#               (tests/test_gpu_checks_rehearsal.py).
# Environment: PYTHON (default python3), GPU_CHECKS_BUDGET (seconds), FMNIST_ROOT (the four IDX files;
#              default .fmnist/ when present, else Debian's /usr/share/datasets/fashion-mnist), GPU_CHECKS_ONLY
#              (comma-separated step names, to finish what a cut pass left; preflight,fmnist-sweep gives the sweep the
#              whole budget), FMNIST_METHODS (vanilla,kd,kdiffusion; the six rows: vanilla,kd,kdiffusion,fitnet,at,dkd).
set -uo pipefail
out=${1:-gpu-checks}
rehearse=0
[[ ${2:-} == --rehearse || ${1:-} == --rehearse ]] && rehearse=1
[[ $out == --rehearse ]] && out=gpu-checks
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root" || exit 2
export PYTHONUNBUFFERED=1 PIPELINE_PROGRESS=0 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
cores=$(nproc)
budget=${GPU_CHECKS_BUDGET:-520}
start=$SECONDS
runs=$(mktemp -d)  # fresh run folders: a rerun of this script times every stage again
methods=${FMNIST_METHODS:-vanilla,kd,kdiffusion}
data=${FMNIST_ROOT:-$([[ -d .fmnist ]] && echo "$root/.fmnist" || echo /usr/share/datasets/fashion-mnist)}

# shellcheck source=benchmarks/gpu_step.sh
source "$here/gpu_step.sh"

if ((rehearse)); then
    device=cpu
    workers=0
    tp=(--quick --variants peer,all,+fused_sgd)
    prof=(--device cpu --teacher resnet20 --student resnet20 --steps 2 --batch 8 --methods kd)
    sweep_set=(--set training.tensorboard=false --set data.workers=0 --set data.verify_checksums=false --set data.train_subset=240 --set data.batch_size=32 --set teacher.optim.epochs=1
        --set student.optim.epochs=1 --set verify.samples=32 --set export.eval_samples=64
        --set export.calibration_samples=32 --set export.parity_samples=16)
    jobs=1
    seeds=0
    limits=(30 90 90 300 120)
else
    device=cuda
    workers=$((cores > 10 ? 8 : (cores > 2 ? cores - 2 : 1)))
    # peer vs ours only (115 s on an H200); GPU_CHECKS_ABLATION=1 adds each option's own effect (+50 s)
    variants=peer,all,all+channels_last
    ((${GPU_CHECKS_ABLATION:-0})) && variants+=,before,+inference_mode,+batched_chain,+device_data,+defer_metrics,+fused_sgd
    tp=(--device cuda --workers "$workers" --pairs resnet32x4:ShuffleV1 --variants "$variants")
    prof=(--device cuda --batch 64 --steps 10)
    sweep_set=(--set training.tensorboard=false)
    jobs=9
    seeds=0,1,2
    limits=(30 170 60 330 150)  # the sweep took 34 s (teacher) + about 290 s (9 cells sharing the GPU) on an H200
fi

# The sweep run without the steps that share the budget with it (GPU_CHECKS_ONLY=preflight,fmnist-sweep, as for
# the six rows: FMNIST_METHODS=vanilla,kd,kdiffusion,fitnet,at,dkd) may take the whole budget.
selected throughput || selected profile || selected tests-gpu || limits[3]=$budget

{
    echo "date $(date -u +%FT%TZ); budget ${budget}s; rehearse=$rehearse"
    lscpu | grep -E '^(Model name|CPU\(s\)):' | tr -s ' '
    grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
} >"$out/summary.txt" 2>&1

step preflight "${limits[0]}" "$py" - "$device" "$data" <<'EOF'
import sys, platform
import torch, torchvision, timm, onnx, onnxruntime, onnxconverter_common, polygraphy
import pipeline.cli, stages.export, exports.fp16  # the project itself, from this checkout
from pipeline.data import idx
device, data = sys.argv[1:3]
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| torchvision", torchvision.__version__, "| timm", timm.__version__, "| onnx", onnx.__version__,
      "| onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
if device == "cuda":
    assert torch.cuda.is_available(), "CUDA is not available"
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
missing = [f for f in idx.FILES.values() if not any((__import__("pathlib").Path(data) / n).is_file() for n in (f, f + ".gz"))]
assert not missing, f"Fashion-MNIST files missing under {data}: {missing}"
EOF
cat "$out/preflight.log" >>"$out/summary.txt"
if ! grep -q "== preflight: exit 0" "$out/summary.txt"; then
    echo "preflight failed; nothing else runs" | tee -a "$out/summary.txt"
    cat "$out/preflight.log"
    exit 1
fi

step throughput "$(limit "${limits[1]}" 240)" "$py" benchmarks/bench_throughput.py "${tp[@]}" --out "$out/throughput.md"
step profile "$(limit "${limits[2]}" 200)" "$py" benchmarks/profile_step.py "${prof[@]}" --out "$out/profile.md"

# The sweep and the GPU tests share the machine; the sweep is given what is left of the budget less packing time.
sweep_limit=$(limit "${limits[3]}" 25)
step fmnist-sweep "$sweep_limit" "$py" -m pipeline sweep --preset fmnist-wrn_16_2-mobile_half-gpu \
    --data-root "$data" --method "$methods" --seed "$seeds" \
    --device "$device" --jobs "$jobs" --out "$runs/fmnist" "${sweep_set[@]}" &
sweep_pid=$!
step tests-gpu "$(limit "${limits[4]}" 30)" "$py" -m pytest -q -rs -p no:cacheprovider -m "gpu or tensorrt" tests
wait "$sweep_pid"

"$py" -m pipeline compare "$runs/fmnist" --format markdown --output "$out/fmnist.md" >>"$out/compare.log" 2>&1
"$py" -m pipeline compare "$runs/fmnist" --format json --output "$out/fmnist.json" >>"$out/compare.log" 2>&1
"$py" -m pipeline report "$runs/fmnist" --output "$runs/fmnist/report.html" >>"$out/compare.log" 2>&1
cp "$runs/fmnist/logs"/*.log "$out/" 2>/dev/null
cp "$runs"/fmnist/teachers/*/teacher/teacher.safetensors "$out/" 2>/dev/null  # the shared teacher, to import elsewhere
tar -czf "$out/results.tar.gz" -C "$runs" --exclude='*.safetensors' --exclude='*.onnx' --exclude='*.pt' \
    --exclude='*.npz' --exclude=tensorboard --exclude=.scratch --exclude=.cache fmnist -C "$out" \
    $(cd "$out" && ls ./summary.txt ./*.log ./*.md ./*.json 2>/dev/null) 2>>"$out/compare.log"
echo "== total: $((SECONDS - start)) s of ${budget} s" | tee -a "$out/summary.txt"
tail -n 3 "$out"/*.log
cat "$out"/*.md 2>/dev/null
cat "$out/summary.txt"
