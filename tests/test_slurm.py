"""The shipped Slurm templates, submitted unmodified with `sbatch` to a real 2-node Slurm cluster on this machine
(tests/slurm_cluster.py: slurmctld + one slurmd per network namespace, every node with its own eth0 and address, this
host's name resolving to loopback as on Debian nodes). No stand-in for srun, sbatch or scontrol.

* the CPU template trains 2 nodes x 1 rank over the route to the master and matches a 1-node 2-rank run, loss for loss;
* the GPU template's rank arithmetic, on CPU ranks (2 "GPUs" per node declared as GRES: 4 ranks);
* preemption: the early warning (USR1 to the batch script) and `scontrol requeue` (SIGTERM to every process) each
  stop the job with a complete checkpoint; the job requeues, resumes by itself and ends with the uninterrupted
  job's adapter, bit for bit (fp32);
* a dead node: one node's slurmd, slurmstepd and ranks are SIGKILLed mid-run; the surviving rank names the lost
  rank and node within 2 minutes, the job fails, and requeued it resumes from the last checkpoint.

Needs root, iproute2 and `slurm-wlm` + `munge` (.ci/run installs them); skipped only without root (without the
packages the cluster fixture fails, naming them).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import Cluster, skip_reason

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

CPU = "launch/slurm/cpu_multi_node.sbatch"
GPU = "launch/slurm/gpu_multi_node.sbatch"
STEPS, SAVE = 10, 2
JOB_TIMEOUT = 300  # one tiny-llama job on the 2 shared cores takes well under a minute


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "model.name=arch:tiny-llama", "model.dtype=fp32", "demo.generate=false", f"data.path={data}",
            "data.eval_path=null", "data.seq_length=32", f"training.max_steps={STEPS}",
            "training.per_device_train_batch_size=2", "training.eval_strategy=no", "training.save_strategy=steps",
            f"training.save_steps={SAVE}", "training.progress=false", "demo.accuracy_samples=0",
            "training.merge=false", "training.logging_steps=1", "training.learning_rate=5e-3",
            "training.warmup_steps=0", "lora.dropout=0.0", f"training.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(2, kill_wait=30, slurmd_timeout=30)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    from sft.data.ingest import write_dataset

    w = tmp_path_factory.mktemp("slurm")
    rows = [{"question": f"What is item {i} made of?", "answer": f"Item {i} is made of {'wood' if i % 3 else 'stone'}.",
             "source": f"s{i // 16}"} for i in range(64)]
    write_dataset(str(w / "ds"), rows, progress=False)
    return w


def _env(cluster: Cluster, **extra: str) -> dict:
    e = cluster.env(SFT_VENV=str(Path(sys.executable).parents[1]), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                    TOKENIZERS_PARALLELISM="false", SFT_WATCHDOG_STALE_S="15", **extra)
    for k in [k for k in e if k.startswith(("SFT_FAULT", "SLURM_JOB", "SLURM_NODE"))]:
        e.pop(k)
    return e


def _submit(cluster: Cluster, work: Path, template: str, name: str, args: list[str], *sbatch_opts: str,
            **env: str) -> tuple[int, Path]:
    log = work / f"{name}.out"
    job = cluster.sbatch(f"--output={log}", f"--job-name={name}", *sbatch_opts, template, *args, cwd=REPO,
                         env=_env(cluster, **env))
    return job, log


def _done(cluster: Cluster, job: int, log: Path, timeout: float = JOB_TIMEOUT, state: str = "COMPLETED") -> dict:
    info = cluster.wait(job, timeout)
    text = log.read_text() if log.exists() else "(no job log)"
    assert info["JobState"] == state, f"job {job}: {info.get('JobState')} {info.get('ExitCode')}\n{text[-5000:]}"
    return info


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["summary"]


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: Path, b: Path) -> float:
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def _wait_for(path: Path, cluster: Cluster, job: int, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_dir():  # complete checkpoints appear by rename
        state = cluster.job(job).get("JobState")  # COMPLETING: a requeued job's last instance still ends
        assert state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"), \
            f"job {job} is {state} before {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def two_nodes(cluster, work):
    """The CPU template, unmodified, on 2 nodes (1 rank each): the uninterrupted reference of the tests below."""
    out = work / "two-nodes"
    job, log = _submit(cluster, work, CPU, "cpu2", _train_args(work / "ds", out), "--nodes=2")
    _done(cluster, job, log)
    return out, log.read_text()


def test_cpu_template_trains_two_nodes_over_the_route_to_the_master_like_one_node(cluster, work, two_nodes):
    from tests.helpers import finish, launch

    out, text = two_nodes
    if socket.gethostbyname(socket.gethostname()).startswith("127."):
        print("this host's name resolves to loopback, as on Debian nodes: gloo must be told the interface")
    # the interface: each node's route to the master (printed by `sft launch` in the job log), handed to gloo
    assert text.count(f"master  : {cluster.names[0]}:29500 via eth0") == 2, text[-5000:]
    assert text.count("GLOO_SOCKET_IFNAME=eth0") >= 2
    assert f"node 1/2 ({cluster.names[1]}" in text and f"node 0/2 ({cluster.names[0]}" in text
    two = _summary(out)
    assert two["world_size"] == 2 and two["steps"] == STEPS and len(two["loss_history"]) == STEPS
    # the same run as 2 ranks on one node (loopback, no Slurm)
    one = launch("-m", "sft.cli", *_train_args(work / "ds", work / "one-node"), cwd=work, num_processes=2)
    text_one = finish(one, timeout=JOB_TIMEOUT)
    assert one.returncode == 0, text_one[-3000:]
    for step, (a, b) in enumerate(zip(_summary(work / "one-node")["loss_history"], two["loss_history"])):
        assert abs(a - b) <= 1e-6 * abs(a), f"step {step + 1}: one node {a}, two Slurm nodes {b}"


def test_gpu_template_rank_arithmetic_on_cpu_ranks(cluster, work):
    """2 nodes x 2 "GPUs" (GRES without devices; ACCELERATE_USE_CPU keeps the ranks on CPU): 4 ranks, node 1
    holds ranks 2-3, one world."""
    out = work / "gpu-template"
    job, log = _submit(cluster, work, GPU, "gpu2", _train_args(work / "ds", out, "training.max_steps=2"),
                       "--nodes=2", "--gpus-per-node=2", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    _done(cluster, job, log)
    text = log.read_text()
    assert "ranks 0-1 of 4, master" in text and "ranks 2-3 of 4, master" in text, text[-4000:]
    assert text.count("via eth0") == 2
    s = _summary(out)
    assert s["world_size"] == 4 and s["steps"] == 2


def test_early_warning_and_requeue_stop_with_a_checkpoint_and_resume_bit_identical(cluster, work, two_nodes):
    ref, _ = two_nodes
    out = work / "preempted"
    job, log = _submit(cluster, work, CPU, "preempt", _train_args(work / "ds", out), "--nodes=2")
    # 1) the early warning of `#SBATCH --signal=B:USR1@...`, sent now: USR1 to the batch script alone
    _wait_for(out / "checkpoints" / f"checkpoint-{SAVE}", cluster, job)
    cluster.cmd("scancel", "--batch", "--signal=USR1", str(job))
    deadline = time.monotonic() + 120
    while int(cluster.job(job).get("Restarts", 0)) < 1:
        assert time.monotonic() < deadline, f"job {job} not requeued 120 s after USR1\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    text = log.read_text()
    first = re.search(r"received SIGUSR1: stopped at step (\d+) of \d+, checkpoint-\d+ written in ([\d.]+) s", text)
    assert first, text[-5000:]
    assert "requeueing job" in text
    # 2) `scontrol requeue` of the running, resumed job: SIGTERM to every process, KillWait (30 s) to save
    step1 = int(first.group(1))
    _wait_for(out / "checkpoints" / f"checkpoint-{(step1 // SAVE + 1) * SAVE}", cluster, job)
    t = time.monotonic()
    cluster.cmd("scontrol", "requeue", str(job))
    deadline = time.monotonic() + 120
    while int(cluster.job(job).get("Restarts", 0)) < 2:
        assert time.monotonic() < deadline, f"job {job} not requeued\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    stopped = time.monotonic() - t
    info = _done(cluster, job, log)
    text = log.read_text()
    second = re.search(r"received SIGTERM: stopped at step (\d+) of \d+, checkpoint-\d+ written in ([\d.]+) s "
                       r"\(([\d.]+) s after the signal\)", text)
    assert second, text[-5000:]
    s = _summary(out)
    assert s["resumed_step"] == int(second.group(1)) and s["steps"] == STEPS
    diff = _max_diff(ref, out)
    assert diff == 0.0, f"adapter max |diff| {diff} against the uninterrupted job"
    print(f"\nSLURM-FIGURES requeue: USR1 stop at step {step1} (checkpoint {first.group(2)} s), SIGTERM stop at step "
          f"{second.group(1)} (checkpoint {second.group(2)} s, {second.group(3)} s after the signal; requeued "
          f"{stopped:.1f} s after `scontrol requeue`), restarts {info.get('Restarts')}, adapter max |diff| {diff}")


def test_a_dead_node_is_named_the_job_fails_and_requeued_resumes(cluster, work, two_nodes):
    ref, _ = two_nodes
    out = work / "dead-node"
    job, log = _submit(cluster, work, CPU, "deadnode", _train_args(work / "ds", out), "--nodes=2")
    _wait_for(out / "checkpoints" / f"checkpoint-{SAVE * 2}", cluster, job)
    dead = cluster.names[1]
    cluster.kill_node(dead)
    t = time.monotonic()
    pattern = re.compile(rf"error: rank 0: rank 1 \(host [^)]*Slurm node {dead}\) stopped responding")
    while not pattern.search(log.read_text()):
        assert time.monotonic() - t < 120, f"no rank named the lost node within 120 s\n{log.read_text()[-5000:]}"
        time.sleep(0.2)
    detected = time.monotonic() - t
    # the job leaves RUNNING: failed, or (--requeue) requeued by Slurm itself once it marks the node DOWN
    while True:
        info = cluster.job(job)
        if info["JobState"] in ("FAILED", "NODE_FAIL", "PENDING") or int(info.get("Restarts", 0)) > 0:
            break
        assert time.monotonic() - t < 180, f"job {job} still {info['JobState']} 180 s after the node died"
        time.sleep(0.2)
    ended = time.monotonic() - t
    text = log.read_text()
    assert re.search(r"srun: error: \S+: task 0: Exited with exit code [1-9]", text), text[-4000:]
    assert not (out / "summary.json").exists()
    last = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")
               if (p / "COMPLETE").is_file())
    # the node comes back (ReturnToService=2) and the job, requeued, resumes from the last checkpoint
    cluster.start_slurmd(dead)
    if int(info.get("Restarts", 0)) == 0:
        cluster.cmd("scontrol", "requeue", str(job))
    _done(cluster, job, log)
    s = _summary(out)
    assert s["resumed_step"] == last and s["steps"] == STEPS
    diff = _max_diff(ref, out)
    assert diff == 0.0, f"adapter max |diff| {diff}"
    print(f"\nSLURM-FIGURES dead node: named after {detected:.1f} s, job {info['JobState']} {info.get('ExitCode')} "
          f"after {ended:.1f} s, resumed from checkpoint-{last}, adapter max |diff| {diff}")


def test_scaling_study_through_slurm_writes_table_plot_and_model(cluster, work):
    import subprocess

    results = work / "results"
    cmd = [sys.executable, "-m", "sft.cli", "bench", "scaling", "--slurm", "--nodes", "1,2", "--model", "tiny-llama",
           "--seq-length", "32", "--micro-batch", "2", "--steps", "4", "--warmup", "1", "--dataset-rows", "200",
           "--results-dir", str(results), "--job-timeout", "240"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(cluster), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    md = next(results.glob("slurm-scaling-*.md")).read_text()
    assert re.search(r"^\| 1 \| 1 \| \d+ \| \d+ \| 1\.00 \|", md, flags=re.M), md
    assert re.search(r"^\| 2 \| 2 \| \d+ \| \d+ \| [\d.]+ \| [\d.]+ \| [\d.]+% \| [\d.]+ \| [\d.]+ \| [\d.]+% \|",
                     md, flags=re.M), md
    assert "These nodes share one machine" in md and "sft bench scaling --slurm --nodes 1,2" in md
    assert next(results.glob("slurm-scaling-*.png")).stat().st_size > 1000
    print("\nSLURM-FIGURES scaling:\n" + md)
