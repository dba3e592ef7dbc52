"""Run benchmark cells, each in its own process (or one process per rank); their per-rank results become metrics
in benchmarks.metrics and rows in the JSONL results file (benchmarks.jsonl).

A cell in its own process gives each cell its own peak RSS, a clean allocator and thread pool, and isolation: a
cell that crashes, runs out of memory or hangs past ``cell_timeout`` is recorded with the last lines of its stderr
and the run goes on. Results are appended to ``<results>/<date>-<host>.jsonl`` one repeat at a time (one JSON
object per cell, with the machine facts, the measured peak, AMX / AVX512-BF16, threads and the commit), each with
its ratio to the baseline of the same workload in the same repeat.

The protocol (so that the benchmark cannot fool itself on a shared, noisy machine): cells run interleaved, the
whole list once per repeat (3 by default), forward in even repeats (baselines first) and reversed in odd ones
(baselines last); a warm-up cell runs before anything is measured and is discarded; the report gives each ratio's
median and its min-max over repeats (:func:`plan_runs`, :func:`assign_ratios`, report.combine_repeats).

Launch forms (CPU): one rank runs ``python -m launch.pin --cpus C -- -m benchmarks.cell SPEC`` (pinned to the
cores it owns, OMP_NUM_THREADS = their number); N ranks run the verified form
``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N -m launch.pin --cpus .. --cpus .. -- ...``
(or torchrun with ``launcher="torchrun"``). GPU: ``python -m benchmarks.cell`` / ``accelerate launch --multi_gpu``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks.cell import SPAWN_ENV
from benchmarks.jsonl import append_jsonl
from benchmarks.matrix import CellSpec, baseline_for
from benchmarks.metrics import aggregate, ratios
from benchmarks.machine import REPO_ROOT, core_groups

DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results"
SCHEMA = 1


@dataclass
class RunOptions:
    steps: int = 5
    warmup: int = 2
    results_dir: Path = DEFAULT_RESULTS
    cell_timeout_s: float = 1800.0
    launcher: str = "accelerate"  # accelerate | torchrun (ranks > 1)
    pin: bool = True  # CPU: pin each rank to its own physical cores
    keep_work: bool = False
    progress: bool = True
    command: str = ""
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the cells (e.g. OMP_WAIT_POLICY)


# --------------------------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cell_allocator_env(cell: CellSpec, env: dict[str, str]) -> dict[str, str]:
    """What a cell's process needs to start on its allocator: a framework cell's ``training.allocator`` (sft's
    default ``auto`` unless the variant overrides it), as ``sft train`` would preload it; the baseline (the seed
    recipe) runs on the system allocator, as the seed did."""
    if cell.runner != "framework":
        return {}
    from sft.allocator import preload_env

    return preload_env(str(cell.overrides.get("training.allocator", "auto")), env)


def launch_command(cell: CellSpec, spec_path: Path, opts: RunOptions) -> tuple[list[str], dict[str, str]]:
    from launch.topology import format_cpu_list

    py = sys.executable
    env = dict(os.environ)
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("BNB_DISABLE_KERNELS_HUB", "1"),
                 ("DEEPLAKE_TELEMETRY", "0"), ("HF_HUB_DISABLE_TELEMETRY", "1"), ("DO_NOT_TRACK", "1"),
                 ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        env.setdefault(k, v)
    env.update(cell_allocator_env(cell, env))
    env.update(cell.env)
    env.update(opts.env)
    target = ["-m", "benchmarks.cell", str(spec_path)]
    accelerate = str(Path(py).parent / "accelerate")
    from sft.config import CONFIG_DIR

    cfg_dir = CONFIG_DIR / "accelerate"
    if _cuda():
        if cell.ranks == 1:
            return [py, *target], env
        return [accelerate, "launch", "--config_file", str(cfg_dir / "gpu_multi.yaml"), "--multi_gpu",
                "--num_processes", str(cell.ranks), "--num_machines", "1", "--main_process_port", str(free_port()),
                *target], env
    groups, threads = core_groups(cell.ranks, cell.threads)
    env["OMP_NUM_THREADS"] = str(threads)
    pin: list[str] = []
    if opts.pin and groups:
        pin = ["-m", "launch.pin", *sum((["--cpus", format_cpu_list(g)] for g in groups), []), "--"]
    if cell.ranks == 1:
        return ([py, *pin, *target] if pin else [py, *target]), env
    env["ACCELERATE_USE_CPU"] = "true"  # --multi_gpu only picks the torchrun launcher; the ranks stay on CPU
    inner = [*pin[:-1], "--env", "ACCELERATE_USE_CPU=true", "--", *target] if pin else target
    port = str(free_port())
    if opts.launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", "--nproc_per_node", str(cell.ranks), "--master_port", port,
                *inner], env
    return [accelerate, "launch", "--config_file", str(cfg_dir / "cpu_multi_socket.yaml"), "--multi_gpu",
            "--num_processes", str(cell.ranks), "--num_machines", "1", "--main_process_port", port,
            "--num_cpu_threads_per_process", str(threads), *inner], env


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the cell's process group (the launcher and its ranks): TERM, then KILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


def run_cell(cell: CellSpec, dataset: str, cell_dir: Path, opts: RunOptions,
             on_tick: Callable[[float], None] | None = None) -> tuple[str, list[dict], str | None, float]:
    """Run one cell; returns (status, per-rank results, error text, wall seconds)."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    spec_path = cell_dir / "spec.json"
    spec_path.write_text(json.dumps({"cell": cell.to_dict(), "dataset": dataset, "steps": opts.steps,
                                     "warmup": opts.warmup}, indent=2))
    cmd, env = launch_command(cell, spec_path, opts)
    (cell_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    t0 = time.time()
    env[SPAWN_ENV] = repr(t0)
    with open(cell_dir / "stdout.log", "w") as out, open(cell_dir / "stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        status = "ok"
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if on_tick:
                        on_tick(time.time() - t0)
                    if time.time() - t0 > opts.cell_timeout_s:
                        status = "timeout"
                        _kill_group(proc)
                        break
        except BaseException:  # Ctrl-C: do not leave ranks behind
            _kill_group(proc)
            raise
    wall = time.time() - t0
    results = []
    for p in sorted(cell_dir.glob("result.rank*.json")):
        results.append(json.loads(p.read_text()))
    results.sort(key=lambda r: r["rank"])
    error = None
    if status == "timeout":
        error = f"timed out after {opts.cell_timeout_s:.0f} s\n" + tail(cell_dir / "stderr.log")
    elif proc.returncode != 0 or len(results) != cell.ranks:
        status = "failed"
        why = f"exit status {proc.returncode}" if proc.returncode != 0 else f"{len(results)} of {cell.ranks} ranks reported"
        error = f"{why}\n" + tail(cell_dir / "stderr.log")
    return status, results, error, wall


# --------------------------------------------------------------------------------------------- a run


@dataclass
class CellRecord:
    cell: CellSpec
    status: str
    metrics: dict | None
    error: str | None
    wall_s: float
    ratios: dict | None = None
    baseline: str | None = None


@dataclass(frozen=True)
class PlannedCell:
    """One entry of a run's plan: which repeat, which position in it, and whether it is only the warm-up."""

    repeat: int  # -1 for the warm-up
    position: int
    cell: CellSpec
    order: str  # "forward" (baselines first) | "reversed" (baselines last) | "warm-up"

    @property
    def warmup(self) -> bool:
        return self.repeat < 0


def plan_runs(cells: list[CellSpec], repeats: int, warmup_cell: bool = True) -> list[PlannedCell]:
    """The order cells run in: the whole list once per repeat, interleaved (every variant once per repeat, so on a
    shared machine each sees the same mix of quiet and busy periods), forward in even repeats (baselines first,
    as load_matrix sorts them) and reversed in odd ones (baselines last), so that a drift over the run (thermal,
    a neighbour's job starting) does not always favour the same side of a ratio. With ``warmup_cell`` the first
    cell runs once more before anything is measured and is discarded: whatever the first process pays (page cache,
    CPU clocks after the peak measurement; measured ~1.5x slow on the AMX Xeon) is paid by no measured cell."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    plan: list[PlannedCell] = []
    if warmup_cell and cells:
        plan.append(PlannedCell(-1, 0, cells[0], "warm-up"))
    for rep in range(repeats):
        order = cells if rep % 2 == 0 else list(reversed(cells))
        plan += [PlannedCell(rep, i, c, "forward" if rep % 2 == 0 else "reversed") for i, c in enumerate(order)]
    return plan


def assign_ratios(records: list[CellRecord]) -> None:
    """Ratios of each record to the baseline of the same workload in the same repeat (records: one repeat's,
    in any order; the baseline may have run last)."""
    bases = {r.cell.label(): r for r in records if r.cell.runner == "baseline" and r.metrics}
    for rec in records:
        base_cell = baseline_for(rec.cell, [b.cell for b in bases.values()])
        if base_cell is not None and rec.metrics:
            rec.baseline = base_cell.label()
            rec.ratios = ratios(rec.metrics, bases[base_cell.label()].metrics)


def row_facts(run_meta: dict, metrics: dict | None, cell: CellSpec) -> dict:
    """What every result row carries on its own (so a row read alone says what machine and code it measured):
    AMX / AVX512-BF16, threads per rank, the commit and whether the tree was dirty."""
    machine = run_meta.get("machine") or {}
    cpu, git = machine.get("cpu") or {}, machine.get("git") or {}
    threads = (metrics or {}).get("threads_per_rank") or cell.threads
    return {"amx_bf16": cpu.get("amx_bf16"), "avx512_bf16": cpu.get("avx512_bf16"), "threads": threads,
            "commit": git.get("commit"), "dirty": git.get("dirty")}


def run_cells(cells: list[CellSpec], dataset: str, opts: RunOptions, run_meta: dict, jsonl: Path,
              console=None, repeats: int = 3, warmup_cell: bool = True) -> list[CellRecord]:
    """Run ``cells`` by :func:`plan_runs` (interleaved repeats, alternating order, a discarded warm-up cell first);
    returns the records of this run. Each repeat's lines are appended to the JSONL when the repeat ends (its
    ratios are to that repeat's baseline, which runs last in odd repeats); an interrupted repeat is written as far
    as it got. The report gives the median over repeats and the min-max of each ratio."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    work_root = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    records: list[CellRecord] = []
    # SIGTERM (a job scheduler, `kill`) becomes an exception, so that run_cell stops the running cell's process
    # group (it lives in its own session and would otherwise outlive us) and the work folder is cleaned up.
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        def _terminate(signum, frame):
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, _terminate)
    plan = plan_runs(cells, repeats, warmup_cell)
    pending: list[tuple[PlannedCell, CellRecord, dict]] = []  # this repeat's cells, written when it ends
    index = 0

    def flush() -> None:
        nonlocal index
        assign_ratios([rec for _, rec, _ in pending])
        for entry, rec, extra in pending:
            append_jsonl(jsonl, {
                "schema": SCHEMA, **run_meta, "index": index, "label": rec.cell.label(),
                "config": rec.cell.config_label(), "variant": rec.cell.variant, "cell": rec.cell.to_dict(),
                "status": rec.status, "error": rec.error, "wall_s": rec.wall_s, "metrics": rec.metrics,
                "baseline": rec.baseline, "ratios": rec.ratios, "steps": opts.steps, "warmup": opts.warmup,
                "dataset": dataset, **extra, "cell_env": {**rec.cell.env, **opts.env}, "repeat": entry.repeat,
                "position": entry.position, "order": entry.order, **row_facts(run_meta, rec.metrics, rec.cell),
            })
            index += 1
            if rec.ratios:
                progress.console.print(f"  repeat {entry.repeat}: {escape(rec.cell.label())}: "
                                       f"x{rec.ratios['tokens_per_s']:.2f} of baseline")
        pending.clear()

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("cell {task.fields[cell_s]:>5.0f} s"), TimeElapsedColumn(),
                        console=console, disable=not opts.progress, transient=False)
    try:
        with progress:
            task = progress.add_task("bench", total=len(plan), cell_s=0.0)
            for i, entry in enumerate(plan):
                cell = entry.cell
                if pending and pending[-1][0].repeat != entry.repeat:
                    flush()
                what = "warm-up (not measured): " if entry.warmup else f"repeat {entry.repeat}: "
                progress.update(task, description=escape(what + cell.label()), cell_s=0.0)
                load_before = _loadavg()
                status, results, error, wall = run_cell(
                    cell, dataset, work_root / f"cell{i:02d}", opts,
                    on_tick=lambda s: progress.update(task, cell_s=s))
                metrics = None
                if status == "ok":
                    try:
                        metrics = aggregate(results, opts.warmup, opts.steps, run_meta.get("peak"))
                    except (ValueError, KeyError, IndexError, ZeroDivisionError) as e:
                        status, error = "failed", f"could not aggregate results: {type(e).__name__}: {e}"
                rec = CellRecord(cell, status, metrics, error, wall)
                progress.advance(task)
                if entry.warmup:
                    progress.console.print(f"warm-up cell ({status}, {wall:.0f} s), discarded: "
                                           f"{escape(cell.label())}")
                    continue
                records.append(rec)
                pending.append((entry, rec, {"load_avg_before": load_before, "load_avg_after": _loadavg()}))
                progress.console.print(one_line(rec))
    finally:
        if pending:
            flush()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if not opts.keep_work:
            import shutil

            shutil.rmtree(work_root, ignore_errors=True)
        else:
            console.print(f"cell logs kept in {work_root}")
    return records


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine shows up here (the CPU may be shared)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def one_line(rec: CellRecord) -> str:
    from rich.markup import escape

    label = escape(rec.cell.label())
    if rec.status != "ok" or rec.metrics is None:
        last = (rec.error or "").strip().splitlines()
        return f"[red]x {label}: {rec.status}[/red] ({rec.wall_s:.0f} s): {escape(last[-1] if last else '')}"
    m = rec.metrics
    ratio = f" (x{rec.ratios['tokens_per_s']:.2f} of baseline)" if rec.ratios else ""  # set at the repeat's end
    return (f"[green]ok[/green] {label}: {m['tokens_per_s']:,.0f} tok/s{ratio}, "
            f"step {m['step_time_median_s']:.2f} s, MFU {100 * m['mfu']:.1f}%, "
            f"peak {m['peak_memory_bytes'] / 2**30:.2f} GiB, {rec.wall_s:.0f} s")
