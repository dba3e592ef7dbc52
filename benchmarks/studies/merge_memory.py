"""Peak memory of `sft.merging.merge_adapter`, as a ratio to the base model's size on disk.

    .venv/bin/python -m benchmarks.studies.merge_memory --arch llama-1b --shard-size 500MB
    .venv/bin/python -m benchmarks.studies.merge_memory --arch llama-7b --shard-size 2GB --cases bf16 nf4

What it does: saves a random-init model of a published architecture (bf16) as a local model directory in several
safetensors shards (once, under --work; over 3B parameters it is written tensor by tensor with random values, so
that a 7B base does not need 14 GB to build), writes a LoRA adapter (r=16 on every linear layer of every decoder layer,
random A and B, plus sft_base.json pointing at that directory), then runs each merge in a fresh subprocess and reads
that process's peak RSS (``ru_maxrss``) when it ends. A subprocess that only imports the same modules gives the
floor (the interpreter, torch, transformers). Nothing here depends on the weights' values.

Cases: bf16 (shard by shard), nf4 (shard by shard, each weight re-quantized and dequantized), and with ``--check``
the same with the logits self-check, and ``--whole-model`` PEFT's whole-model merge for comparison.

Measured on the 2-core / 24 GiB build machine (2026-11; import floor 0.38 GiB; ratio = peak RSS / size on disk):

| base (bf16 on disk) | case | peak RSS | ratio |
|---|---|---|---|
| llama-1b, 5 shards, 2.30 GiB | bf16, shard by shard | 0.96 GiB | 0.42 |
| llama-1b | nf4 (re-quantize + dequantize), shard by shard | 0.97 GiB | 0.42 |
| llama-1b | bf16, shard by shard + logits self-check | 7.59 GiB | 3.30 |
| llama-1b | nf4, shard by shard + logits self-check | 8.82 GiB | 3.83 |
| llama-1b | bf16, PEFT whole-model merge (no check) | 5.55 GiB | 2.41 |
| llama-1b | nf4, whole-model merge (dequantize, PEFT merge; no check) | 6.95 GiB | 3.02 |
| llama-7b, 7 shards, 12.55 GiB | bf16, shard by shard | 1.19 GiB | 0.09 |
| llama-7b | nf4, shard by shard | 1.37 GiB | 0.11 |

Shard by shard, what is left above the floor is about the largest tensor (llama-1b: its 0.49 GiB embedding) plus a
few fp32 temporaries of one weight. The self-check holds one fp32 copy of the model (plus the mapped bf16 file
while loading it), which is why ``check="auto"`` skips it for models that would not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BUILD = """
import sys, torch
from sft.config import ModelConfig
from sft.models import build_random, load_tokenizer
arch, out, shard = sys.argv[1], sys.argv[2], sys.argv[3]
build_random(arch, 0, dtype=torch.bfloat16).save_pretrained(out, max_shard_size=shard)
load_tokenizer(ModelConfig(name="arch:" + arch)).save_pretrained(out)
"""

# For models too large to build in memory next to everything else (llama-7b: 13.5 GB): the same config, shapes,
# names and tied weights, random N(0, 0.02) bf16 values written tensor by tensor (the values do not matter here).
STREAM_BUILD = """
import json, sys, torch
from sft.config import ModelConfig
from sft.merging.shards import _ShardWriter
from sft.models import arch_config, load_tokenizer
from transformers import AutoModelForCausalLM
arch, out, shard = sys.argv[1], sys.argv[2], sys.argv[3]
limit = int(float(shard.upper().removesuffix("GB")) * 1e9) if shard.upper().endswith("GB") else int(float(shard.upper().removesuffix("MB")) * 1e6)
config = arch_config(arch)
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
specs = [(k, torch.bfloat16, tuple(v.shape)) for k, v in model.state_dict().items() if k not in tied]
groups, cur, size = [], [], 0
for spec in specs:
    n = 2 * torch.Size(spec[2]).numel()
    if cur and size + n > limit:
        groups.append(cur); cur, size = [], 0
    cur.append(spec); size += n
groups.append(cur)
import pathlib
out = pathlib.Path(out); out.mkdir(parents=True)
g = torch.Generator().manual_seed(0)
weight_map, total = {}, 0
for i, group in enumerate(groups):
    name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    w = _ShardWriter(out / name, group)
    for key, dt, shape in group:
        t = torch.ones(shape, dtype=dt) if key.endswith("norm.weight") else (torch.randn(shape, generator=g) * 0.02).to(dt)
        w.write(key, t); weight_map[key] = name; total += 2 * t.numel()
    w.close()
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
config.architectures = [type(model).__name__]
config.dtype = "bfloat16"
config.save_pretrained(out)
load_tokenizer(ModelConfig(name="arch:" + arch)).save_pretrained(out)
"""

MERGE = """
import json, resource, sys, time
import torch
import sft.merging, sft.models, transformers, peft, safetensors  # the floor: what every case imports
args = json.loads(sys.argv[1])
report = None
t0 = time.perf_counter()
if args["adapter"]:
    r = sft.merging.merge_adapter(args["adapter"], args["out"], overwrite=True, check=args["check"],
                                  method=args["method"])
    report = r.__dict__
