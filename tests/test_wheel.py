"""``pip install .`` without the checkout: the built wheel, installed into a clean venv, trains the demo for two
steps, and ``sft plan`` / ``sft bench`` find their shipped files (configs and matrices are package data).

The clean venv takes sft only from the wheel; its dependencies are this venv's installed packages, linked in one by
one (everything but sft itself: no editable finder, no checkout on sys.path), so the test needs no download."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _clean_venv(tmp: Path) -> Path:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_paths()["purelib"])
    target = next((venv / "lib").glob("python*/site-packages"))
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("sft", "__editable__", "_sft", "launch", "benchmarks")) or entry.suffix == ".pth" \
                and "editable" in name:
            continue
        dest = target / entry.name
        if not dest.exists():
            dest.symlink_to(entry)
    return venv


def test_wheel_installs_and_runs_without_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True)
    wheel = next(dist.glob("sft-*.whl"))
    venv = _clean_venv(tmp_path)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_HUB_OFFLINE"] = "1"

    def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "sft"), *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout)

    where = subprocess.run([str(py), "-c", "import sft, sys; print(sft.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert str(venv) in where and str(REPO) not in where, where  # sft comes from the wheel
    p = run("train", "training.max_steps=2", "demo.train_rows=64", "demo.test_rows=8", "demo.accuracy_samples=2",
            "training.progress=false")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (work / "outputs" / "demo" / "merged" / "config.json").is_file()
    assert "held-out accuracy of the reloaded merged model" in p.stdout
    plan = run("plan", "--nodes", "1", timeout=120)
    assert plan.returncode == 0 and "accelerate" in plan.stdout, plan.stdout + plan.stderr
    config_file = next(w for w in plan.stdout.split() if w.endswith(".yaml"))
    assert Path(config_file).is_absolute() and Path(config_file).is_file() or (work / config_file).is_file()
    bench = run("bench", "--help", timeout=120)
    assert bench.returncode == 0 and "--matrix" in bench.stdout, bench.stdout + bench.stderr
