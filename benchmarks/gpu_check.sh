#!/usr/bin/env bash
# The GPU check: every GPU path of sft on one H100 / H200, in at most ~8 minutes, with no network.
#   bash benchmarks/gpu_check.sh OUTDIR [WHEELS]
# WHEELS (default .whl beside the repo root, made by benchmarks/gpu_wheels.sh) holds what the GPU image lacks:
# trl, deeplake, bitsandbytes, deepspeed, datasets, gguf, hjson, dill, multiprocess.
# Runs, each a real `accelerate launch` with a shipped config and one process:
#   1. gpu_single LoRA on arch:llama-1b, train + merge          4. DeepSpeed ZeRO-3 + QLoRA (NF4, bf16 storage)
#   2. gpu_single QLoRA on arch:llama-1b, train + merge         5. FSDP2 + QLoRA
#   3. DeepSpeed ZeRO-2 + QLoRA                                 6. sft bench --matrix gpu --only opt-1.3b (+ baseline)
# Everything measured lands under OUTDIR: gpu_check.jsonl (one row per run: strategy, tokens/s, peak memory, eval
# loss, merge check, seconds, exit code), gpu_check.md (the table), each run's log and summary, and the bench's
# JSONL / Markdown.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTDIR [WHEELS]}
wheels=${2:-.whl}
cd "$(dirname "$0")/.."
mkdir -p "$out"
if [ -d "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sft-site \
    "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/sft-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu_check: no wheel folder $wheels; using what is installed" >&2
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 SFT_CACHE=${SFT_CACHE:-/tmp/sft-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
python3 -c "import torch,transformers,peft,accelerate; print('torch',torch.__version__,'transformers',transformers.__version__,'peft',peft.__version__,'accelerate',accelerate.__version__)" >> "$out/gpu.txt"

data=/tmp/sft-gpu-data
python3 - "$data" <<'PY' || exit 1
import random, sys
from sft.data.ingest import write_dataset
words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
def rows(n, seed):
    r = random.Random(seed)
    return [{"question": " ".join(r.choice(words) for _ in range(r.randint(5, 60))),
             "answer": " ".join(r.choice(words) for _ in range(r.randint(5, 200))), "source": "gpu"} for _ in range(n)]
write_dataset(sys.argv[1] + "/train", rows(3000, 1), progress=False)
write_dataset(sys.argv[1] + "/eval", rows(64, 2), progress=False)
PY

common=(model.name=arch:llama-1b model.dtype=bf16-mixed demo.generate=false "data.path=$data/train"
        "data.eval_path=$data/eval" data.seq_length=1024 training.per_device_train_batch_size=4
        training.max_steps=20 training.eval_strategy=steps training.eval_steps=20 training.save_strategy=no
        demo.accuracy_samples=0 training.logging_steps=5 training.progress=false)
run() {  # name, accelerate config, extra train overrides...
  local name=$1 config=$2; shift 2
  local t0=$(date +%s)
  timeout 300 python3 -m accelerate.commands.launch --config_file "configs/accelerate/$config" --num_processes 1 \
    -m sft.cli train "${common[@]}" "training.output_dir=/tmp/sft-gpu/$name" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  cp "/tmp/sft-gpu/$name/summary.json" "$out/$name.summary.json" 2>/dev/null
  python3 - "$name" "$rc" "$(( $(date +%s) - t0 ))" "$out" <<'PY'
import json, sys, os
name, rc, secs, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
row = {"run": name, "exit": rc, "seconds": secs}
p = os.path.join(out, name + ".summary.json")
if rc == 0 and os.path.exists(p):
    s = json.load(open(p))["summary"]
    row.update({k: s.get(k) for k in ("strategy", "tokens_per_s", "peak_rss_gb", "eval_loss", "merge_max_abs_diff",
                                      "loss_first", "loss_last", "model_tflops_per_s")})
else:
    row["tail"] = open(os.path.join(out, name + ".log")).read()[-1500:]
open(os.path.join(out, "gpu_check.jsonl"), "a").write(json.dumps(row) + "\n")
print(json.dumps({k: v for k, v in row.items() if k != "tail"}))
PY
}
run single-lora gpu_single.yaml
run single-qlora gpu_single.yaml quantization.mode=nf4
run zero2-qlora gpu_deepspeed_zero2.yaml quantization.mode=nf4
run zero3-qlora gpu_deepspeed_zero3_qlora.yaml quantization.mode=nf4
run fsdp-qlora gpu_fsdp_qlora.yaml quantization.mode=nf4
timeout 240 python3 -m sft.cli bench --matrix gpu --only opt-1.3b --steps 5 --warmup 2 --no-progress \
  --results-dir "$out/bench" > "$out/bench.log" 2>&1; echo "bench exit $?" >> "$out/bench.log"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(out + "/gpu_check.jsonl")]
lines = ["| run | exit | strategy | tokens/s | eval loss | merge check | s |", "|---|---|---|---|---|---|---|"]
for r in rows:
    f = lambda v, fmt: "" if v is None else format(v, fmt)
    lines.append(f"| {r['run']} | {r['exit']} | {r.get('strategy', '')} | {f(r.get('tokens_per_s'), ',.0f')} | "
                 f"{f(r.get('eval_loss'), '.4f')} | {f(r.get('merge_max_abs_diff'), '.2e')} | {r['seconds']} |")
open(out + "/gpu_check.md", "w").write(open(out + "/gpu.txt").read() + "\n" + "\n".join(lines) + "\n")
print("\n".join(lines))
PY
