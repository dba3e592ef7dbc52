"""DeepSpeed's own CPU collectives (oneCCL op, shared-memory op) on 2 local ranks, through the study
benchmarks/studies/allreduce_backends.py.

Skipped unless deepspeed is installed. The oneCCL test also needs a oneCCL prefix in $CCL_ROOT (lib/libccl.so +
include/oneapi/ccl.hpp) and the deepspeed_ccl_comm op already JIT-built (the first build takes ~3 min on 2 cores:
run `python -m benchmarks.studies.allreduce_backends --backends ds-ccl --sizes-mb 1 --rounds 1` once); the shared-memory
test builds deepspeed_shm_comm on first use if no earlier DeepSpeed init did (then allowing up to 400 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import shm_segments

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "studies" / "allreduce_backends.py"


def _op_built(name: str) -> bool:
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())  # where DeepSpeed's JIT puts ops
    return (root / name / f"{name}.so").exists()


def _ccl_root() -> str | None:
    root = os.environ.get("CCL_ROOT")
    if root and (Path(root) / "lib" / "libccl.so").exists() and (Path(root) / "include" / "oneapi" / "ccl.hpp").exists():
        return root
    return None


def _run(backend: str, tmp_path: Path, limit: int = 55) -> dict:
    before = shm_segments()
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(SCRIPT), "--backends", backend, "--sizes-mb", "1", "--iters", "2", "--warmup", "1",
           "--rounds", "1", "--timeout", str(limit), "--output", "", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit + 5)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    left = shm_segments() - before
    assert not left, f"{backend} left shared memory behind: {sorted(left)}"
    data = json.loads(out.read_text())
    assert backend not in data["errors"], data["errors"].get(backend, {}).get("detail")
    return data["results"][backend]


@pytest.mark.slow
@pytest.mark.skipif(_ccl_root() is None, reason="no oneCCL prefix in $CCL_ROOT")
@pytest.mark.skipif(not _op_built("deepspeed_ccl_comm"), reason="deepspeed_ccl_comm not JIT-built yet (~3 min)")
def test_deepspeed_ccl_allreduce_two_ranks(tmp_path):
    res = _run("ds-ccl", tmp_path)
    assert all(res["checks"].values()), res["checks"]  # fp32 and bf16 sums are exact
    assert set(res["samples"]) == {"fp32:1", "bf16:1"}


@pytest.mark.slow
def test_deepspeed_shm_allreduce_two_ranks(tmp_path):
    # the first DeepSpeed init on CPU JIT-builds deepspeed_shm_comm (~30 s to ~3 min on 2 cores): allow for it
    res = _run("ds-shm", tmp_path, limit=55 if _op_built("deepspeed_shm_comm") else 400)
    assert all(res["checks"].values()), res["checks"]
    assert res["paths"]["fp32:1"] == "shm"  # the fp32 kernel only needs avx2
