"""Scaling studies: measured strong / weak scaling over ranks on this machine, and the cost model's projection.

``sft bench scaling --ranks 1,2`` runs, through the same cell runner as the matrix (one process per rank, each
reading its own Deep Lake shard, gradients all-reduced with gloo):

* N = 1: one rank with all compute cores, micro-batch b;
* strong, N > 1: N ranks with cores / N threads each, micro-batch b / N each (the global batch stays b);
* weak, N > 1: N ranks with cores / N threads each, micro-batch b each (the global batch grows to N b).

Efficiency is throughput per core relative to N = 1: ``(tok/s_N / cores_N) / (tok/s_1 / cores_1)``. On one machine
the cores are the same for every N, so it is the throughput ratio; over nodes (cores grow with N) it is the usual
``T_1 / (N T_N)`` (strong) or ``T_1 / T_N`` (weak).

The cost model (benchmarks.costmodel) is then checked against the measured N-rank points: compute time per rank is
the N = 1 step time scaled by the rank's share of cores and of the batch; the all-reduce of the LoRA gradients
uses a bandwidth and latency measured on this machine by an all-reduce micro-benchmark (benchmarks.allreduce).
Finally it projects efficiency to ``--nodes`` nodes (a node = this machine at N = 1) for the network given with
``--bandwidth-gbps`` / ``--latency-us`` (a real cluster's numbers), plotted beside the measurements.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.costmodel import CostModel, gbit_to_Bps, lora_param_count, projection_table
from sft.errors import ConfigError

DEFAULT_PROFILES = [("25 Gbit/s, 25 us (assumed)", 25.0, 25.0), ("100 Gbit/s, 5 us (assumed)", 100.0, 5.0)]


def network_profiles(args) -> list[tuple[str, float, float]]:
    """[(label, Gbit/s, microseconds)] from --bandwidth-gbps / --latency-us, or the assumed examples."""
    bws, lats = args.bandwidth_gbps, args.latency_us
    if not bws and not lats:
        return list(DEFAULT_PROFILES)
    bws = bws or [100.0]
    lats = lats or [5.0] * len(bws)
    if len(lats) == 1 and len(bws) > 1:
        lats = lats * len(bws)
    if len(bws) == 1 and len(lats) > 1:
        bws = bws * len(lats)
    if len(bws) != len(lats):
        raise ConfigError("--bandwidth-gbps and --latency-us need the same number of values (they are pairs)")
    return [(f"{b:g} Gbit/s, {lat:g} us", b, lat) for b, lat in zip(bws, lats)]


def scaling_cells(args, ranks: list[int], modes: list[str]):
    from benchmarks.matrix import BUILTIN_VARIANTS, CellSpec, resolve_dtype, run_config_for

    variant = BUILTIN_VARIANTS.get(args.variant)
    if variant is None:
        raise ConfigError(f"--variant {args.variant!r}: choose one of {', '.join(BUILTIN_VARIANTS)}")
    targets = [t for t in args.lora_targets.split(",") if t]
    cells: list[tuple[str, int, CellSpec]] = []
    for n in sorted(set(ranks) | {1}):
        for mode in (["base"] if n == 1 else modes):
            if mode == "strong" and args.micro_batch % n:
                raise ConfigError(f"strong scaling splits --micro-batch {args.micro_batch} over {n} ranks: "
                                  "it must divide evenly")
            mb = args.micro_batch // n if mode == "strong" else args.micro_batch
            spec = CellSpec(model=args.model, quantization="none", seq_length=args.seq_length, micro_batch=mb,
                            gradient_checkpointing=args.checkpointing,
                            dtype=resolve_dtype(args.dtype or "auto"), variant=args.variant, ranks=n, threads=None,
                            lora_r=args.lora_r, lora_targets=targets, runner=variant.runner,
                            overrides=dict(variant.overrides))
            if spec.runner == "framework":
                run_config_for(spec)
            cells.append((mode, n, spec))
    return cells


def analyse(points: list[dict], fit: dict | None, profiles, nodes: list[int], global_batch: int | None) -> dict:
    """points: [{mode, ranks, threads, micro_batch, tokens_per_s, step_time_median_s, grad_bytes}] (N=1 has mode
    'base'). Returns measured efficiencies, the model's predictions for them, and the node projections."""
    base = next((p for p in points if p["mode"] == "base"), None)
    if base is None:
        raise ValueError("the 1-rank point is missing (it failed?): nothing to scale against")
    cores_1 = base["ranks"] * base["threads"]
    per_core_1 = base["tokens_per_s"] / cores_1
    out: dict = {"base": base, "measured": [], "projection": [], "fit": fit}
    t1, b1, grad = base["step_time_median_s"], base["micro_batch"], base["grad_bytes"]
    for p in points:
        cores = p["ranks"] * p["threads"]
        eff = (p["tokens_per_s"] / cores) / per_core_1
        row = {**p, "cores": cores, "efficiency": eff}
        if fit and p["mode"] != "base":
            # compute per rank: the 1-rank step scaled by the rank's share of the cores and of the batch
            t_c = t1 * (cores_1 / p["threads"]) * (p["micro_batch"] / b1)
            model = CostModel(t_c, grad, fit["bandwidth_Bps"], fit["latency_s"], batch=p["micro_batch"])
            row.update({"model_compute_s": t_c, "model_allreduce_s": model.allreduce_s(p["ranks"]),
                        "model_efficiency": model.weak_efficiency(p["ranks"]),
                        "model_step_s": model.weak_step_s(p["ranks"])})
        out["measured"].append(row)
    nets = list(profiles)
    if fit:
        nets.append((f"this machine's loopback ({fit['bandwidth_Bps'] * 8 / 1e9:.1f} Gbit/s, "
                     f"{fit['latency_s'] * 1e6:.0f} us, measured)", fit["bandwidth_Bps"] * 8 / 1e9,
                     fit["latency_s"] * 1e6))
    for label, gbps, us in nets:
        model = CostModel(t1, grad, gbit_to_Bps(gbps), us * 1e-6, batch=b1)
        out["projection"].append({"network": label, "bandwidth_gbps": gbps, "latency_us": us,
                                  "model": model.to_dict(), "rows": projection_table(model, nodes, global_batch)})
    return out


