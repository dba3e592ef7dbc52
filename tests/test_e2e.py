"""End to end through the real CLI on a tiny random model and a small ingested dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SFT = [str(Path(sys.executable).parent / "sft")] if (Path(sys.executable).parent / "sft").exists() else [sys.executable, "-m", "sft.cli"]


def run_sft(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([*SFT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"sft {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def write_jsonl(path: Path, n: int, offset: int = 0) -> None:
    colours = ["red", "green", "blue", "amber", "violet", "cyan", "black", "white"]
    with path.open("w") as f:
        for i in range(offset, offset + n):
            c = colours[i % len(colours)]
            f.write(json.dumps({"instruction": f"What colour is item {i}?", "output": f"Item {i} is {c}."}) + "\n")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    write_jsonl(work / "train.jsonl", 240)
    write_jsonl(work / "test.jsonl", 40, offset=1000)
    for split in ("train", "test"):
        run_sft("ingest", str(work / f"{split}.jsonl"), "--out", str(work / f"ds-{split}"),
                "--map", "question=instruction", "answer=output", cwd=work)
    proc = run_sft(
        "train", "--config", "demo",
        "model.name=arch:tiny-llama", "model.dtype=fp32", "demo.generate=false",
        f"data.path={work / 'ds-train'}", f"data.eval_path={work / 'ds-test'}",
        "data.seq_length=64", "training.max_steps=40", "training.per_device_train_batch_size=4",
        "training.learning_rate=1e-2", "training.warmup_steps=2", "training.logging_steps=1",
        "demo.accuracy_samples=0", "training.eval_strategy=no", "training.save_strategy=steps",
        "training.save_steps=20", f"training.output_dir={work / 'out'}", "training.progress=false",
        "lora.dropout=0.0", "lora.target_modules=[all-linear]",
        cwd=work,
    )
    return work, proc


def test_ingest_then_train_loss_drops(trained_run):
    work, proc = trained_run
    summary = json.loads((work / "out" / "summary.json").read_text())["summary"]
    assert summary["steps"] == 40
    assert summary["tokens"] == 40 * 4 * 64
    assert summary["loss_last"] < 0.7 * summary["loss_first"], summary
    assert summary["tokens_per_s"] > 0
    assert "summary" in proc.stdout and "trainable params" in proc.stdout
    from sft.allocator import resolve

    # `sft train` re-executed itself on training.allocator=auto's choice before importing torch
    assert summary["allocator"] == resolve("auto")[0], summary


def test_adapter_saved_in_peft_format(trained_run):
    work, _ = trained_run
    adapter = work / "out" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not list(adapter.glob("*.bin")), "only safetensors are written"
    ckpts = sorted((work / "out" / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-20", "checkpoint-40"]


def test_merged_logits_equal_adapter_logits(trained_run):
    from transformers import AutoModelForCausalLM

    from sft.merging import load_adapter_model

    work, _ = trained_run
    # Compared in float64: the fp32 run trained and merged in fp32; evaluating both in float64 removes the
    # forward pass's own fp32 rounding (~5e-6 on these logits), leaving the merge's error.
    adapter_model, tok = load_adapter_model(work / "out" / "adapter", dtype=torch.float64)
    merged = AutoModelForCausalLM.from_pretrained(work / "out" / "merged", dtype=torch.float64)
    ids = tok(["Question: What colour is item 7?\n\nAnswer:", "Question: hello there\n\nAnswer: Item"],
              return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        a = adapter_model(input_ids=ids).logits
        b = merged(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    # and the adapter really changed the model: merged != base
    base = adapter_model.get_base_model()
    with adapter_model.disable_adapter(), torch.no_grad():
        c = adapter_model(input_ids=ids).logits
    assert (b - c).abs().max().item() > 1e-3
    del base


def test_merge_and_generate_standalone(trained_run):
    work, _ = trained_run
    proc = run_sft("merge", "--adapter", str(work / "out" / "adapter"), "--out", str(work / "merged2"), cwd=work)
    assert "logits check" in proc.stdout
    assert (work / "merged2" / "config.json").is_file()
    proc = run_sft("generate", "--model", str(work / "merged2"), "--prompt", "What colour is item 3?",
                   "--max-new-tokens", "8", cwd=work)
    text = proc.stdout.split("What colour is item 3?")[-1].strip()
    assert text, proc.stdout
    # merging into an existing directory needs --overwrite, and fails before any work
    proc = run_sft("merge", "--adapter", str(work / "out" / "adapter"), "--out", str(work / "merged2"), cwd=work, check=False)
    assert proc.returncode == 2 and "already exists; pass --overwrite" in proc.stderr


def test_seed_recipe_offline_stops_at_once(tmp_path):
    proc = run_sft("train", "--config", "opt-1.3b-lima", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "model=arch:opt-1.3b" in proc.stderr or "arch:opt-1.3b" in proc.stderr
    assert "sft ingest" in proc.stderr
