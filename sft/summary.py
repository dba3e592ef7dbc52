"""What a run reports: :class:`RunSummary` (``sft.train``'s return value, printed by ``sft train``) and
summary.json (the summary, the resolved config, rank facts, step timing and the library patches that ran).

The library's fields are declared here; a run hook (:class:`sft.hooks.RunHooks`) adds its own with
:meth:`RunSummary.add` (the demo's held-out accuracy, sft/demo; the first eval question's answer,
sft.generation.FirstAnswer). They read as attributes (``summary.accuracy_after``) and stand in summary.json's
``summary`` section beside the library's."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    merge_max_abs_diff: float | None = None
    resumed_from: str | None = None  # the checkpoint this run continued from
    resumed_step: int = 0  # its global step (this run trained steps resumed_step+1 .. steps)
    loss_history: list[float] = field(default_factory=list)
    model_tflops_per_s: float = float("nan")
    paths: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    data_counting: str = ""  # how steps per epoch were found: counted, cached (length cache) or skipped (max_steps)
    packing: dict = field(default_factory=dict)  # rank 0's packing counts over the blocks it built in training
    extra: dict[str, Any] = field(default_factory=dict)  # the run hooks' fields (add)
    tracked: list[str] = field(default_factory=list)  # those of them the report_to trackers get, as eval_<name>

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(1, self.total_params)

    def add(self, name: str, value: Any = None, track: bool = False) -> None:
        """Set a run hook's field ``name`` (summary.json shows it beside the library's fields). ``track``: a number
        the ``training.report_to`` trackers also get as ``eval_<name>``, when it is set (not None): at step 0 when
        it is set before training, else after the merge."""
        if name in {f for f in self.__dataclass_fields__}:
            raise ValueError(f"RunSummary.{name} is the library's own field; a run hook adds fields of its own")
        self.extra[name] = value
        if track and name not in self.tracked:
            self.tracked.append(name)

    def tracked_values(self) -> dict[str, float]:
        """The tracked fields that are set, as the trackers get them (``eval_<name>``)."""
        return {f"eval_{k}": self.extra[k] for k in self.tracked if self.extra.get(k) is not None}

    def __getattr__(self, name: str) -> Any:  # a run hook's field reads as an attribute
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """summary.json's ``summary`` section: the library's fields, then the run hooks'."""
        d = asdict(self)
        extra, _ = d.pop("extra"), d.pop("tracked")
        return {**d, **extra}


def write_summary(path: Path, summary: RunSummary, config: dict, run: dict, timing: dict) -> None:
    """summary.json; ``patches``: the names of sft's library patches that ran in this process (sft.patches)."""
    from sft.patches import ran

    atomic_write_json(path, {"summary": summary.to_dict(), "config": config, "run": run, "timing": timing,
                             "patches": ran()}, indent=2)
