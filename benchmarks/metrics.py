"""A cell's metrics from its ranks' per-step records (tokens/s, MFU, peak memory, data wait...), and its ratios to
the baseline of the same workload."""

from __future__ import annotations


def aggregate(results: list[dict], warmup: int, steps: int, peak: dict | None) -> dict:
    """Per-rank step records -> the cell's metrics over the measured steps (after ``warmup``)."""
    from sft.metrics import percentile, utilization

    n_ranks = len(results)
    sl = slice(warmup, warmup + steps)
    measured = min(len(r["step_times_s"][sl]) for r in results)
    if measured < 1:
        raise ValueError(f"no measured steps (ran {min(len(r['step_times_s']) for r in results)} of {warmup + steps})")
    sl = slice(warmup, warmup + measured)
    # Ranks step in lockstep (the gradient all-reduce); a step lasts as long as its slowest rank.
    step_times = [max(r["step_times_s"][i] for r in results) for i in range(sl.start, sl.stop)]
    wall = sum(step_times)

    def per_s(key: str) -> float:
        return sum(sum(r[key][sl]) for r in results) / wall

    tokens_per_s = per_s("tokens")
    r0 = results[0]
    fl = r0.get("flops") or {}
    peak_flops = (peak or {}).get("peak_flops")
    if peak_flops and (peak or {}).get("per") == "gpu":
        peak_flops *= n_ranks
    busy = sum(sum(r["step_times_s"][sl]) for r in results)
    waited = sum(sum(r["data_wait_s"][sl]) for r in results)
    rss = [r["peak_rss_bytes"] for r in results]
    losses = r0.get("losses") or []
    m = {
        "ranks": n_ranks,
        "threads_per_rank": r0.get("threads"),
        "measured_steps": measured,
        "warmup_steps": warmup,
        "tokens_per_step": sum(r["tokens"][sl.start] for r in results),
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_rank": tokens_per_s / n_ranks,
        "non_padding_tokens_per_s": per_s("non_padding_tokens"),
        "non_padding_tokens_per_s_per_rank": per_s("non_padding_tokens") / n_ranks,
        "label_tokens_per_s": per_s("label_tokens"),
        "samples_per_s": per_s("samples"),
        "step_time_median_s": percentile(step_times, 0.5),
        "step_time_p90_s": percentile(step_times, 0.9),
        "step_times_s": step_times,
        "model_flops_per_token": fl.get("model_per_token"),
        "hardware_flops_per_token": fl.get("hardware_per_token"),
        "model_tflops_per_s": tokens_per_s * (fl.get("model_per_token") or float("nan")) / 1e12,
        "mfu": utilization(tokens_per_s, fl.get("model_per_token") or 0, peak_flops or 0),
        "hfu": utilization(tokens_per_s, fl.get("hardware_per_token") or 0, peak_flops or 0),
        "peak_rss_bytes": max(rss),
        "peak_rss_bytes_per_rank": rss,
        "rss_max_at_steps_bytes": max(r.get("rss_max_at_steps_bytes", 0) for r in results),
        "data_wait_fraction": waited / busy if busy > 0 else float("nan"),
        "time_to_first_step_s": max(r["time_to_first_step_s"] for r in results),
        "first_step_s": max(r["first_step_s"] for r in results),
        "startup_s": max(r["startup_s"] for r in results),
        "trainable_params": (r0.get("params") or {}).get("trainable"),
        "total_params": (r0.get("params") or {}).get("total"),
        "grad_bytes": (r0.get("params") or {}).get("grad_bytes"),
        "loss_first": losses[0] if losses else float("nan"),
        "loss_last": losses[-1] if losses else float("nan"),
        "backend": r0.get("backend"),
        "allocator": r0.get("allocator"),  # what the cell's process ran on (sft.allocator.loaded)
        # the share of decoder layers that recompute (True/False: all/none), and the memory `auto` planned with
        "checkpointing": r0.get("checkpointing"),
        "mem_available_bytes": min((r.get("mem_available_bytes") or 0) for r in results) or None,
    }
    if "cuda_max_allocated_bytes" in r0:
        m["cuda_max_allocated_bytes"] = max(r["cuda_max_allocated_bytes"] for r in results)
        m["cuda_max_reserved_bytes"] = max(r["cuda_max_reserved_bytes"] for r in results)
        m["peak_memory_bytes"] = m["cuda_max_allocated_bytes"]
        m["peak_memory_kind"] = "cuda max allocated (per GPU)"
    else:
        m["peak_memory_bytes"] = m["peak_rss_bytes"]
        m["peak_memory_kind"] = "peak RSS (largest rank)"
    return m


def ratios(metrics: dict, base_metrics: dict) -> dict:
    return {
        "tokens_per_s": metrics["tokens_per_s"] / base_metrics["tokens_per_s"],
        "peak_memory": metrics["peak_memory_bytes"] / base_metrics["peak_memory_bytes"],
        "step_time_median": metrics["step_time_median_s"] / base_metrics["step_time_median_s"],
    }
