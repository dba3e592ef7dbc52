"""One benchmark cell, run in its own process (one per rank): ``python -m benchmarks.cell SPEC.json``.

Both variants train with a ``transformers.Trainer`` subclass carrying the same instrumentation, so their numbers
are measured identically:

* ``framework``: ``sft.training.train(cfg)`` -- the code ``sft train`` runs -- with a RunConfig built from the
  cell's axes and the variant's overrides (benchmarks.matrix.framework_overrides). The instrumentation enters
  through ``sft.training._make_trainer_class`` (wrapped, not replaced: the ShardAwareTrainer stays in place).
* ``baseline``: benchmarks.baseline.build_trainer (the seed recipe).

What is recorded per rank (written to ``result.rank<R>.json`` next to the spec):

* the wall time at the end of every optimizer step (CUDA synchronised first), and when training began;
* the time spent inside ``next()`` on the Trainer's data iterator for every step (data wait: reading, tokenizing,
  packing, collating and copying the batch -- what the step waited for);
* tokens per step: all positions, non-padding positions (attention_mask when the batch has one; packed blocks
  have no padding), positions with a label (!= -100); sequences per step;
* model and hardware FLOPs per token (sft.metrics.flops_per_token), trainable parameters and their gradient bytes;
* peak RSS of the process, the largest current RSS seen at a step end, CUDA max allocated / reserved; losses.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

SPAWN_ENV = "SFT_BENCH_SPAWN_TIME"  # time.time() when the runner started this cell (time to first step)


class Recorder:
    def __init__(self, spec: dict):
        self.spec = spec
        self.step_ends: list[float] = []  # perf_counter at each optimizer-step end
        self.step_end_walls: list[float] = []
        self.data_wait: list[float] = []  # seconds in next() for each optimizer step
        self.tokens: list[int] = []
        self.samples: list[int] = []
        self._nonpad: list[Any] = []  # tensors (summed at the end: no device sync per step)
        self._labelled: list[Any] = []
        self._losses: list[Any] = []
        self.train_begin: float | None = None
        self.train_begin_wall: float | None = None
        self.rss_max_at_steps = 0
        self.flops: dict[str, float] = {}
        self.params: dict[str, int] = {}

    # -- called from the Trainer
    def on_train_begin(self, model) -> None:
        import torch

        from sft.metrics import checkpointing_fraction, flops_per_token

        self.train_begin, self.train_begin_wall = time.perf_counter(), time.time()
        ckpt = self.spec["gradient_checkpointing"]
        if not isinstance(ckpt, bool):  # "auto": what sft decided for this machine (a share of the layers)
            ckpt = checkpointing_fraction(model)
        self.checkpointing = ckpt
        fpt = flops_per_token(model, self.spec["seq_length"], ckpt)
        self.flops = {"model_per_token": fpt.model, "hardware_per_token": fpt.hardware}
        trainable = [p for p in model.parameters() if p.requires_grad]
        total = sum(p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1) for p in model.parameters())
        self.params = {
            "trainable": sum(p.numel() for p in trainable),
            "total": total,
            "grad_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "trainable_dtype": str(trainable[0].dtype) if trainable else "none",
        }
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_batches(self, seconds: float, batches: list[dict]) -> None:
        self.data_wait.append(seconds)
        tokens = samples = 0
        nonpad, labelled = [], []
        for b in batches:
            ids = b["input_ids"]
            tokens += ids.numel()
            samples += ids.shape[0]
            mask = b.get("attention_mask")
            nonpad.append(mask.sum() if mask is not None else ids.numel())
            labels = b.get("labels")
            if labels is not None:
                labelled.append((labels != -100).sum())
        self.tokens.append(tokens)
        self.samples.append(samples)
        self._nonpad.append(nonpad)
        self._labelled.append(labelled)

    def on_loss(self, loss) -> None:
        self._losses.append(loss.detach())

    def on_step_end(self) -> None:
        import torch

        from sft.metrics import current_rss_bytes

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        self.step_end_walls.append(time.time())
        self.rss_max_at_steps = max(self.rss_max_at_steps, current_rss_bytes())

    # -- output
    def result(self) -> dict:
        from sft import distributed as dist
        from sft.metrics import cuda_memory, peak_rss_bytes

        def total(xs) -> int:
            return int(sum(int(x) for x in xs))

        info = dist.dist_info()
        starts = [self.train_begin] + self.step_ends[:-1]
        spawn = float(os.environ.get(SPAWN_ENV, "nan"))
        first_end = self.step_end_walls[0] if self.step_end_walls else float("nan")
        return {
            "rank": info.rank,
            "world_size": info.world_size,
            "threads": info.threads_per_rank,
            "backend": info.backend,
            "step_times_s": [e - s for s, e in zip(starts, self.step_ends)],
            "data_wait_s": self.data_wait[: len(self.step_ends)],
            "tokens": self.tokens[: len(self.step_ends)],
            "non_padding_tokens": [total(x) for x in self._nonpad][: len(self.step_ends)],
            "label_tokens": [total(x) for x in self._labelled][: len(self.step_ends)],
            "samples": self.samples[: len(self.step_ends)],
            "losses": [float(x) for x in self._losses],
            "startup_s": (self.train_begin_wall or float("nan")) - spawn,
            "time_to_first_step_s": first_end - spawn,
            "first_step_s": first_end - (self.train_begin_wall or float("nan")),
            "peak_rss_bytes": peak_rss_bytes(),
            "rss_max_at_steps_bytes": self.rss_max_at_steps,
            **{f"{k}_bytes": v for k, v in cuda_memory().items()},
            "flops": self.flops,
            "params": self.params,
            "checkpointing": getattr(self, "checkpointing", None),
        }


class _TimedIterator:
    """Wraps the Trainer's epoch iterator and adds up the time spent in ``next()``."""

    def __init__(self, it):
        self.it, self.seconds = it, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.seconds += time.perf_counter() - t