print("RESULT " + json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                              "seconds": time.perf_counter() - t0, "report": report}))
"""


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", BNB_DISABLE_KERNELS_HUB="1",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def build_base(arch: str, shard: str, work: Path, stream: bool) -> Path:
    out = work / f"base-{arch}-{shard}"
    if (out / "config.json").is_file():
        return out
    tmp = work / (out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-c", STREAM_BUILD if stream else BUILD, arch, str(tmp), shard], check=True,
                   env=_env())
    os.replace(tmp, out)
    return out


def shard_files(base: Path) -> list[Path]:
    index = base / "model.safetensors.index.json"
    if index.is_file():
        return [base / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [base / "model.safetensors"]


def write_adapter(base: Path, out: Path, quant: str, r: int = 16) -> Path:
    """An adapter in PEFT's format for every q/k/v/o/gate/up/down projection, without building the model."""
    import torch
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sft.config import ModelConfig, QuantizationConfig
    from sft.merging import write_base_meta

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for f in shard_files(base):
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                if key.endswith(".weight") and key.split(".")[-2] in targets:
                    n_out, n_in = sf.get_slice(key).get_shape()
                    module = key.removesuffix(".weight")
                    tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * 0.01
                    tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.01
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type="CAUSAL_LM").save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, out / f.name)
    write_base_meta(out, ModelConfig(name=str(base), dtype="bf16-mixed"), QuantizationConfig(mode=quant), 0)
    return out


def run_case(adapter: Path | None, out: Path, check: bool, method: str) -> dict:
    arg = json.dumps({"adapter": str(adapter) if adapter else None, "out": str(out), "check": check, "method": method})
    proc = subprocess.run([sys.executable, "-c", MERGE, arg], capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        raise SystemExit(f"merge failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama-1b", help="architecture from sft.models.ARCHITECTURES")
    p.add_argument("--shard-size", default="500MB", help="max_shard_size of the saved base")
    p.add_argument("--cases", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    p.add_argument("--check", action="store_true", help="also measure with the logits self-check on")
    p.add_argument("--whole-model", action="store_true", help="also measure PEFT's whole-model merge")
    p.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "sft-merge-memory"))
    p.add_argument("--json", help="append the results as JSON lines to this file")
    p.add_argument("--build", choices=["auto", "model", "stream"], default="auto",
                   help="how to make the base: build_random + save_pretrained (model), or tensor by tensor with random "
                        "values (stream: little memory); auto streams architectures over 3B parameters")
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from sft.models import build_random

    n_params = sum(p.numel() for p in build_random(args.arch, 0, device="meta").parameters())
    stream = args.build == "stream" or (args.build == "auto" and n_params > 3e9)
    base = build_base(args.arch, args.shard_size, work, stream)
    files = shard_files(base)
    disk = sum(f.stat().st_size for f in files)
    print(f"base {base}: {len(files)} shards, {disk / 2**30:.2f} GiB on disk, largest shard "
          f"{max(f.stat().st_size for f in files) / 2**30:.2f} GiB (built in {time.perf_counter() - t0:.0f} s)")
    floor = run_case(None, work / "unused", False, "auto")["peak_rss"]
    print(f"import floor (python + torch + transformers + peft): {floor / 2**30:.2f} GiB")
    rows = []
    for quant in args.cases:
        adapter = write_adapter(base, work / f"adapter-{quant}", "nf4" if quant == "nf4" else "none")
        adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
        variants = [(False, "shards")] + ([(True, "shards")] if args.check else []) + \
                   ([(False, "model")] if args.whole_model else [])
        for check, method in variants:
            out = work / "merged"
            res = run_case(adapter, out, check, method)
            shutil.rmtree(out, ignore_errors=True)
            row = {"arch": args.arch, "base": quant, "method": method, "check": check, "shards": len(files),
                   "disk_bytes": disk, "adapter_bytes": adapter_bytes, "peak_rss": res["peak_rss"], "floor": floor,
                   "ratio": res["peak_rss"] / disk, "ratio_above_floor": (res["peak_rss"] - floor) / disk,
                   "seconds": res["seconds"]}
            rows.append(row)
            print(f"{quant:5s} {method:6s} check={str(check):5s}: peak RSS {res['peak_rss'] / 2**30:.2f} GiB = "
                  f"{row['ratio']:.2f} x the model on disk ({row['ratio_above_floor']:.2f} x above the import floor), "
                  f"{res['seconds']:.0f} s")
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
