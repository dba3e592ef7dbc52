"""Reports: a Markdown table (printed with rich, saved next to the JSONL) and PNG plots (matplotlib, Agg).

Everything here reads the JSONL records, so ``sft bench report --jsonl FILE [--run-id ID]`` rebuilds the report of
any past run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from benchmarks.machine import describe_machine, spec_peaks

COLUMNS = ("config", "variant", "tok/s", "vs base", "best-step tok/s", "tok/s/rank", "non-pad tok/s", "samples/s",
           "step p50 / p90 s", "MFU", "HFU", "peak mem GiB", "mem vs base", "data wait", "1st step s", "load")


def _f(x: Any, fmt: str, none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, fmt)


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}%"


def _ratio(rec: dict, key: str) -> str:
    """``1.85x`` for one repeat; ``1.85x (1.70-1.93)``, the median and min-max over repeats, for several."""
    r = rec.get("ratios") or {}
    if key not in r:
        return "-"
    lo_hi = (rec.get("ratio_ranges") or {}).get(key)
    text = _f(r[key], ".2f") + "x"
    if lo_hi and rec.get("repeats", 1) > 1:
        text += f" ({_f(lo_hi[0], '.2f')}-{_f(lo_hi[1], '.2f')})"
    return text


def row_cells(rec: dict) -> list[str]:
    m = rec.get("metrics") or {}
    r = rec.get("ratios") or {}
    if rec.get("status") != "ok" or not m:
        return [rec["config"], rec["variant"], rec["status"].upper()] + ["-"] * (len(COLUMNS) - 3)
    steps = m.get("step_times_s") or []
    best = m.get("tokens_per_step") / min(steps) if steps and m.get("tokens_per_step") else None
    load = rec.get("load_avg_before"), rec.get("load_avg_after")
    alloc = m.get("allocator")
    return [
        rec["config"],
        rec["variant"] + (f" ({alloc})" if alloc and alloc != "system" else ""),
        _f(m.get("tokens_per_s"), ",.0f"),
        _ratio(rec, "tokens_per_s"),
        _f(best, ",.0f"),
        _f(m.get("tokens_per_s_per_rank"), ",.0f"),
        _f(m.get("non_padding_tokens_per_s"), ",.0f"),
        _f(m.get("samples_per_s"), ".2f"),
        f"{_f(m.get('step_time_median_s'), '.2f')} / {_f(m.get('step_time_p90_s'), '.2f')}",
        _pct(m.get("mfu")),
        _pct(m.get("hfu")),
        _f((m.get("peak_memory_bytes") or 0) / 2**30, ".2f"),
        _ratio(rec, "peak_memory"),
        _pct(m.get("data_wait_fraction")),
        _f(m.get("time_to_first_step_s"), ".0f"),
        f"{load[0][0]:.1f}-{load[1][0]:.1f}" if load[0] and load[1] else "-",
    ]


def combine_repeats(records: list[dict]) -> list[dict]:
    """One record per cell label: with repeats, the median of every metric and ratio over the successful repeats,
    and each ratio's min-max (``ratio_ranges``); each repeat's ratio is to that repeat's baseline, so the median
    ratio is not the ratio of medians. Step times of all repeats are kept (best-step tok/s uses them all)."""
    import statistics

    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["label"], []).append(r)
    out = []
    for label, group in groups.items():
        ok = [r for r in group if r.get("status") == "ok" and r.get("metrics")]
        if len(group) == 1 or not ok:
            out.append(group[-1] if not ok else ok[0])
            continue
        rec = dict(ok[0])
        metrics = {}
        for k, v in ok[0]["metrics"].items():
            vals = [r["metrics"].get(k) for r in ok]
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
                metrics[k] = statistics.median(vals)
            else:
                metrics[k] = v
        metrics["step_times_s"] = [t for r in ok for t in r["metrics"].get("step_times_s") or []]
        rec["metrics"] = metrics
        with_ratios = [r["ratios"] for r in ok if r.get("ratios")]
        rec["ratios"] = ({k: statistics.median(x[k] for x in with_ratios) for k in with_ratios[0]}
                         if with_ratios else None)
        rec["ratio_ranges"] = ({k: [min(x[k] for x in with_ratios), max(x[k] for x in with_ratios)]
                                for k in with_ratios[0]} if with_ratios else None)
        rec["ratio_repeats"] = len(with_ratios)
        rec["repeats"] = len(ok)
        rec["variant"] = f"{ok[0]['variant']} (median of {len(ok)})"
        rec["load_avg_before"], rec["load_avg_after"] = group[0].get("load_avg_before"), group[-1].get("load_avg_after")
        out.append(rec)
    return out


def markdown_table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for rec in records:
        lines.append("| " + " | ".join(row_cells(rec)) + " |")
    return "\n".join(lines)


def _tflops(x: float | None) -> str:
    if not x:
        return "-"
    return f"{x / 1e12:.3f} TFLOP/s" if x >= 1e11 else f"{x / 1e9:.1f} GFLOP/s"


def peak_section(peak: dict, facts: dict) -> str:
    def one(name: str) -> str:
        text = (f"{name} {_tflops(peak.get(f'{name}_flops'))} (all threads: a@b {_tflops(peak.get(f'{name}_nn_flops'))}, "
                f"a@b.T {_tflops(peak.get(f'{name}_nt_flops'))}")
        if peak.get(f"{name}_one_thread_flops"):
            text += f"; one thread {_tflops(peak.get(f'{name}_one_thread_flops'))} x {peak.get('threads')}"
        return text + ")"

    lines = [
        f"Peak measured at the start of the run ({peak.get('device')}, {peak.get('threads') or 'all'} threads, "
        f"GEMMs up to {peak.get('gemm_size')}^3, the better of both operand layouts and of all threads vs one thread "
        f"x threads): {one('bf16')}; {one('fp32')}. "
        f"MFU / HFU denominator: **{_tflops(peak.get('peak_flops'))}** ({peak.get('peak_dtype')}, per {peak.get('per')}).",
        "",
        "Spec peaks for comparison (**spec**, not measured here):",
        "",
        "| spec peak | FLOP/s | source |",
        "|---|---|---|",
    ]
    for name, flops, how in spec_peaks(facts):
        lines.append(f"| {name} | {_tflops(flops)} | {how} |")
    return "\n".join(lines)


def row_facts_line(rec: dict) -> str:
    """The facts every row records, as one line: AMX, AVX512-BF16, threads, commit (the README table cites it)."""
    def yn(x):
        return "?" if x is None else ("yes" if x else "no")

    cpu = ((rec.get("machine") or {}).get("cpu") or {})
    commit = rec.get("commit") or ((rec.get("machine") or {}).get("git") or {}).get("commit") or "?"
    dirty = rec.get("dirty", ((rec.get("machine") or {}).get("git") or {}).get("dirty"))
    return (f"CPU {cpu.get('model') or cpu.get('model_name') or '?'}: AMX-bf16 {yn(rec.get('amx_bf16', cpu.get('amx_bf16')))}, "
            f"AVX512-BF16 {yn(rec.get('avx512_bf16', cpu.get('avx512_bf16')))}, "
            f"{rec.get('threads') or (rec.get('metrics') or {}).get('threads_per_rank') or '?'} thread(s) per rank; "
            f"commit {commit[:12]}{' (dirty tree)' if dirty else ''}; "
            f"{rec.get('repeats', 1)} repeat(s).")


def markdown_report(records: list[dict], title: str) -> str:
    first = records[0]
    facts, peak = first.get("machine") or {}, first.get("peak") or {}
    failed = [r for r in records if r.get("status") != "ok"]
    parts = [
        f"# {title}",
        "",
        first.get("description") or "",
        "",
        f"Run `{first.get('run_id')}`, {first.get('timestamp')}. Reproduce: `{first.get('command')}`",
        "",
        "Machine: " + describe_machine(facts).replace("\n", "  \n"),
        "",
        row_facts_line(first),
        "",
        peak_section(peak, facts),
        "",
        f"Each cell ran in its own process: {first.get('warmup')} warm-up step(s) (the first includes start-up), then "
        f"{first.get('steps')} measured optimizer step(s). tok/s counts every position of the packed blocks "
        "(non-pad: positions that are not padding; packed blocks have none), summed over ranks. "
        "`vs base`: ratio to the baseline (the seed recipe) of the same workload measured in the same repeat; with "
        "repeats, the median over repeats and (min-max). Repeats are interleaved (every cell once per repeat), in "
        "alternating order (baselines first, then last), after a discarded warm-up cell. "
        "best-step tok/s: tokens of one step / the fastest measured step (the least disturbed one on a shared "
        "machine). Peak memory: " + ((records[0].get("metrics") or {}).get("peak_memory_kind") or "peak RSS / CUDA max allocated")
        + ". Data wait: share of step time spent waiting for the next batch. 1st step: process start to the end of "
        "the first optimizer step (model load, data set-up, first step). load: the machine's 1-minute load average "
        "before and after the cell (other processes on the cores show up here).",
        "",
        markdown_table(records),
    ]
    if failed:
        parts += ["", "Failed cells:", ""]
        for r in failed:
            err = (r.get("error") or "").strip().splitlines()
            parts.append(f"- {r['label']}: {r['status']}: `{(err[-1] if err else '')[:300]}`")
    return "\n".join(parts).replace("\n\n\n", "\n\n") + "\n"


def print_table(records: list[dict], title: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=title)
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("config", "variant") else "right")
    for rec in records:
        t.add_row(*row_cells(rec), style=None if rec.get("status") == "ok" else "red")
    console.print(t)


def atomic_savefig(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written beside it and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def add_machine_caption(fig, facts: dict) -> None:
    """The machine a plot was measured on, under the plot (the first line of describe_machine)."""
    if facts:
        fig.text(0.01, -0.02, describe_machine(facts).splitlines()[0], fontsize=7, color="#555555", wrap=True,
                 va="top")


VARIANT_COLORS = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def plot_bars(records: list[dict], key: str, scale: float, xlabel: str, title: str, path: Path,
              ratio_key: str | None = None) -> Path:
    plt = pyplot()
    ok = [r for r in records if r.get("status") == "ok" and r.get("metrics")]

    def vname(r: dict) -> str:
        return (r.get("cell") or {}).get("variant") or r["variant"]

    variants = list(dict.fromkeys(vname(r) for r in records))
    if "baseline" in variants:
        variants.remove("baseline")
        variants.insert(0, "baseline")
    colors = {v: VARIANT_COLORS[i % len(VARIANT_COLORS)] for i, v in enumerate(variants)}
    fig, ax = plt.subplots(figsize=(9, 0.45 * max(3, len(ok)) + 1.2))
    labels = [f"{r['config']} [{r['variant']}]" for r in ok]
    values = [(r["metrics"].get(key) or 0) / scale for r in ok]
    y = list(range(len(ok)))[::-1]
    ax.barh(y, values, color=[colors[vname(r)] for r in ok])
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    top = max(values) if values else 1
    for yi, v, r in zip(y, values, ok):
        text = f"{v:,.2f}" if v < 100 else f"{v:,.0f}"
        if ratio_key and r.get("ratios"):
            text += f"  (x{r['ratios'][ratio_key]:.2f})"
        ax.text(v + 0.01 * top, yi, text, va="center", fontsize=8)
    ax.set_xlim(0, top * 1.35 if top else 1)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[v]) for v in variants]
    ax.legend(handles, variants, fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    add_machine_caption(fig, (records[0] if records else {}).get("machine") or {})
    atomic_savefig(fig, path)
    plt.close(fig)
    return path


def write_report(records: list[dict], results_dir: Path, stem: str, console=None) -> dict[str, Path]:
    """Markdown (printed and saved) + tokens/s and memory plots for one run's records."""
    from rich.console import Console

    console = console or Console()
    records = combine_repeats(records)
    first = records[0]
    title = f"sft bench: {first.get('matrix')} ({first.get('timestamp', '')[:10]}, {first.get('machine', {}).get('hostname')})"
    results_dir.mkdir(parents=True, exist_ok=True)
    md_path = results_dir / f"{stem}.md"
    text = markdown_report(records, title)
    tmp = md_path.with_name(md_path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, md_path)
    print_table(records, title, console)
    paths = {"markdown": md_path}
    if any(r.get("status") == "ok" for r in records):
        paths["throughput_png"] = plot_bars(records, "tokens_per_s", 1.0, "tokens/s (all ranks)",
                                            f"{title}: throughput (xN: ratio to the baseline)",
                                            results_dir / f"{stem}-throughput.png", "tokens_per_s")
        kind = (first.get("metrics") or {}).get("peak_memory_kind") or "peak memory"
        paths["memory_png"] = plot_bars(records, "peak_memory_bytes", 2**30, f"GiB ({kind})",
                                        f"{title}: peak memory", results_dir / f"{stem}-memory.png", "peak_memory")
    return paths


def load_records(jsonl: Path, run_id: str | None = None) -> list[dict]:
    """Records of one run (default: the last run in the file)."""
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("kind", "matrix") == "matrix"]
    if not rows:
        raise ValueError(f"{jsonl} holds no matrix results")
    run_id = run_id or rows[-1]["run_id"]
    out = [r for r in rows if r["run_id"] == run_id]
    if not out:
        raise ValueError(f"{jsonl} has no run {run_id!r}; runs: {', '.join(dict.fromkeys(r['run_id'] for r in rows))}")
    return out
