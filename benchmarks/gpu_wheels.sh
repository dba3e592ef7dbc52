#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the wheels that benchmarks/gpu_check.sh installs on a GPU machine without
# network. The H200 image has torch, transformers, peft, accelerate, safetensors, pyarrow, rich, psutil, pyyaml,
# matplotlib, tqdm, ninja, msgpack, py-cpuinfo; it lacks these (versions as tested on CPU here):
#   trl deeplake bitsandbytes deepspeed datasets gguf hjson dill multiprocess
# Usage: bash benchmarks/gpu_wheels.sh [DIR]   (default .whl; keep it git-ignored: echo /.whl/ >> .git/info/exclude)
set -euo pipefail
dir=${1:-.whl}
mkdir -p "$dir"
py=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux1_x86_64 --platform any)
python3 -m pip download --no-deps "${py[@]}" -d "$dir" \
  trl==1.16.0 deeplake==4.7.4 bitsandbytes==0.50.2 datasets==5.2.0 gguf hjson dill multiprocess
# DeepSpeed is an sdist: build a pure-Python wheel (no op is compiled; they JIT on first use on the GPU machine)
DS_BUILD_OPS=0 python3 -m pip wheel --no-deps -w "$dir" deepspeed==0.19.8
ls -la "$dir"
