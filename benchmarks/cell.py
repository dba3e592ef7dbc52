"""One benchmark cell, run in its own process (one per rank): ``python -m benchmarks.cell SPEC.json``.

Both variants train with a ``transformers.Trainer`` carrying the same instrumentation, one ``TrainerCallback``
(:class:`RecorderCallback`), so their numbers are measured identically:

* ``framework``: ``sft.train(cfg, callbacks=[recorder])`` -- the code ``sft train`` runs, through the public API --
  with a RunConfig built from the cell's axes and the variant's overrides (benchmarks.matrix.framework_overrides).
* ``baseline``: benchmarks.baseline.build_trainer (the seed recipe), with the same callback.

What is recorded per rank (written to ``result.rank<R>.json`` next to the spec):

* the wall time at the end of every optimizer step (CUDA synchronised first), and when training began;
* the data wait of every step: from the previous step's end (or the start of training) to the step's first
  forward, i.e. what the Trainer spent reading, tokenizing, packing, collating and copying the batches;
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

from sft.io import atomic_write_text

SPAWN_ENV = "SFT_BENCH_SPAWN_TIME"  # time.time() when the runner started this cell (time to first step)
#: ``SFT_BENCH_PROFILE=DIR``: profile the first measured step (torch.profiler, CPU ops) of every cell and write its
#: op table to DIR/<cell label>.rank<R>.txt, e.g. ``sft bench --env SFT_BENCH_PROFILE=prof --repeat 1 --only ...``.
#: The step's time then includes the profiler's cost: read the table's shares, not the cell's tokens/s.
PROFILE_ENV = "SFT_BENCH_PROFILE"


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
        # what `gradient_checkpointing: auto` plans with (a share of it): recorded, since a machine with less free
        # memory keeps fewer layers and runs slower on the same code
        from sft.models.memory import available_memory_bytes

        self.mem_available_bytes = available_memory_bytes()

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

    def on_batch(self, inputs: dict) -> None:
        """One micro-batch's inputs, as the model's forward receives them."""
        ids = inputs["input_ids"]
        self.tokens[-1] += ids.numel()
        self.samples[-1] += ids.shape[0]
        mask = inputs.get("attention_mask")
        self._nonpad[-1].append(mask.sum() if mask is not None else ids.numel())
        labels = inputs.get("labels")
        if labels is not None:
            self._labelled[-1].append((labels != -100).sum())

    def on_step_begin(self, waited: float) -> None:
        self.data_wait.append(waited)
        self.tokens.append(0)
        self.samples.append(0)
        self._nonpad.append([])
        self._labelled.append([])

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
        from sft.allocator import loaded as allocator_loaded
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
            "mem_available_bytes": self.mem_available_bytes,
            "allocator": allocator_loaded(),
        }


def recorder_callback(rec: Recorder):
    """The TrainerCallback that reports to ``rec``: training start, every step's end, and, through forward hooks
    on the model, every micro-batch's inputs (tokens, labels) and loss, and when its step's first forward began."""
    import torch
    from transformers import TrainerCallback

    class RecorderCallback(TrainerCallback):
        def __init__(self):
            self.last_end = None
            self.in_step = False
            self.profiler = None  # running during the profiled step only

        def on_train_begin(self, args, state, control, model=None, **kw):
            rec.on_train_begin(model)
            # eager under training.torch_compile: timers and token counts are not graph material
            model.register_forward_pre_hook(torch.compiler.disable(self._inputs), with_kwargs=True)
            model.register_forward_hook(torch.compiler.disable(self._output))
            self.last_end = time.perf_counter()

        def _inputs(self, module, args, kwargs):
            if not module.training:
                return
            if not self.in_step:  # the step's first forward: the data wait ends here
                rec.on_step_begin(time.perf_counter() - self.last_end)
                self.in_step = True
            rec.on_batch(kwargs if "input_ids" in kwargs else dict(zip(("input_ids",), args)))

        def _output(self, module, args, output):
            if module.training and getattr(output, "loss", None) is not None:
                rec.on_loss(output.loss)

        def on_step_begin(self, args, state, control, **kw):
            if profile_to and state.global_step == rec.spec.get("profile_step", -1):
                import torch

                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                       record_shapes=True, with_flops=True)
                self.profiler.start()

        def on_step_end(self, args, state, control, **kw):
            rec.on_step_end()
            if self.profiler is not None:
                self.profiler.stop()
                write_profile(self.profiler, Path(profile_to), rec.spec.get("label", "cell"))
                self.profiler = None
            self.last_end, self.in_step = time.perf_counter(), False

    profile_to = os.environ.get(PROFILE_ENV)
    return RecorderCallback()


def write_profile(prof, directory: Path, label: str) -> Path:
    """The profiled step's op table, sorted by self CPU time, with each op's share of the step."""
    rank = int(os.environ.get("RANK", "0"))
    directory.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    lines = [f"# {label}, rank {rank}: one training step, {total / 1e6:.3f} s of self CPU time over all threads",
             f"{'op':<60} {'self s':>9} {'share':>7} {'calls':>7}"]
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:40]:
        lines.append(f"{e.key[:60]:<60} {e.self_cpu_time_total / 1e6:>9.3f} "
                     f"{e.self_cpu_time_total / total:>7.1%} {e.count:>7}")
    # Per (op, input shapes): where a GEMM runs below the machine's peak (GFLOP/s from the profiler's FLOP count
    # of mm / addmm / bmm, over the op's own time).
    by_shape = prof.key_averages(group_by_input_shape=True)
    lines += ["", f"{'op':<16} {'input shapes':<62} {'self s':>8} {'share':>6} {'calls':>6} {'GFLOP/s':>8}"]
    for e in sorted(by_shape, key=lambda e: e.self_cpu_time_total, reverse=True)[:40]:
        shapes = ",".join("x".join(map(str, s)) for s in (e.input_shapes or []) if s)
        rate = f"{e.flops / e.self_cpu_time_total / 1e3:8.1f}" if e.flops and e.self_cpu_time_total else f"{'':>8}"
        lines.append(f"{e.key[:16]:<16} {shapes[:62]:<62} {e.self_cpu_time_total / 1e6:>8.3f} "
                     f"{e.self_cpu_time_total / total:>6.1%} {e.count:>6} {rate}")
    out = directory / f"{safe}.rank{rank}.txt"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def run_framework(spec: dict, dataset: str, max_steps: int, work: Path, rec: Recorder) -> None:
    import sft
    from benchmarks.matrix import CellSpec, run_config_for

    cfg = run_config_for(CellSpec.from_dict(spec), dataset, str(work / "framework-run"), max_steps)
    sft.train(cfg, callbacks=[recorder_callback(rec)])


def run_baseline(spec: dict, dataset: str, max_steps: int, work: Path, rec: Recorder) -> None:
    from benchmarks.baseline import build_trainer
    from benchmarks.matrix import CellSpec

    trainer = build_trainer(CellSpec.from_dict(spec), dataset, str(work / "baseline-run"), max_steps,
                            callbacks=[recorder_callback(rec)])
    trainer.train()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.cell SPEC.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    job = json.loads(spec_path.read_text())
    spec, dataset, max_steps = job["cell"], job["dataset"], job["warmup"] + job["steps"]
    spec = dict(spec, profile_step=job["warmup"])  # the first measured step (global_step counts from 0)
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
    atomic_write_text(out, json.dumps(rec.result()))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("BNB_DISABLE_KERNELS_HUB", "1")
    os.environ.setdefault("DEEPLAKE_TELEMETRY", "0")
    sys.exit(main())
