"""`sft bench`: the cost model, matrix loading, scaling analysis, and one tiny matrix through the real CLI.

No benchmark number is asserted (the CPU is shared and noisy): only that every metric is there and sensible.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.allreduce import fit_ring
from benchmarks.costmodel import CostModel, gbit_to_Bps, lora_param_count, projection_table, ring_allreduce_seconds
from benchmarks.matrix import load_matrix, run_config_for
from sft.errors import ConfigError

SFT = [str(Path(sys.executable).parent / "sft")] if (Path(sys.executable).parent / "sft").exists() else [sys.executable, "-m", "sft.cli"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------- cost model


def test_ring_allreduce_hand_computed():
    # 2 ranks, 1 GB at 1 GB/s, 10 ms latency: 2*(1/2)*1 s + 2*1*0.01 s
    assert ring_allreduce_seconds(1e9, 2, 1e9, 0.01) == pytest.approx(1.02)
    # 4 ranks: 2*(3/4)*1 + 2*3*0.01
    assert ring_allreduce_seconds(1e9, 4, 1e9, 0.01) == pytest.approx(1.56)
    assert ring_allreduce_seconds(1e9, 1, 1e9, 0.01) == 0.0
    # buckets only multiply the latency term
    assert ring_allreduce_seconds(1e9, 2, 1e9, 0.01, buckets=3) == pytest.approx(1.06)


def test_cost_model_efficiency():
    m = CostModel(t_compute_s=1.0, grad_bytes=1e9, bandwidth_Bps=1e9, latency_s=0.01, batch=8, buckets=1)
    assert m.weak_efficiency(1) == 1.0
    assert m.strong_efficiency(1, 8) == 1.0
    assert m.weak_efficiency(2) == pytest.approx(1 / 2.02)
    assert m.weak_efficiency(4) == pytest.approx(1 / 2.56)
    # strong, global batch 8: compute halves at N=2 -> 0.5 / (0.5 + 1.02)
    assert m.strong_efficiency(2, 8) == pytest.approx(0.5 / 1.52)
    nodes = [1, 2, 4, 8, 16, 32, 64]
    weak = [m.weak_efficiency(n) for n in nodes]
    strong = [m.strong_efficiency(n, 64) for n in nodes]
    assert all(a > b for a, b in zip(weak, weak[1:]))
    assert all(a > b for a, b in zip(strong, strong[1:]))
    assert all(0 < e <= 1 for e in weak + strong)
    rows = projection_table(m, nodes)
    assert [r["nodes"] for r in rows] == nodes and rows[0]["weak_efficiency"] == 1.0
    assert gbit_to_Bps(8) == 1e9


def test_cost_model_lora_size_from_the_architecture():
    # OPT-1.3B, r16 on q/v: 24 layers x 2 modules x 16 x (2048 + 2048)
    assert lora_param_count("opt-1.3b", 16, ["q_proj", "v_proj"]) == 24 * 2 * 16 * 4096
    # all-linear excludes the LM head
    n = lora_param_count("tiny-llama", 8, ["all-linear"])
    per_layer = 8 * ((128 + 128) + (128 + 64) * 2 + (128 + 128) + (128 + 256) * 2 + (256 + 128))
    assert n == 2 * per_layer


def test_allreduce_fit_recovers_bandwidth_and_latency():
    bw, lat = 2e9, 30e-6
    times = {s: ring_allreduce_seconds(s, 2, bw, lat) for s in (4, 4096, 65536, 1 << 20, 16 << 20)}
    fit = fit_ring(times, 2)
    assert fit["bandwidth_Bps"] == pytest.approx(bw, rel=1e-6)
    assert fit["latency_s"] == pytest.approx(lat, rel=1e-6)


def test_allreduce_fit_takes_the_bandwidth_from_the_large_messages():
    """Measured over a 100 Mbit/s tbf cap (2026-12-06): the small messages' jitter (4 KB slower than 64 KB) must not
    set the slope. The earlier relative-error fit reported 188 Mbit/s from these times."""
    ms = {4: 0.43, 4096: 1.05, 65536: 2.06, 262144: 17.66, 1048576: 85.04, 4194304: 350.17}
    fit = fit_ring({k: v / 1e3 for k, v in ms.items()}, 2)
    assert 90e6 / 8 < fit["bandwidth_Bps"] < 100e6 / 8, fit["bandwidth_Bps"] * 8
    assert fit["latency_s"] == pytest.approx(0.43e-3 / 2, rel=0.01)
    predicted = ring_allreduce_seconds(1 << 20, 2, fit["bandwidth_Bps"], fit["latency_s"])
    assert predicted == pytest.approx(85.04e-3, rel=0.05)


def test_synchronous_compute_waits_for_the_slower_node():
    from benchmarks.costmodel import synchronous_compute_s

    steady = [0.040] * 9
    assert synchronous_compute_s([steady, steady]) == pytest.approx(0.040)
    # one node alternates fast and slow steps: half the combinations wait for its slow step
    jittery = [0.030, 0.050] * 5
    assert synchronous_compute_s([steady, jittery]) == pytest.approx(0.045)  # median of {0.040, 0.050}
    # two nodes, each slow one step in four: 7 of 16 combinations wait for a slow step, the median does not
    assert synchronous_compute_s([[0.040] * 3 + [0.060]] * 2) == pytest.approx(0.040)
    # many nodes: sampled, and the slow tail shows more often
    many = synchronous_compute_s([[0.040] * 9 + [0.060]] * 16, samples=20_000)
    assert many == pytest.approx(0.060)
    with pytest.raises(ValueError):
        synchronous_compute_s([steady, []])


# --------------------------------------------------------------------------------------------- matrices


@pytest.mark.parametrize("name", ["cpu", "cpu-large", "llama", "gpu", "smoke", "memory-calibration", "compile"])
def test_shipped_matrices_load(name):
    m = load_matrix(name)
    assert m.cells and m.steps >= 1 and m.warmup >= 1
    variants = {c.variant for c in m.cells}
    assert {"baseline", "framework"} <= variants
    # baselines come first within each workload, so ratios can be written as cells finish
    seen = set()
    for c in m.cells:
        if c.runner == "baseline":
            seen.add(c.workload_key())
        else:
            assert c.workload_key() in seen


def test_matrix_errors_and_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cells:\n  - {modle: opt-125m}\n")
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        load_matrix(str(bad))
    bad.write_text("variants:\n  fast: {overrides: {training.lerning_rate: 1}}\ncells:\n  - {variant: fast}\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_matrix(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("defaults: {model: tiny-llama}\nvariants:\n  big-read: {overrides: {data.read_batch: 1024}}\n"
                    "cells:\n  - {variant: [baseline, big-read], seq_length: [64, 128]}\n")
    m = load_matrix(str(good), axis_overrides={"dtype": "fp32"})
    assert len(m.cells) == 4 and all(c.dtype == "fp32" for c in m.cells)
    cfg = run_config_for(next(c for c in m.cells if c.variant == "big-read"))
    assert cfg.data.read_batch == 1024 and cfg.model.name == "arch:tiny-llama" and cfg.model.dtype == "fp32"
    assert cfg.training.save_strategy == "no" and cfg.training.merge is False


# --------------------------------------------------------------------------------------------- scaling analysis


def test_scaling_analysis_and_plot(tmp_path):
    from benchmarks.scaling import analyse, markdown, plot

    common = {"config": "opt-125m 8x512", "variant": "framework", "label": "x", "grad_bytes": 2.4e6}
    points = [
        {"mode": "base", "ranks": 1, "threads": 2, "micro_batch": 8, "tokens_per_s": 1000.0, "step_time_median_s": 4.1, **common},
        {"mode": "strong", "ranks": 2, "threads": 1, "micro_batch": 4, "tokens_per_s": 900.0, "step_time_median_s": 4.6, **common},
        {"mode": "weak", "ranks": 2, "threads": 1, "micro_batch": 8, "tokens_per_s": 950.0, "step_time_median_s": 8.6, **common},
    ]
    fit = {"world": 2, "bandwidth_Bps": 1e9, "latency_s": 1e-4}
    result = analyse(points, fit, [("100 Gbit/s", 100.0, 5.0)], [1, 2, 4, 8], None)
    eff = {r["mode"]: r["efficiency"] for r in result["measured"]}
    assert eff == {"base": 1.0, "strong": pytest.approx(0.9), "weak": pytest.approx(0.95)}
    weak = next(r for r in result["measured"] if r["mode"] == "weak")
    # compute per rank: 4.1 s * (2 cores / 1 thread) * (8 / 8); all-reduce: 2.4 MB / 1 GB/s + 2 * 0.1 ms
    assert weak["model_compute_s"] == pytest.approx(8.2)
    assert weak["model_allreduce_s"] == pytest.approx(2.4e-3 + 2e-4)
    assert 0 < weak["model_efficiency"] < 1
    proj = result["projection"]
    assert len(proj) == 2 and proj[0]["rows"][0]["weak_efficiency"] == 1.0
    meta = {"timestamp": "2026-01-01T00:00:00", "run_id": "r", "command": "sft bench scaling", "machine": {"hostname": "h"}}
    text = markdown(result, meta)
    assert "| weak | 2 x 1 | 8 |" in text
    png = plot(result, tmp_path / "s.png", "t", {"hostname": "h", "cpu": {"model": "Xeon"}})
    assert png.read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------------------------- the real CLI


# --------------------------------------------------------------------------------------------- the protocol


def _cells(*variants):
    from benchmarks.matrix import CellSpec

    return [CellSpec(model="opt-125m", quantization="none", seq_length=64, micro_batch=2, gradient_checkpointing=True,
                     dtype="fp32", variant=v, ranks=1, threads=None, lora_r=8, lora_targets=["q_proj"],
                     runner="baseline" if v == "baseline" else "framework") for v in variants]


def test_plan_interleaves_alternates_and_warms_up_first():
    from benchmarks.runner import plan_runs

    cells = _cells("baseline", "framework", "plain-loss")
    plan = plan_runs(cells, 3)
    # the warm-up (the first cell, discarded) comes before anything measured
    assert plan[0].warmup and plan[0].cell is cells[0] and not any(p.warmup for p in plan[1:])
    measured = plan[1:]
    assert [p.repeat for p in measured] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # interleaved: each repeat holds every cell
    names = [[p.cell.variant for p in measured if p.repeat == r] for r in range(3)]
    assert names == [["baseline", "framework", "plain-loss"], ["plain-loss", "framework", "baseline"],
                     ["baseline", "framework", "plain-loss"]]  # baseline first, then last
    assert [p.order for p in measured[:4]] == ["forward"] * 3 + ["reversed"]
    assert not plan_runs(cells, 1, warmup_cell=False)[0].warmup
    with pytest.raises(ValueError):
        plan_runs(cells, 0)


def test_ratios_are_to_the_same_repeats_baseline_and_reported_as_median_and_range():
    from benchmarks.report import _ratio, combine_repeats
    from benchmarks.runner import CellRecord, assign_ratios

    base, fw = _cells("baseline", "framework")

    def metrics(tps, mem):
        return {"tokens_per_s": tps, "peak_memory_bytes": mem, "step_time_median_s": 1000.0 / tps,
                "step_times_s": [1000.0 / tps]}

    rows = []
    # per repeat: (baseline tok/s, framework tok/s); the baseline runs last in repeat 1
    for rep, (b, f) in enumerate([(100.0, 200.0), (50.0, 150.0), (100.0, 250.0)]):
        recs = [CellRecord(fw, "ok", metrics(f, 2.0), None, 1.0), CellRecord(base, "ok", metrics(b, 4.0), None, 1.0)]
        if rep % 2 == 0:
            recs.reverse()
        assign_ratios(recs)
        for r in recs:
            rows.append({"label": r.cell.label(), "config": r.cell.config_label(), "variant": r.cell.variant,
                         "status": r.status, "metrics": r.metrics, "ratios": r.ratios, "repeat": rep})
    per_repeat = [r["ratios"]["tokens_per_s"] for r in rows if r["variant"] == "framework"]
    assert per_repeat == [2.0, 3.0, 2.5]  # each to its own repeat's baseline
    combined = {r["label"]: r for r in combine_repeats(rows)}
    f = combined[fw.label()]
    assert f["repeats"] == 3
    assert f["ratios"]["tokens_per_s"] == 2.5  # median of the per-repeat ratios
    assert f["ratio_ranges"]["tokens_per_s"] == [2.0, 3.0]
    assert f["ratios"]["peak_memory"] == 0.5
    assert _ratio(f, "tokens_per_s") == "2.50x (2.00-3.00)"
    assert combined[base.label()]["ratios"]["tokens_per_s"] == 1.0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke matrix plus one cell that cannot start, through `sft bench`."""
    work = tmp_path_factory.mktemp("bench")
    smoke = (Path(__file__).resolve().parent.parent / "benchmarks" / "matrices" / "smoke.yaml").read_text()
    matrix = work / "smoke-with-failure.yaml"
    matrix.write_text(smoke.replace("cells:\n  - {}", "cells:\n  - {model: /nonexistent/model-dir, variant: framework}\n  - {}"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([*SFT, "bench", "--matrix", str(matrix), "--results-dir", str(work / "results"),
                           "--peak-seconds", "1", "--no-progress", "--repeat", "1", "--no-warmup-cell",
                           "--env", f"SFT_BENCH_PROFILE={work / 'profiles'}"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=900)
    return work / "results", proc


@pytest.mark.multiprocess
def test_smoke_files_appear(smoke_run):
    results, proc = smoke_run
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: one cell failed, the rest ran
    jsonl = list(results.glob("*.jsonl"))
    assert len(jsonl) == 1
    stem = jsonl[0].stem
    md = results / f"{stem}-smoke.md"
    assert md.exists()
    for kind in ("throughput", "memory"):
        assert (results / f"{stem}-smoke-{kind}.png").read_bytes()[:8] == PNG_MAGIC
    text = md.read_text()
    assert "| config | variant | tok/s |" in text
    assert "baseline" in text and "framework" in text and "spec" in text and "Failed cells" in text


@pytest.mark.multiprocess
def test_smoke_profiles_the_first_measured_step_of_each_cell(smoke_run):
    """SFT_BENCH_PROFILE=DIR: one op table per cell that ran, of one training step, with the GEMMs in it."""
    results, _ = smoke_run
    tables = sorted((results.parent / "profiles").glob("*.rank0.txt"))
    assert [t.name.rsplit("_", 2)[-2] for t in tables] == ["baseline", "framework"], tables
    for t in tables:
        text = t.read_text()
        assert "one training step" in text and ("aten::mm" in text or "aten::addmm" in text), text[:2000]


@pytest.mark.multiprocess
def test_smoke_failed_cell_is_reported_and_the_rest_go_on(smoke_run):
    results, proc = smoke_run
    records = [json.loads(line) for line in next(results.glob("*.jsonl")).read_text().splitlines()]
    assert [r["status"] for r in records] == ["failed", "ok", "ok"]
    assert "nonexistent" in records[0]["error"]
    assert "failed" in proc.stdout


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.multiprocess
def test_smoke_metrics_present_and_sensible(smoke_run):
    results, _ = smoke_run
    records = [json.loads(line) for line in next(results.glob("*.jsonl")).read_text().splitlines()]
    ok = [r for r in records if r["status"] == "ok"]
    assert [r["variant"] for r in ok] == ["baseline", "framework"]
    for r in ok:
        m = r["metrics"]
        for key in ("tokens_per_s", "tokens_per_s_per_rank", "non_padding_tokens_per_s", "label_tokens_per_s",
                    "samples_per_s", "step_time_median_s", "step_time_p90_s", "model_flops_per_token",
                    "hardware_flops_per_token", "mfu", "hfu", "peak_rss_bytes", "peak_memory_bytes",
                    "time_to_first_step_s", "first_step_s", "trainable_params", "grad_bytes", "loss_first"):
            assert _finite_positive(m[key]), (r["label"], key, m[key])
        assert m["measured_steps"] == r["steps"] == 3 and m["warmup_steps"] == 1
        assert m["step_time_p90_s"] >= m["step_time_median_s"]
        assert 0 < m["mfu"] <= 1 and m["mfu"] <= m["hfu"]
        assert 0 <= m["data_wait_fraction"] <= 1
        assert m["non_padding_tokens_per_s"] <= m["tokens_per_s"] * (1 + 1e-9)
        assert m["time_to_first_step_s"] >= m["first_step_s"]
        assert m["tokens_per_step"] == 2 * 64  # micro-batch x seq length, one rank
        assert m["peak_rss_bytes_per_rank"] and m["ranks"] == 1
        # ratios to the baseline measured in the same run
        assert r["ratios"] and _finite_positive(r["ratios"]["tokens_per_s"]) and _finite_positive(r["ratios"]["peak_memory"])
        assert r["baseline"] == ok[0]["label"]
        # machine facts and the measured peak travel with every line
        assert r["machine"]["cpu"]["physical_cores"] >= 1 and r["machine"]["libraries"]["torch"]
        assert "commit" in r["machine"]["git"]
        # and the row says on its own what CPU features, threads and commit it measured
        assert r["amx_bf16"] in (True, False) and r["avx512_bf16"] in (True, False) and r["threads"] >= 1
        assert r["commit"] == r["machine"]["git"]["commit"] and r["repeat"] == 0 and r["order"] == "forward"
        assert _finite_positive(r["peak"]["peak_flops"]) and r["peak"]["peak_dtype"] in ("bf16", "fp32")
        # what checkpointing ran (auto's share of recomputed layers) and the memory it planned with
        assert 0 <= float(m["checkpointing"]) <= 1 and _finite_positive(m["mem_available_bytes"])
    assert ok[0]["ratios"]["tokens_per_s"] == 1.0


def test_project_takes_the_measured_data_parallel_overhead(capsys):
    """`sft bench project --overhead-ms`: the checked model's overhead term lowers the projected efficiency."""
    from benchmarks.cli import main

    argv = ["project", "--model", "tiny-llama", "--lora-targets", "all-linear", "--lora-r", "64", "--step-time",
            "0.05", "--micro-batch", "2", "--bandwidth-gbps", "1", "--latency-us", "100", "--nodes", "1,2"]
    effs = []
    for extra in ([], ["--overhead-ms", "10"]):
        assert main([*argv, *extra]) == 0
        out = capsys.readouterr().out
        row = [line for line in out.splitlines() if line.strip("│ ").startswith("2 ")][0]
        effs.append(float(row.replace("│", " ").split()[2]))
    grad = lora_param_count("tiny-llama", 64, ["all-linear"]) * 4
    for eff, overhead in zip(effs, (0.0, 0.010)):
        want = CostModel(0.05, grad, gbit_to_Bps(1), 100e-6, batch=2, overhead_s=overhead).weak_efficiency(2)
        assert eff == pytest.approx(want, abs=6e-4)
    assert effs[1] < effs[0]


def test_costmodel_check_numbers_runs_and_counts_the_band(tmp_path):
    from benchmarks.studies.costmodel_check import load, main, markdown

    def row(cap, predicted, measured):
        return {"cap": cap, "link_bandwidth_Bps": 12.5e6, "link_latency_s": 1e-4, "one_node_step_s": 0.04,
                "overhead_s": 0.01, "predicted_s": predicted, "measured_s": measured}

    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in (row("100mbit", 0.140, 0.139), row("1gbit", 0.065, 0.050),
                                                         row("100mbit", 0.150, 0.150), row("1gbit", 0.06, 0.06))))
    rows = load(f)
    assert [r["run"] for r in rows] == [1, 1, 2, 2]
    assert rows[1]["error"] == pytest.approx(0.30)
    assert "within ±15%: 3 of 4 rows" in markdown(rows)
    assert main([str(f), "--out", str(tmp_path / "out" / "check")]) == 0
    assert (tmp_path / "out" / "check.png").stat().st_size > 0 and (tmp_path / "out" / "check.md").exists()
