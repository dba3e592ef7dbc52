"""No silent QLoRA (issue 35).

* Under FSDP and DeepSpeed ZeRO-3, a ``quantization.quant_storage`` that differs from the compute dtype is an error
  before the model loads (accelerate#3983: uint8 storage trains silently with loss 0.0 and grad_norm NaN;
  axolotl#2992: FSDP2 unshards Params4bit and drops quant_state).
* For every strategy the first optimizer step is checked: a loss that is not finite or exactly 0, or a gradient norm
  that is not finite, stops every rank with a message naming the strategy and the step, and nothing half-written
  is left. The bad step is made by sft.faults' SFT_FAULT_LOSS (the loss of one micro-step multiplied by NaN or 0
  before its backward: the NaN / zero then goes through the real backward, clipping and optimizer step).
  transformers' logging_nan_inf_filter hides a NaN loss from the logs (it logs the previous average, 0.0 at step 1).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sft import recipe as stages
from sft.config import RunConfig
from sft.data.arrow import write_arrow_dataset
from sft.errors import SftError
from tests.helpers import free_port

pytest.importorskip("bitsandbytes")

REPO = Path(__file__).resolve().parents[1]
SHARDED_ENVS = {
    "fsdp": {"ACCELERATE_USE_FSDP": "true"},
    "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
}


def _rows(n):
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    return [{"question": " ".join(words[(i + k) % 8] for k in range(3 + i % 5)),
             "answer": " ".join(words[(i * k) % 8] for k in range(2 + i % 7)), "source": "t"} for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("guards")
    write_arrow_dataset(str(d / "train"), _rows(64))
    return d


def _base_args(data: Path, out: Path) -> list[str]:
    return ["model.name=arch:tiny-llama", "model.dtype=fp32", "demo.generate=false", f"data.path={data / 'train'}", "data.eval_path=null",
            "data.seq_length=64", "training.per_device_train_batch_size=2", "training.max_steps=3",
            "training.eval_strategy=no", "training.save_strategy=steps", "training.save_steps=1",
            "training.logging_steps=1", "training.progress=false", "demo.accuracy_samples=0",
            "lora.dropout=0.0", f"training.output_dir={out}"]


def _env(tmp_path: Path, **extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               SFT_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    for k in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
              "ACCELERATE_DEEPSPEED_CONFIG_FILE", "SFT_FAULT_LOSS"):
        env.pop(k, None)
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------- quant storage


@pytest.mark.parametrize("launch", list(SHARDED_ENVS))
def test_quant_storage_mismatch_is_found_with_the_data_before_anything_loads(monkeypatch, data, tmp_path, launch):
    for k, v in SHARDED_ENVS[launch].items():
        monkeypatch.setenv(k, v)
    cfg = RunConfig()
    cfg.model.name = "arch:tiny-llama"
    cfg.data.path = str(data / "train")
    cfg.training.output_dir = str(tmp_path / "out")
    cfg.quantization.mode, cfg.quantization.quant_storage = "nf4", "uint8"
    with pytest.raises(SftError, match=r"quant_storage: uint8 under a .*quantization\.quant_storage=bf16"):
        stages.open_checked(cfg, 0, 1)
    cfg.quantization.quant_storage = "bf16"  # equal to the compute dtype: fine
    stages.open_checked(cfg, 0, 1)
    cfg.quantization.quant_storage, cfg.quantization.compute_dtype = "fp32", "bf16"
    with pytest.raises(SftError, match="quantization.quant_storage=bf16"):
        stages.open_checked(cfg, 0, 1)


@pytest.mark.multiprocess
def test_quant_storage_mismatch_stops_sft_train_before_the_model_is_built(data, tmp_path):
    """Under a ZeRO-3 launch's environment: exit 2 with the fix named, and no model built or cached."""
    env = _env(tmp_path, **SHARDED_ENVS["zero3"])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sft.cli", "train", *_base_args(data, out), "quantization.mode=nf4",
                           "quantization.quant_storage=uint8"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "quantization.quant_storage=bf16" in proc.stderr
    assert not (tmp_path / "cache" / "arch").exists() and not any((tmp_path / "cache").glob("**/*.safetensors"))
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()