def markdown(result: dict, meta: dict) -> str:
    from benchmarks.machine import describe_machine

    base = result["base"]
    lines = [
        f"# sft bench scaling ({meta['timestamp'][:10]}, {meta['machine'].get('hostname')})",
        "",
        f"Run `{meta['run_id']}`. Reproduce: `{meta['command']}`",
        "",
        "Machine: " + describe_machine(meta["machine"]).replace("\n", "  \n"),
        "",
        f"Workload: {base['config']} [{base['variant']}]. Efficiency = throughput per core relative to 1 rank "
        "(the cores are the same for every rank count here, so it is the tokens/s ratio). strong: the global batch "
        "is split over the ranks; weak: every rank keeps the micro-batch.",
        "",
        "| mode | ranks x threads | micro-batch/rank | tok/s | step p50 s | efficiency | model efficiency "
        "| model step s (compute + all-reduce) | measured / model step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["measured"]:
        if "model_efficiency" in r:
            model = (f"{r['model_efficiency']:.3f} | {r['model_step_s']:.2f} ({r['model_compute_s']:.2f} + "
                     f"{r['model_allreduce_s'] * 1e3:.1f} ms) | {r['step_time_median_s'] / r['model_step_s']:.2f}")
        else:
            model = "- | - | -"
        lines.append(f"| {r['mode']} | {r['ranks']} x {r['threads']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['step_time_median_s']:.2f} | {r['efficiency']:.3f} | {model} |")
    lines += ["", "The model's compute time per rank assumes compute scales with cores (a rank with half the cores "
              "takes twice as long for the same batch); `measured / model step` shows how well that and the "
              "all-reduce term hold on this machine (above 1: slower than modelled)."]
    fit = result.get("fit")
    if fit:
        lines += ["", f"All-reduce on this machine (gloo, {fit['world']} ranks, fit of the ring model): "
                  f"{fit['bandwidth_Bps'] / 1e9:.2f} GB/s, {fit['latency_s'] * 1e6:.0f} us per message. "
                  f"LoRA gradients: {base['grad_bytes'] / 2**20:.2f} MiB per step."]
    lines += ["", "Projection to N nodes (node = this machine at 1 rank; compute "
              f"{base['step_time_median_s']:.2f} s per step at micro-batch {base['micro_batch']}; ring all-reduce of "
              "the LoRA gradients, no overlap with the backward pass):", ""]
    for proj in result["projection"]:
        lines += [f"{proj['network']}:", "", "| nodes | all-reduce ms | weak efficiency | strong efficiency "
                  f"(global batch {proj['rows'][0]['strong_global_batch']}) |", "|---|---|---|---|"]
        for row in proj["rows"]:
            lines.append(f"| {row['nodes']} | {row['allreduce_s'] * 1e3:.2f} | {row['weak_efficiency']:.3f} | "
                         f"{row['strong_efficiency']:.3f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path, title: str, machine: dict | None = None) -> Path:
    from benchmarks.report import atomic_savefig, pyplot

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode, marker, color in (("strong", "o", "#1f77b4"), ("weak", "s", "#2ca02c")):
        pts = sorted([r for r in result["measured"] if r["mode"] in (mode, "base")], key=lambda r: r["ranks"])
        if len(pts) < 2:
            continue
        ax1.plot([r["ranks"] for r in pts], [r["efficiency"] for r in pts], marker=marker, color=color,
                 label=f"{mode}: measured")
        mp = [r for r in pts if "model_efficiency" in r]
        if mp:
            ax1.plot([1] + [r["ranks"] for r in mp], [1.0] + [r["model_efficiency"] for r in mp], linestyle="--",
                     marker=marker, mfc="none", color=color, label=f"{mode}: cost model")
    ax1.set_xticks(sorted({r["ranks"] for r in result["measured"]}))
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_xlabel("ranks on this machine (cores shared)")
    ax1.set_ylabel("efficiency (throughput per core vs 1 rank)")
    ax1.set_title("measured vs model, this machine", fontsize=10)
    top = max([1.0] + [r["efficiency"] for r in result["measured"]] +
              [r.get("model_efficiency", 0) for r in result["measured"]])
    ax1.set_ylim(0, max(1.15, top * 1.1))
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    colors = ["#d62728", "#9467bd", "#8c564b", "#17becf", "#7f7f7f"]
    for i, proj in enumerate(result["projection"]):
        xs = [r["nodes"] for r in proj["rows"]]
        ax2.plot(xs, [r["weak_efficiency"] for r in proj["rows"]], color=colors[i % len(colors)], marker=".",
                 label=f"weak, {proj['network']}")
        ax2.plot(xs, [r["strong_efficiency"] for r in proj["rows"]], color=colors[i % len(colors)], marker=".",
                 linestyle="--", label=f"strong (G={proj['rows'][0]['strong_global_batch']}), {proj['network']}")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("nodes")
    ax2.set_ylabel("projected efficiency")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("cost model projection", fontsize=10)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    from benchmarks.report import add_machine_caption

    add_machine_caption(fig, machine or {})
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def cmd_scaling(args: argparse.Namespace) -> int:
    from benchmarks.session import make_console, run_options, start_run
    from benchmarks.data import ensure_dataset
    from benchmarks.jsonl import append_jsonl, results_stem
    from benchmarks.runner import run_cells

    console = make_console()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"strong", "weak"}:
        raise ConfigError(f"--modes {args.modes!r}: use strong, weak or strong,weak")
    cells = scaling_cells(args, args.ranks, modes)
    profiles = network_profiles(args)
    steps = args.steps if args.steps is not None else 3
    warmup = args.warmup if args.warmup is not None else 1
    opts = run_options(args, steps, warmup)
    meta = start_run("scaling", "scaling", "scaling study", args, console)
    dataset = ensure_dataset(args.dataset_rows or 2000)
    stem = results_stem(meta["machine"])
    jsonl = opts.results_dir / f"{stem}.jsonl"
    console.print(f"[bold]sft bench scaling[/bold]: {len(cells)} cell(s), {warmup} warm-up + {steps} measured steps")
    records = run_cells([c for _, _, c in cells], dataset, opts, meta, jsonl, console, repeats=1, warmup_cell=False)
    points = []
    for (mode, n, spec), rec in zip(cells, records):
        if rec.status != "ok":
            continue
        m = rec.metrics
        points.append({"mode": mode, "ranks": n, "threads": m["threads_per_rank"], "micro_batch": spec.micro_batch,
                       "tokens_per_s": m["tokens_per_s"], "step_time_median_s": m["step_time_median_s"],
                       "grad_bytes": m["grad_bytes"], "config": spec.config_label(), "variant": spec.variant,
                       "label": spec.label()})
    fit = None
    n_max = max(args.ranks)
    if n_max > 1 and points:
        console.print(f"all-reduce micro-benchmark on {n_max} ranks (gloo) ...")
        grad = points[0]["grad_bytes"]
        try:
            from benchmarks.allreduce import DEFAULT_SIZES, measure

            fit = measure(n_max, sorted(set(DEFAULT_SIZES) | {int(grad)}))
        except Exception as e:  # the study still reports the measured points
            console.print(f"[red]all-reduce micro-benchmark failed: {e}[/red]")
    try:
        result = analyse(points, fit, profiles, args.nodes, args.global_batch)
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        return 1
    append_jsonl(jsonl, {"schema": 1, **meta, "kind": "scaling-summary", "result": result})
    text = markdown(result, meta)
    args.results_dir = str(opts.results_dir)
    md_path = opts.results_dir / f"{stem}-scaling.md"
    md_path.write_text(text)
    png = plot(result, opts.results_dir / f"{stem}-scaling.png",
               f"sft bench scaling: {result['base']['config']} [{result['base']['variant']}]", meta["machine"])
    from rich.markdown import Markdown

    console.print(Markdown(text))
    console.print(f"results: {jsonl}\nmarkdown: {md_path}\nplot: {png}")
    return 0 if len(points) == len(cells) else 1


def cmd_project(args: argparse.Namespace) -> int:
    """Cost-model projection without measuring: ``--step-time`` from a past run, LoRA size from the model."""
    from rich.console import Console
    from rich.table import Table

    if args.step_time is None:
        raise ConfigError("sft bench project needs --step-time (compute seconds per step on one node, e.g. the "
                          "step p50 of a `sft bench` cell)")
    targets = [t for t in args.lora_targets.split(",") if t]
    n_lora = lora_param_count(args.model, args.lora_r, targets)
    grad_bytes = n_lora * args.grad_bytes_per_param
    console = Console()
    console.print(f"{args.model}: LoRA r{args.lora_r} on {','.join(targets)}: {n_lora:,} parameters, "
                  f"{grad_bytes / 2**20:.2f} MiB of gradients per all-reduce; compute {args.step_time:g} s per step "
                  f"at micro-batch {args.micro_batch}"
                  + (f", data-parallel overhead {args.overhead_ms:g} ms per step" if args.overhead_ms else ""))
    for label, gbps, us in network_profiles(args):
        model = CostModel(args.step_time, grad_bytes, gbit_to_Bps(gbps), us * 1e-6, batch=args.micro_batch,
                          overhead_s=max(0.0, args.overhead_ms) * 1e-3)
        rows = projection_table(model, args.nodes, args.global_batch)
        t = Table(title=label)
        for c in ("nodes", "all-reduce ms", "weak eff.", f"strong eff. (G={rows[0]['strong_global_batch']})"):
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(str(r["nodes"]), f"{r['allreduce_s'] * 1e3:.2f}", f"{r['weak_efficiency']:.3f}",
                      f"{r['strong_efficiency']:.3f}")
        console.print(t)
    return 0


__all__ = ["analyse", "cmd_project", "cmd_scaling", "markdown", "network_profiles", "plot", "scaling_cells"]
