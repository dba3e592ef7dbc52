"""Scaling studies through Slurm: ``sft bench scaling --slurm --nodes 1,2 [...]``.

For every node count N it submits ``launch/slurm/cpu_multi_node.sbatch`` (``--template`` for another) with
``sbatch --nodes=N``, a short training run (``--steps`` measured after ``--warmup``; weak scaling: every rank keeps
``--micro-batch`` sequences per step), waits for the jobs, reads each run's ``summary.json``, and writes a table, a
plot and a JSON file into ``--results-dir``:

* tokens/s, tokens/s per rank, efficiency against 1 node (tokens/s per rank over the 1-node run's), the median step
  time, and the all-reduce share of a step, measured as (step_N - step_1) / step_N (everything N nodes add to one
  node's step: the gradient all-reduce and the data-parallel overhead);
* beside each point the cost model's prediction (benchmarks.costmodel: the 1-node step plus a ring all-reduce of
  the LoRA gradients over the network given by ``--bandwidth-gbps`` / ``--latency-us``, first pair).

The jobs must see this directory and the dataset (a shared filesystem, as the templates already need). Each job's
log names its nodes' host names; when they are all the same host, the table says that the nodes share one
machine, so that the figures test the tool, not the hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from sft.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "launch/slurm/cpu_multi_node.sbatch"
TERMINAL_GONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED")


def train_args(args, data: str, out: Path) -> list[str]:
    steps = (args.steps if args.steps is not None else 6) + (args.warmup if args.warmup is not None else 1)
    model = args.model if ":" in args.model or "/" in args.model else f"arch:{args.model}"
    return ["train", f"model.name={model}", f"data.path={data}", "data.eval_path=null",
            f"data.seq_length={args.seq_length}", f"training.per_device_train_batch_size={args.micro_batch}",
            f"training.max_steps={steps}", "training.save_strategy=no", "training.eval_strategy=no",
            "training.merge=false", "training.progress=false", "demo.generate=false", "demo.accuracy_samples=0",
            f"lora.r={args.lora_r}", f"lora.target_modules=[{args.lora_targets}]",
            f"training.output_dir={out}", *(args.train_arg or [])]


def _job_state(job: int) -> str:
    r = subprocess.run(["scontrol", "-o", "show", "job", str(job)], capture_output=True, text=True, timeout=60)
    m = re.search(r"JobState=(\S+)", r.stdout)
    return m.group(1) if m else "GONE"


def submit(template: str, nodes: int, log: Path, argv: list[str], sbatch_args: list[str]) -> int:
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", f"--output={log}", f"--job-name=sft-scaling-{nodes}",
           *sbatch_args, template, *argv]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise ConfigError(f"sbatch failed ({r.returncode}): {r.stderr.strip()} (command: {' '.join(cmd)})")
    return int(r.stdout.strip().split(";")[0])


def wait(jobs: dict[int, int], timeout: float) -> dict[int, str]:
    """{nodes: job id} -> {nodes: final state}; jobs still running at ``timeout`` are cancelled."""
    deadline, states = time.monotonic() + timeout, {}
    while len(states) < len(jobs):
        for n, job in jobs.items():
            if n not in states:
                s = _job_state(job)
                if s in TERMINAL_GONE or s == "GONE":
                    states[n] = s
        if len(states) < len(jobs) and time.monotonic() > deadline:
            for n, job in jobs.items():
                if n not in states:
                    subprocess.run(["scancel", str(job)], capture_output=True, timeout=60)
                    states[n] = "TIMEOUT (cancelled by sft bench)"
        time.sleep(1.0)
    return states


def analyse(points: list[dict], grad_bytes: float, bandwidth_gbps: float, latency_us: float) -> list[dict]:
    from benchmarks.costmodel import CostModel, gbit_to_Bps

    base = next((p for p in points if p["nodes"] == 1), None)
    if base is None:
        raise ValueError("the 1-node run is missing (failed?): nothing to scale against")
    model = CostModel(t_compute_s=base["step_time_s"], grad_bytes=grad_bytes, bandwidth_Bps=gbit_to_Bps(bandwidth_gbps),
                      latency_s=latency_us * 1e-6)
    per_rank_1 = base["tokens_per_s"] / base["ranks"]
    rows = []
    for p in sorted(points, key=lambda p: p["nodes"]):
        per_rank = p["tokens_per_s"] / p["ranks"]
        rows.append({**p, "tokens_per_s_per_rank": per_rank, "efficiency": per_rank / per_rank_1,
                     "allreduce_share": max(0.0, (p["step_time_s"] - base["step_time_s"]) / p["step_time_s"]),
                     "model_step_s": model.weak_step_s(p["ranks"]), "model_efficiency": model.weak_efficiency(p["ranks"]),
                     "model_allreduce_share": model.comm_s(p["ranks"]) / model.weak_step_s(p["ranks"])})
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# sft bench scaling --slurm ({meta['date']})", "",
             f"Command: `{meta['command']}`", "",
             f"Template `{meta['template']}`, {meta['train']}; CPU of the submitting host: {meta['cpu']}. Cost model: "
             f"the 1-node step + a ring all-reduce of {meta['grad_bytes'] / 2**20:.2f} MiB of LoRA gradients at "
             f"{meta['bandwidth_gbps']:g} Gbit/s, {meta['latency_us']:g} us.", "",
             "| nodes | ranks | tokens/s | tokens/s per rank | efficiency vs 1 node | step time (s) | all-reduce share "
             "| model: step time (s) | model: efficiency | model: all-reduce share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['nodes']} | {r['ranks']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_rank']:.0f} | "
                     f"{r['efficiency']:.2f} | {r['step_time_s']:.3f} | {r['allreduce_share']:.1%} | "
                     f"{r['model_step_s']:.3f} | {r['model_efficiency']:.2f} | {r['model_allreduce_share']:.1%} |")
    lines.append("")
    lines.append("All-reduce share (measured): (step_N - step_1) / step_N, everything N nodes add to one node's step.")
    if meta.get("shared_host"):
        lines.append(f"**These nodes share one machine** (every job log names host `{meta['shared_host']}`): their "
                     "ranks compete for the same cores, so the figures test the tool, not the hardware.")
    for n, s in meta.get("failed", {}).items():
        lines.append(f"- {n} node(s): job {s}; see its log")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    n = [r["nodes"] for r in rows]
    a.plot(n, [r["tokens_per_s"] for r in rows], "o-", label="measured")
    a.plot(n, [rows[0]["tokens_per_s"] / rows[0]["ranks"] * r["ranks"] * r["model_efficiency"] for r in rows], "s--",
           label="cost model")
    a.set_xlabel("nodes"), a.set_ylabel("tokens/s"), a.legend(), a.set_xticks(n)
    b.plot(n, [r["efficiency"] for r in rows], "o-", label="measured")
    b.plot(n, [r["model_efficiency"] for r in rows], "s--", label="cost model")
    b.set_xlabel("nodes"), b.set_ylabel("efficiency vs 1 node"), b.set_ylim(0, 1.1), b.legend(), b.set_xticks(n)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def command_line(args) -> str:
    import shlex

    parts = ["sft", "bench", "scaling", "--slurm", "--nodes", ",".join(map(str, args.nodes)), "--model", args.model,
             "--seq-length", str(args.seq_length), "--micro-batch", str(args.micro_batch), "--lora-r", str(args.lora_r),
             "--lora-targets", args.lora_targets]
    for flag, v in (("--steps", args.steps), ("--warmup", args.warmup), ("--dataset-rows", args.dataset_rows)):
        if v is not None:
            parts += [flag, str(v)]
    if args.template != TEMPLATE:
        parts += ["--template", args.template]
    for s in args.sbatch_arg or []:
        parts.append(f"--sbatch-arg={s}")
    for t in args.train_arg or []:
        parts += ["--train-arg", t]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_slurm_scaling(args: argparse.Namespace) -> int:
    from benchmarks.costmodel import lora_param_count
    from benchmarks.data import ensure_dataset
    from benchmarks.machine import machine_facts

    nodes = sorted(set(args.nodes) | {1})
    if min(nodes) < 1:
        raise ConfigError(f"--nodes: node counts must be >= 1, got {args.nodes}")
    if not (REPO / args.template).is_file():
        raise ConfigError(f"--template {args.template}: no such file under {REPO}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results = Path(args.results_dir or REPO / "benchmarks" / "results").resolve()
    work = results / f"slurm-scaling-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    data = ensure_dataset(args.dataset_rows or 2000)
    jobs, logs = {}, {}
    for n in nodes:  # all submitted at once: the scheduler runs them as nodes free up
        logs[n] = work / f"nodes{n}.out"
        jobs[n] = submit(args.template, n, logs[n], train_args(args, data, work / f"nodes{n}"), args.sbatch_arg or [])
        print(f"submitted {n} node(s): job {jobs[n]} (log {logs[n]})", flush=True)
    states = wait(jobs, args.job_timeout)
    points, failed, hosts = [], {}, set()
    for n in nodes:
        summary = work / f"nodes{n}" / "summary.json"
        if not summary.is_file():
            failed[n] = f"{jobs[n]} {states[n]}, no summary.json"
            continue
        s = json.loads(summary.read_text())["summary"]
        points.append({"nodes": n, "ranks": s["world_size"], "tokens_per_s": s["tokens_per_s"],
                       "step_time_s": s["step_time_median_s"], "job": jobs[n]})
        text = logs[n].read_text() if logs[n].exists() else ""
        hosts |= set(re.findall(r"^node \d+/\d+ \(\S+, host (\S+)\)", text, flags=re.M))
    try:
        grad_bytes = 4.0 * lora_param_count(train_args(args, data, work)[1].split("=", 1)[1], args.lora_r,
                                            [t for t in args.lora_targets.split(",") if t])
        bw = (args.bandwidth_gbps or [25.0])[0]
        lat = (args.latency_us or [25.0])[0]
        rows = analyse(points, grad_bytes, bw, lat)
    except ValueError as e:
        print(f"sft bench scaling --slurm: {e}; jobs: {states}")
        return 1
    c = machine_facts().get("cpu", {})
    cpu = (f"{c.get('model', '?')}, {c.get('physical_cores', '?')} cores"
           + (", AMX" if c.get("amx_bf16") else ", no AMX") + (", avx512_bf16" if c.get("avx512_bf16") else ""))
    meta = {"date": stamp, "command": command_line(args), "template": args.template, "cpu": cpu,
            "train": f"{args.model}, seq {args.seq_length}, micro-batch {args.micro_batch} per rank, LoRA r{args.lora_r} "
                     f"{args.lora_targets}", "grad_bytes": grad_bytes, "bandwidth_gbps": bw, "latency_us": lat,
            "shared_host": next(iter(hosts)) if len(hosts) == 1 and len(nodes) > 1 else None, "failed": failed}
    md = results / f"slurm-scaling-{stamp}.md"
    md.write_text(markdown(rows, meta))
    (results / f"slurm-scaling-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    png = plot(rows, results / f"slurm-scaling-{stamp}.png", f"sft bench scaling --slurm: {meta['train']}")
    print(md.read_text())
    print(f"markdown: {md}\nplot: {png}\njob logs and runs: {work}")
    return 0 if not failed else 1
