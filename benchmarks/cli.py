"""`sft bench`: the argument parser and the commands (thin: parse, call benchmarks.*).

    sft bench [--matrix cpu|smoke|gpu|PATH] [--steps N] [--warmup W] [--set AXIS=VALUE] [--only TEXT]
    sft bench scaling --ranks 1,2 [--model opt-125m] [--seq-length 512] [--micro-batch 8] [--modes strong,weak]
                      [--bandwidth-gbps 100 --latency-us 5] [--nodes 1,2,4,8,16,32,64]
    sft bench project --model opt-1.3b --lora-r 16 --step-time 1.2 --bandwidth-gbps 100 --latency-us 5
    sft bench report [--jsonl benchmarks/results/DATE-HOST.jsonl] [--run-id ID]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.session import make_console, run_options, start_run
from sft.errors import ConfigError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_bench_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.description = ("Throughput / MFU / memory benchmarks. Each cell runs in its own process; results are appended "
                     "to benchmarks/results/<date>-<host>.jsonl with a Markdown table and PNG plots beside it.")
    p.add_argument("mode", nargs="?", default="run", choices=["run", "scaling", "project", "report"],
                   help="run a matrix (default), a scaling study, a cost-model projection, or rebuild a report")
    g = p.add_argument_group("matrix (run)")
    g.add_argument("--matrix", default="cpu", help="matrix YAML or a shipped name: cpu, smoke, gpu (default: cpu)")
    g.add_argument("--set", dest="axis_overrides", action="append", default=[], metavar="AXIS=VALUE",
                   help="force an axis for every cell, e.g. --set dtype=fp32 (repeatable)")
    g.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help="run only cells whose label contains TEXT (repeatable: any of them)")
    g.add_argument("--repeat", type=int, default=3,
                   help="repeats (default 3): the matrix runs N times interleaved, forward then reversed order, and "
                        "the report gives each ratio's median and min-max")
    g.add_argument("--no-warmup-cell", dest="warmup_cell", action="store_false",
                   help="skip the discarded warm-up cell that runs before anything is measured")
    g = p.add_argument_group("common")
    g.add_argument("--steps", type=int, default=None, help="measured steps per cell (default: from the matrix)")
    g.add_argument("--warmup", type=int, default=None, help="warm-up steps per cell (default: from the matrix)")
    g.add_argument("--results-dir", default=None, help="where the JSONL, Markdown and PNGs go (default: benchmarks/results)")
    g.add_argument("--cell-timeout", type=float, default=3600.0, help="seconds before a cell is stopped (default 3600)")
    g.add_argument("--peak-seconds", type=float, default=2.0, help="seconds per GEMM peak measurement (default 2)")
    g.add_argument("--launcher", choices=["accelerate", "torchrun"], default="accelerate",
                   help="how ranks > 1 are started (default: accelerate launch --multi_gpu)")
    g.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin CPU ranks to their cores")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no live progress display")
    g.add_argument("--keep-work", action="store_true", help="keep each cell's logs and spec (path printed)")
    g.add_argument("--dataset-rows", type=int, default=None, help="rows of the synthetic dataset")
    g.add_argument("--env", dest="cell_env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for every cell, e.g. --env OMP_WAIT_POLICY=PASSIVE (recorded)")
    g = p.add_argument_group("scaling / project")
    g.add_argument("--ranks", type=_int_list, default=[1, 2], help="rank counts to measure (default 1,2)")
    g.add_argument("--modes", default="strong,weak", help="strong, weak or both (default strong,weak)")
    g.add_argument("--model", default="opt-125m", help="architecture or model.name (default opt-125m)")
    g.add_argument("--seq-length", type=int, default=512)
    g.add_argument("--micro-batch", type=int, default=8,
                   help="sequences per step on one rank; strong scaling splits it over the ranks (default 8)")
    g.add_argument("--dtype", default=None,
                   help="dtype of the scaling cells: auto (default: bf16-mixed with native bf16, else fp32), "
                        "bf16-mixed, bf16, fp32")
    g.add_argument("--variant", default="framework", help="variant of the scaling cells (default framework)")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated, or all-linear")
    g.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    g.add_argument("--bandwidth-gbps", type=_float_list, default=None,
                   help="cluster link bandwidth(s) in Gbit/s for the projection (comma-separated, paired with "
                        "--latency-us; default: 25 and 100 as examples)")
    g.add_argument("--latency-us", type=_float_list, default=None,
                   help="per-message latency(ies) in microseconds (default: 10 and 3)")
    g.add_argument("--nodes", type=_int_list, default=[1, 2, 4, 8, 16, 32, 64],
                   help="node counts to project (with --slurm: node counts to measure, e.g. 1,2)")
    g = p.add_argument_group("scaling through Slurm (scaling --slurm: one sbatch job per node count)")
    g.add_argument("--slurm", action="store_true",
                   help="submit the runs with sbatch (--template) for each of --nodes and tabulate their summaries")
    g.add_argument("--template", default="launch/slurm/cpu_multi_node.sbatch", help="batch script to submit")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="OPT",
                   help="extra sbatch option, e.g. --sbatch-arg=--partition=cpu (repeatable)")
    g.add_argument("--train-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `sft train` setting for every run (repeatable)")
    g.add_argument("--job-timeout", type=float, default=3600.0, help="seconds before unfinished jobs are cancelled")
    g.add_argument("--step-time", type=float, default=None, help="project: measured compute seconds per step")
    g.add_argument("--global-batch", type=int, default=None, help="strong-scaling projection's global batch")
    g.add_argument("--overhead-ms", type=float, default=0.0,
                   help="project: per-step data-parallel overhead beyond the all-reduce, measured as (2-node step "
                        "over a fast link) - (one node's step) - (that link's all-reduce); default 0")
    g.add_argument("--grad-bytes-per-param", type=int, default=4, help="project: gradient element size (fp32: 4)")
    g = p.add_argument_group("report")
    g.add_argument("--jsonl", default=None, help="results file (default: the newest in --results-dir)")
    g.add_argument("--run-id", default=None, help="which run of the file (default: the last)")
    return p


def _parse_axis_overrides(items: list[str]) -> dict:
    import yaml

    from benchmarks.matrix import AXES

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in AXES:
            raise ConfigError(f"--set {item!r}: expected AXIS=VALUE with AXIS one of {', '.join(AXES)}")
        out[key] = yaml.safe_load(value)
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from benchmarks.data import ensure_dataset
    from benchmarks.matrix import load_matrix
    from benchmarks.report import write_report
    from benchmarks.jsonl import results_stem
    from benchmarks.runner import run_cells

    console = make_console()
    matrix = load_matrix(args.matrix, steps=args.steps, warmup=args.warmup,
                         axis_overrides=_parse_axis_overrides(args.axis_overrides))
    cells = [c for c in matrix.cells if not args.only or any(t in c.label() for t in args.only)]
    if not cells:
        raise ConfigError(f"no cell of {matrix.path} matches --only {args.only}")
    opts = run_options(args, matrix.steps, matrix.warmup)
    console.print(f"[bold]sft bench[/bold]: matrix {matrix.name} ({matrix.path}), {len(cells)} cell(s) x "
                  f"{args.repeat} interleaved repeat(s) (alternating order{', after a discarded warm-up cell' if args.warmup_cell else ''}), "
                  f"{matrix.warmup} warm-up + {matrix.steps} measured steps each")
    meta = start_run("matrix", matrix.name, matrix.description, args, console)
    dataset = ensure_dataset(args.dataset_rows or matrix.dataset_rows)
    stem = results_stem(meta["machine"])
    jsonl = opts.results_dir / f"{stem}.jsonl"
    if args.repeat < 1:
        raise ConfigError("--repeat must be >= 1")
    run_cells(cells, dataset, opts, meta, jsonl, console, repeats=args.repeat, warmup_cell=args.warmup_cell)
    from benchmarks.report import load_records

    records = load_records(jsonl, meta["run_id"])
    paths = write_report(records, opts.results_dir, f"{stem}-{matrix.name}", console)
    console.print(f"results: {jsonl}")
    for k, v in paths.items():
        console.print(f"{k}: {v}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


def cmd_report(args: argparse.Namespace) -> int:
    from benchmarks.report import load_records, write_report
    from benchmarks.runner import DEFAULT_RESULTS

    results = Path(args.results_dir or DEFAULT_RESULTS)
    jsonl = Path(args.jsonl) if args.jsonl else max(results.glob("*.jsonl"), key=lambda p: p.stat().st_mtime, default=None)
    if jsonl is None or not jsonl.exists():
        raise ConfigError(f"no results file: pass --jsonl (looked in {results})")
    records = load_records(jsonl, args.run_id)
    stem = jsonl.stem + "-" + records[0]["matrix"]
    paths = write_report(records, jsonl.parent, stem, make_console())
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    if args.mode == "scaling" and args.slurm:
        from benchmarks.slurm_scaling import cmd_slurm_scaling

        return cmd_slurm_scaling(args)
    if args.mode == "scaling":
        from benchmarks.scaling import cmd_scaling

        return cmd_scaling(args)
    if args.mode == "project":
        from benchmarks.scaling import cmd_project

        return cmd_project(args)
    if args.mode == "report":
        return cmd_report(args)
    return cmd_run(args)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.cli ...`` (same as ``sft bench ...``), also where sft is not installed (a checkout on
    PYTHONPATH, as on the GPU check's machine: then the ``sft.commands`` entry point that adds ``sft bench`` is
    not registered)."""
    import logging

    from sft.errors import SftError

    p = argparse.ArgumentParser(prog="python -m benchmarks.cli", description="sft bench")
    add_bench_arguments(p)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    args.process_entry, args.verbose, args.command = argv is None, False, "bench"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return bench_command(args)
    except SftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def register(sub) -> None:
    """``sft bench`` (the ``sft.commands`` entry point ``bench``, see pyproject.toml)."""
    p = sub.add_parser("bench", help="throughput / MFU / memory benchmarks with the seed recipe as baseline")
    add_bench_arguments(p)
    p.set_defaults(func=bench_command)


if __name__ == "__main__":
    sys.exit(main())

