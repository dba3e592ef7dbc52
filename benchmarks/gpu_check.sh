#!/usr/bin/env bash
# The GPU check: every GPU path of sft on one H100 / H200 with no network, one command, at most 8 minutes
# (benchmarks/gpu_check.py has the steps, each with its own time limit; `python -m benchmarks.gpu_check plan`).
#   bash benchmarks/gpu_check.sh OUTDIR [CARRY]             the check (GPU machine)
#   bash benchmarks/gpu_check.sh --only a,b OUTDIR [CARRY]  a rerun of some steps (setup always runs)
#   bash benchmarks/gpu_check.sh --dry-run OUTDIR [CARRY]   everything but the CUDA launches (CPU; CI runs it)
# CARRY (default .whl) is what benchmarks/gpu_wheels.sh builds: the wheels the GPU image lacks (bitsandbytes with
# only its CUDA 13 library, DeepSpeed and its imports, gguf) and the tokenizer arch: models use. The data is the
# Arrow format (sft/data/arrow.py): no deeplake on the GPU machine.
# Results: at most 5 files directly under OUTDIR: gpu.txt, gpu_check_plan.md, gpu_check.jsonl (one row per step:
# strategy, tokens/s, eval loss, merge check, seconds, exit code), gpu_check.md (the table), logs.tar.gz (logs,
# summaries, the bench's JSONL / Markdown).
# With the device tool: carry [".whl"], timeout_s 510, command
#   PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh $OUT
set -uo pipefail
mode=run
only=
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) mode=dry-run; shift ;;
    --only) only=$2; shift 2 ;;
    *) break ;;
  esac
done
out=${1:?usage: gpu_check.sh [--dry-run] [--only STEPS] OUTDIR [CARRY]}
cd "$(dirname "$0")/.."
carry=${2:-.whl}
mkdir -p "$out"
out=$(cd "$out" && pwd)
[ -d "$carry" ] && carry=$(cd "$carry" && pwd)
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 SFT_CACHE=${SFT_CACHE:-/tmp/sft-cache} SFT_GPU_WORK=${SFT_GPU_WORK:-/tmp/sft-gpu}
export SFT_ARCH_TOKENIZER=$carry/tokenizer
if [ "$mode" = dry-run ]; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  exec "$py" -m benchmarks.gpu_check dry-run "$out" "$carry"
fi
rm -rf "$SFT_GPU_WORK" && mkdir -p "$SFT_GPU_WORK"
if [ -d "$carry" ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sft-site \
    "$carry"/*.whl || { echo "gpu_check: installing the carried wheels failed" | tee "$out/gpu.txt"; exit 1; }
  export PYTHONPATH=/tmp/sft-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu_check: no carry folder $carry (bash benchmarks/gpu_wheels.sh $carry); using what is installed" >&2
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
"$py" -c "import torch,transformers,peft,accelerate; print('torch',torch.__version__,'transformers',transformers.__version__,'peft',peft.__version__,'accelerate',accelerate.__version__)" >> "$out/gpu.txt" 2>&1
exec "$py" -m benchmarks.gpu_check run "$out" "$carry" --only "$only"