# ------------------------------------------------------------------------------------------- first step


def _check_stopped(proc, out: Path, strategy: str, what: str) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-4000:]
    assert "first optimizer step (step 1)" in text and f"under {strategy}" in text and what in text, text[-4000:]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir()), "a checkpoint was written"
    assert not (out / "adapter").exists() and not (out / "merged").exists()
    return text


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind, what", [("nan", "loss nan"), ("zero", "loss 0")])
def test_first_step_check_single_process(data, tmp_path, kind, what):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sft.cli", "train", *_base_args(data, out)], cwd=REPO,
                          env=_env(tmp_path, SFT_FAULT_LOSS=f"{kind}:0:1"), capture_output=True, text=True,
                          timeout=300)
    _check_stopped(proc, out, "single", what)
    assert proc.returncode == 2


@pytest.mark.multiprocess
def test_first_step_check_passes_a_healthy_step(data, tmp_path):
    """The check itself does not stop a normal run, nor a bad step after the first (only the first is checked)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sft.cli", "train", *_base_args(data, out), "training.merge=false"],
                          cwd=REPO, env=_env(tmp_path, SFT_FAULT_LOSS="zero:0:2"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "adapter").exists()


@pytest.mark.slow
def test_first_step_check_stops_both_ddp_ranks(data, tmp_path):
    """Only rank 1's loss is poisoned: both ranks stop (the verdict is all-reduced), with the strategy named."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "gpu_multi.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), "-m", "sft.cli", "train", *_base_args(data, out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path, ACCELERATE_USE_CPU="true", SFT_FAULT_LOSS="nan:1:1",
                                                  SFT_WATCHDOG_STALE_S="30"),
                          capture_output=True, text=True, timeout=600)
    text = _check_stopped(proc, out, "ddp", "rank")
    assert text.count("first optimizer step (step 1)") >= 2, text[-4000:]  # every rank says it


@pytest.mark.slow
def test_first_step_check_stops_both_fsdp2_qlora_ranks(data, tmp_path):
    """FSDP2 + QLoRA (NF4, storage = compute dtype) on 2 CPU ranks, rank 0's first loss poisoned: both stop."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "gpu_fsdp_qlora.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "sft.cli", "train", *_base_args(data, out),
           "quantization.mode=nf4", "quantization.compute_dtype=fp32", "lora.target_modules=[all-linear]"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path, ACCELERATE_USE_CPU="true", SFT_FAULT_LOSS="nan:0:1",
                                                  SFT_WATCHDOG_STALE_S="30"),
                          capture_output=True, text=True, timeout=600)
    text = _check_stopped(proc, out, "fsdp2", "rank")
    assert text.count("first optimizer step (step 1)") >= 2, text[-4000:]


@pytest.mark.slow
def test_first_step_check_stops_both_zero2_qlora_ranks(data, tmp_path):
    """DeepSpeed ZeRO-2 + QLoRA on 2 CPU ranks (DeepSpeed's CPU accelerator), rank 1's first loss zero: both stop,
    and DeepSpeed's shared-memory all-reduce buffers are not left behind."""
    pytest.importorskip("deepspeed")
    from tests.helpers import shm_segments

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "gpu_deepspeed_zero2.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "sft.cli", "train", *_base_args(data, out),
           "quantization.mode=nf4", "quantization.compute_dtype=fp32"]
    before = shm_segments()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path, LOCAL_SIZE="2", SFT_FAULT_LOSS="zero:1:1",
                                                  SFT_WATCHDOG_STALE_S="30"),
                          capture_output=True, text=True, timeout=900)
    text = _check_stopped(proc, out, "deepspeed-zero2", "rank")
    assert text.count("first optimizer step (step 1)") >= 2, text[-4000:]
    assert not (shm_segments() - before), "DeepSpeed's shared memory was left behind"
