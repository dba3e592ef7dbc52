"""What every `sft bench` command shares, from its parsed arguments: the command line that reproduces the run,
the runner's options, the console, and the header (machine facts, measured peak) every record of a run carries.

benchmarks.cli (the parser and the matrix / report commands) and benchmarks.scaling (the scaling command) both start
their runs here.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from sft.errors import ConfigError


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (rebuilt from the parsed options, so it is right however we were called)."""
    parts = ["sft", "bench"]
    if args.mode != "run":
        parts.append(args.mode)
    if args.mode == "run":
        parts += ["--matrix", args.matrix]
        for s in args.axis_overrides:
            parts += ["--set", s]
        for o in args.only:
            parts += ["--only", o]
        if args.repeat != 3:
            parts += ["--repeat", str(args.repeat)]
        if not args.warmup_cell:
            parts.append("--no-warmup-cell")
    if args.mode == "scaling":
        parts += ["--ranks", ",".join(map(str, args.ranks)), "--modes", args.modes, "--model", args.model,
                  "--seq-length", str(args.seq_length), "--micro-batch", str(args.micro_batch),
                  "--variant", args.variant, "--lora-r", str(args.lora_r), "--lora-targets", args.lora_targets]
        if args.dtype:
            parts += ["--dtype", args.dtype]
        if not args.checkpointing:
            parts.append("--no-checkpointing")
        if args.bandwidth_gbps:
            parts += ["--bandwidth-gbps", ",".join(f"{x:g}" for x in args.bandwidth_gbps)]
        if args.latency_us:
            parts += ["--latency-us", ",".join(f"{x:g}" for x in args.latency_us)]
    for flag, value in (("--steps", args.steps), ("--warmup", args.warmup), ("--dataset-rows", args.dataset_rows)):
        if value is not None:
            parts += [flag, str(value)]
    if args.launcher != "accelerate":
        parts += ["--launcher", args.launcher]
    for e in args.cell_env:
        parts += ["--env", e]
    if not args.pin:
        parts.append("--no-pin")
    return " ".join(shlex.quote(p) for p in parts)


def run_options(args: argparse.Namespace, steps: int, warmup: int):
    """The runner's options from the parsed `sft bench` arguments."""
    from benchmarks.runner import DEFAULT_RESULTS, RunOptions

    env = {}
    for item in args.cell_env:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        env[k] = v
    return RunOptions(steps=steps, warmup=warmup, results_dir=Path(args.results_dir or DEFAULT_RESULTS),
                      cell_timeout_s=args.cell_timeout, launcher=args.launcher, pin=args.pin,
                      keep_work=args.keep_work, progress=args.progress, command=command_line(args), env=env)


def make_console():
    """rich console; wide when output is not a terminal (logs, CI), so the tables stay readable."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    return console


def start_run(kind: str, name: str, description: str, args, console) -> dict:
    """Machine facts and the measured peak: the header every record of a run carries."""
    from benchmarks.machine import describe_machine, machine_facts, measure_peak_isolated
    from benchmarks.report import peak_section

    facts = machine_facts()
    console.print(describe_machine(facts))
    console.print(f"measuring the GEMM peak ({args.peak_seconds:.1f} s per dtype) ...")
    env = dict(kv.partition("=")[::2] for kv in args.cell_env)
    peak = measure_peak_isolated(args.peak_seconds, env=env, pin=args.pin)
    from rich.markdown import Markdown

    console.print(Markdown(peak_section(peak, facts)))
    import os

    stamp = time.strftime("%Y%m%dT%H%M%S")
    facts["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return {"kind": kind, "run_id": f"{stamp}-{name}", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "matrix": name, "description": description, "command": command_line(args), "machine": facts,
            "peak": peak}
