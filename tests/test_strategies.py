"""Every launch mode end to end on 2 CPU ranks, launched as users launch them: `accelerate launch --config_file` with
the shipped configs (DDP: gpu_multi.yaml with ACCELERATE_USE_CPU=true; DeepSpeed ZeRO-2 / ZeRO-3 on DeepSpeed's CPU
accelerator; FSDP2), each with LoRA and with QLoRA (NF4 + double quant).

Each cell, on a tiny random Llama in fp32 (QLoRA computes in fp32 too, so losses can be compared tightly):
  * trains with evaluation on an eval set whose two shards differ in rows and tokens, and checkpoints every 2 steps;
  * really runs the strategy it was launched with (accelerate can silently fall back to DDP: the summary says);
  * writes the adapter, merges once on rank 0, and passes the merged-logits self-check;
  * has the same per-step losses as DDP at the same global batch (<= 1e-5 relative);
  * is SIGKILLed after its step-2 checkpoint, resumes with training.resume=auto, and ends with the same adapter
    as the uninterrupted run;
  * leaves no shared memory behind, killed or not. DeepSpeed cells run with LOCAL_SIZE=2, as DeepSpeed's own
    launcher sets it: DeepSpeed then maps a 66 MB /dev/shm/deepspeed_allreduce_buffer_* per rank for its CPU
    all-reduce, and never unlinks it.
Measured figures are written to $SFT_MATRIX_REPORT (if set) as JSON lines, for the README / notes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft.data.ingest import write_dataset
from tests.helpers import free_port, shm_segments, word_rows

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
CELLS = {  # name: (accelerate config, strategy the summary must report)
    "ddp": ("gpu_multi.yaml", "ddp"),
    "zero2": ("gpu_deepspeed_zero2.yaml", "deepspeed-zero2"),
    "zero3": ("gpu_deepspeed_zero3_qlora.yaml", "deepspeed-zero3"),
    "fsdp": ("gpu_fsdp_qlora.yaml", "fsdp2"),
}
STEPS, SAVE_EVERY, KILL_AT = 4, 2, 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from sft.data.source import ShardedSource

    work = tmp_path_factory.mktemp("strategies")
    write_dataset(str(work / "train"), word_rows(240, 1), progress=False)
    write_dataset(str(work / "eval"), word_rows(37, 2), progress=False)
    shards = [list(ShardedSource(str(work / "eval"), rank=r, world_size=2, shuffle=False).iter_rows(0)) for r in (0, 1)]
    chars = [sum(len(x["question"]) + len(x["answer"]) for x in s) for s in shards]
    assert len(shards[0]) != len(shards[1]) and chars[0] != chars[1]  # the eval shards differ in rows and tokens
    return work


def _train(work: Path, cell: str, quant: str, out: str, extra_env: dict | None = None, *extra: str):
    config, _ = CELLS[cell]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SFT_WATCHDOG_STALE_S="30")
    env.pop("ACCELERATE_USE_CPU", None)
    if cell in ("ddp", "fsdp"):
        env["ACCELERATE_USE_CPU"] = "true"  # DeepSpeed on CPU goes through its own accelerator instead
    else:
        env["LOCAL_SIZE"] = "2"  # what `deepspeed` (the launcher) sets: DeepSpeed's shared-memory all-reduce
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", "2", "--main_process_port", str(free_port()),
           "-m", "sft.cli", "train", "model.name=arch:tiny-llama", "model.dtype=fp32", "demo.generate=false",
           f"data.path={work / 'train'}", f"data.eval_path={work / 'eval'}", "data.seq_length=64",
           "training.per_device_train_batch_size=2", "training.per_device_eval_batch_size=2",
           f"training.max_steps={STEPS}", "training.eval_strategy=steps", f"training.eval_steps={SAVE_EVERY}",
           "training.save_strategy=steps", f"training.save_steps={SAVE_EVERY}", "demo.accuracy_samples=0",
           "training.logging_steps=1", "training.progress=false", "training.learning_rate=1e-2",
           "training.warmup_steps=0", "lora.dropout=0.0", "lora.target_modules=[all-linear]",
           f"training.output_dir={work / out}", f"quantization.mode={quant}", "quantization.compute_dtype=fp32",
           *extra]
    before = shm_segments()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - t0
    left = shm_segments() - before
    assert not left, f"{cell}-{quant} (exit {proc.returncode}) left shared memory behind: {sorted(left)}"
    return proc, seconds


def _summary(work: Path, out: str) -> dict:
    return json.loads((work / out / "summary.json").read_text())["summary"]


def _adapter(work: Path, out: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(work / out / "adapter" / "adapter_model.safetensors"))


def _report(row: dict) -> None:
    path = os.environ.get("SFT_MATRIX_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


_reference: dict[str, list[float]] = {}


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("cell", list(CELLS))  # ddp first: it is the reference of the others
def test_launch_mode(data, cell, quant):
    work, name = data, f"{cell}-{quant}"
    proc, seconds = _train(work, cell, quant, name)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    s = _summary(work, name)
    assert s["strategy"] == CELLS[cell][1], f"launched {cell} but the Trainer ran {s['strategy']}"
    assert s["world_size"] == 2 and s["steps"] == STEPS
    assert s["eval_loss"] is not None and 0 < s["eval_loss"] < 20
    assert out.count("merged the adapter into") == 1 and "rank 0: merged" in out
    assert s["merge_max_abs_diff"] is not None and s["merge_max_abs_diff"] < 1e-3, s["merge_max_abs_diff"]
    assert (work / name / "merged" / "config.json").is_file()
    losses = s["loss_history"]
    assert len(losses) == STEPS

    if cell == "ddp":
        _reference[quant] = losses
        rel = 0.0
    else:
        if quant not in _reference:
            pytest.skip("the DDP cell of this quantization did not run first (run the whole module)")
        ref = _reference[quant]
        rel = max(abs(a - b) / abs(a) for a, b in zip(ref, losses))
        assert rel <= 1e-5, f"{name} vs DDP per-step losses: {losses} vs {ref} (max relative {rel:.2e})"

    # killed after its step-2 checkpoint, resumed, same adapter as the uninterrupted run
    killed, _ = _train(work, cell, quant, name + "-r", {"SFT_FAULT_KILL": f"0:{KILL_AT}"})
    assert killed.returncode != 0
    assert (work / (name + "-r") / "checkpoints" / f"checkpoint-{SAVE_EVERY}" / "COMPLETE").exists()
    resumed, _ = _train(work, cell, quant, name + "-r", None, "training.resume=auto")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-6000:]
    assert f"resuming from {work / (name + '-r') / 'checkpoints' / f'checkpoint-{SAVE_EVERY}'}" in resumed.stdout
    a, b = _adapter(work, name), _adapter(work, name + "-r")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-6, f"{name}: resumed adapter differs from the uninterrupted one by {diff:.2e}"
    assert _summary(work, name + "-r")["loss_history"] == pytest.approx(losses[SAVE_EVERY:], rel=1e-6)
    _report({"cell": name, "seconds": round(seconds, 1), "loss_rel_vs_ddp": rel, "resume_max_abs_diff": diff,
             "merge_max_abs_diff": s["merge_max_abs_diff"], "eval_loss": s["eval_loss"]})
