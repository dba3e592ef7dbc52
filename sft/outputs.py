"""What a run leaves behind after training: the merged model (rank 0; its logits check, the evaluation hooks, the
optional GGUF), the training plot and summary.json."""

from __future__ import annotations

from pathlib import Path

from sft import distributed as dist
from sft.config import RunConfig
from sft.summary import RunSummary, write_summary


def merge(cfg: RunConfig, out: Path, summary: RunSummary, hooks: list) -> None:
    """Rank 0 merges the adapter into a standalone model; the other ranks wait at the barrier."""
    from sft.merging import merge_adapter

    dist.set_phase("merge" if dist.is_main_process() else "wait-merge")
    if dist.is_main_process():
        merged_dir = out / "merged"
        report = merge_adapter(out / "adapter", merged_dir, overwrite=True)
        print(f"rank 0: merged the adapter into {merged_dir} (logits check max |diff| {report.max_abs_diff:.2e})")
        summary.merge_max_abs_diff = report.max_abs_diff
        summary.paths["merged"] = str(merged_dir)
        for h in hooks:
            h.after_merge(merged_dir, summary)
        if cfg.training.export_gguf:
            from sft.gguf_export import export_after_merge

            summary.paths.update(export_after_merge(merged_dir, out, cfg.training.export_gguf,
                                                    progress=cfg.training.progress, template=cfg.data.template))
    dist.barrier()


def write(cfg: RunConfig, out: Path, summary: RunSummary, history: list[dict], timing: dict) -> None:
    """training.png and summary.json (main process); ``cfg`` is the resolved config."""
    if not dist.is_main_process():
        return
    from sft.plots import save_training_plot

    title = f"sft train: {cfg.model.name}, {summary.steps} steps, {summary.world_size} rank(s) ({out.name})"
    summary.paths["plot"] = str(save_training_plot(history, out / "training.png", title))
    summary.paths["summary"] = str(out / "summary.json")
    write_summary(out / "summary.json", summary, cfg.to_dict(), dist.run_metadata(), timing)


def clear_earlier_run(out: Path) -> None:
    """``training.overwrite``: remove an earlier run's checkpoints and summary from ``out`` before this run starts
    (its adapter and merged model are replaced when this run writes its own)."""
    import shutil

    from sft.preflight import earlier_run

    found = earlier_run(out)
    if "checkpoints" in found:
        shutil.rmtree(out / "checkpoints")
    if "summary.json" in found:
        (out / "summary.json").unlink()
    if found:
        print(f"training.overwrite: replacing the earlier run in {out} (removed its checkpoints and summary)")