def instrument(trainer_cls, rec: Recorder):
    """A subclass of ``trainer_cls`` that reports to ``rec`` (nothing else changes)."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            rec.on_train_begin(model)

        def on_step_end(self, args, state, control, **kw):
            rec.on_step_end()

    class BenchTrainer(trainer_cls):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(_Callback())

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            timed = _TimedIterator(epoch_iterator)
            batches, num_items = super().get_batch_samples(timed, num_batches, device)
            rec.on_batches(timed.seconds, batches)
            return batches, num_items

        def training_step(self, *a, **kw):
            loss = super().training_step(*a, **kw)
            rec.on_loss(loss)
            return loss

    BenchTrainer.__name__ = f"Bench{trainer_cls.__name__}"
    return BenchTrainer


def run_framework(spec: dict, dataset: str, max_steps: int, work: Path, rec: Recorder) -> None:
    import sft.training as training
    from benchmarks.matrix import CellSpec, run_config_for

    cfg = run_config_for(CellSpec.from_dict(spec), dataset, str(work / "framework-run"), max_steps)
    make = getattr(training, "_make_trainer_class", None)
    if make is None:
        raise RuntimeError("sft.training no longer has _make_trainer_class: update benchmarks/cell.py's hook")
    training._make_trainer_class = lambda: instrument(make(), rec)
    try:
        training.train(cfg)
    finally:
        training._make_trainer_class = make


def run_baseline(spec: dict, dataset: str, max_steps: int, work: Path, rec: Recorder) -> None:
    from transformers import Trainer

    from benchmarks.baseline import build_trainer
    from benchmarks.matrix import CellSpec

    trainer = build_trainer(CellSpec.from_dict(spec), dataset, str(work / "baseline-run"), max_steps,
                            trainer_cls=instrument(Trainer, rec))
    trainer.train()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.cell SPEC.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    job = json.loads(spec_path.read_text())
    spec, dataset, max_steps = job["cell"], job["dataset"], job["warmup"] + job["steps"]
    rank = int(os.environ.get("RANK", "0"))
    rec = Recorder(spec)
    work = Path(tempfile.mkdtemp(prefix=f"rank{rank}-", dir=spec_path.parent))
    try:
        (run_baseline if spec["runner"] == "baseline" else run_framework)(spec, dataset, max_steps, work, rec)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    out = spec_path.parent / f"result.rank{rank}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec.result()))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("BNB_DISABLE_KERNELS_HUB", "1")
    os.environ.setdefault("DEEPLAKE_TELEMETRY", "0")
    sys.exit(main())
