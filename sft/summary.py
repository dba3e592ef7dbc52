"""What a run reports: :class:`RunSummary` (``sft.train``'s return value, printed by ``sft train``) and
summary.json (the summary, the resolved config, rank facts, step timing and the library patches that ran)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from sft.io import atomic_write_json


@dataclass
class RunSummary:
    steps: int = 0
    tokens: int = 0
    tokens_per_s: float = float("nan")
    train_seconds: float = 0.0
    first_step_s: float = float("nan")
    step_time_median_s: float = float("nan")  # optimizer steps, excluding the first (warm-up) and eval/save steps
    peak_rss_gb: float = 0.0
    allocator: str = "system"  # the host allocator this process ran on (training.allocator): jemalloc, tcmalloc, system
    trainable_params: int = 0
    total_params: int = 0
    world_size: int = 1
    backend: str = "none"
    strategy: str = "single"  # what the Trainer really ran: single, ddp, deepspeed-zero2/3, fsdp2
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    eval_loss: float | None = None
    eval_perplexity: float | None = None  # exp(eval_loss): per-token perplexity of the held-out set
    accuracy_before: float | None = None  # held-out accuracy, filled by an evaluation hook (the demo's exact match)
    accuracy_after: float | None = None  # the adapter model (None under ZeRO-3 / FSDP: see accuracy_merged)
    accuracy_merged: float | None = None  # the merged model, reloaded from disk as a user would
    sample_question: str | None = None
    sample_answer: str | None = None
    merge_max_abs_diff: float | None = None
    resumed_from: str | None = None  # the checkpoint this run continued from
    resumed_step: int = 0  # its global step (this run trained steps resumed_step+1 .. steps)
    loss_history: list[float] = field(default_factory=list)
    model_tflops_per_s: float = float("nan")
    paths: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    data_counting: str = ""  # how steps per epoch were found: counted, cached (length cache) or skipped (max_steps)
    packing: dict = field(default_factory=dict)  # rank 0's packing counts over the blocks it built in training

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(1, self.total_params)


def write_summary(path: Path, summary: RunSummary, config: dict, run: dict, timing: dict) -> None:
    """summary.json; ``patches``: the names of sft's library patches that ran in this process (sft.patches)."""
    from sft.patches import ran

    atomic_write_json(path, {"summary": asdict(summary), "config": config, "run": run, "timing": timing,
                             "patches": ran()}, indent=2)
