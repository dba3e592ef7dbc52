"""Experiment trackers: sft's own numbers go where the user already looks (TensorBoard, MLflow, W&B).

transformers' integrations (``training.report_to``) already receive every ``Trainer.log()`` call; this module adds
what the Trainer does not know -- tokens/s, MFU, peak memory per rank, the share of step time spent waiting for
data, held-out accuracy and the merge check -- by logging them through that same ``log()``, as they happen.
Numbers that exist only after ``train()`` returned (accuracy after training, the merge check) are sent to the same
integration callbacks afterwards, and then the trackers are closed.

Where logs land: ``output_dir/logs/<run>`` (TensorBoard event files, the W&B run folder); MLflow uses
``MLFLOW_TRACKING_URI`` when the user set one, else a file store in ``output_dir/logs/mlruns`` (MLflow 3 wants
``MLFLOW_ALLOW_FILE_STORE=true`` for it, which is then set) whose run is named ``<run>``. Nothing goes inside ``checkpoints/``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from pathlib import Path

#: tracker -> (module that must import, pip package that provides it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow (or mlflow-skinny)")}


def check_trackers(report_to: list[str]) -> list[str]:
    """Problems with ``training.report_to``: unknown names, or trackers whose package is not installed."""
    problems = []
    for name in report_to:
        if name == "none":
            continue
        if name not in TRACKERS:
            problems.append(f"training.report_to: unknown tracker {name!r}; use none, {', '.join(TRACKERS)}")
        elif importlib.util.find_spec(TRACKERS[name][0]) is None:
            problems.append(f"training.report_to: {name} is not installed; pip install {TRACKERS[name][1]}")
    if "none" in report_to and len(report_to) > 1:
        problems.append("training.report_to: 'none' cannot be combined with trackers")
    return problems


def active(report_to: list[str]) -> list[str]:
    return [t for t in report_to if t != "none"]


def run_name(out: Path) -> str:
    """A new run's name: its start time (a resumed run is a new run of the same output_dir)."""
    return time.strftime("run-%Y%m%d-%H%M%S")


@contextlib.contextmanager
def environment(out: Path, run: str, report_to: list[str]):
    """Point the integrations at ``out/logs/<run>`` while the Trainer exists (they read these at set-up)."""
    logs = out / "logs" / run
    values = {"TENSORBOARD_LOGGING_DIR": str(logs)}
    if "wandb" in report_to:
        values["WANDB_DIR"] = str(logs)
        values.setdefault("WANDB_RUN_NAME", run)
    if "mlflow" in report_to and not os.environ.get("MLFLOW_TRACKING_URI"):
        values["MLFLOW_TRACKING_URI"] = (out / "logs" / "mlruns").resolve().as_uri()
        # MLflow 3 keeps its file store in maintenance mode behind this flag; a database store needs the full
        # mlflow package (SQLAlchemy): users who want one set MLFLOW_TRACKING_URI themselves
        values["MLFLOW_ALLOW_FILE_STORE"] = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "true")
    if active(report_to):
        logs.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield logs
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_callback(timer, report_to: list[str], seq_length: int, accuracy_before: float | None = None):
    """The TrainerCallback that logs sft's numbers at every logging step (and accuracy before training at step 0).
    ``bind(trainer)`` after the Trainer exists, ``detach()`` when train() returned, ``finish(metrics)`` after the
    merge and its checks."""
    import torch
    from transformers import TrainerCallback

    from sft import dist
    from sft.metrics import checkpointing_fraction, cuda_memory, flops_per_token, peak_rss_bytes, utilization

    class SftMetrics(TrainerCallback):
        def __init__(self):
            self.trainer = None
            self.peak_flops = 0.0
            self.flops_per_token = 0.0
            self.step_end = self.last_event = None
            self.skip_interval = False
            self.waits: list[float] = []
            self.intervals: list[float] = []
            self.logged_times = 0  # timer.times already reported
            self.mlflow_run = None

        def bind(self, trainer) -> None:
            self.trainer = trainer
            if "mlflow" in report_to and trainer.is_world_process_zero():
                # our own run, so that it stays open for the numbers that exist only after train() returned
                import mlflow

                mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
                self.mlflow_run = mlflow.start_run(run_name=trainer.args.run_name)

        def on_train_begin(self, args, state, control, model=None, **kw):
            if active(report_to):  # MFU needs this machine's measured peak (about a second)
                from sft.metrics import measure_gemm_peak

                dtype = torch.bfloat16 if args.bf16 else torch.float32
                device = "cuda" if torch.cuda.is_available() else "cpu"
                self.peak_flops = measure_gemm_peak(dtype, size=1024, seconds=1.0, device=device)["peak"] \
                    * args.world_size
            if model is not None:
                self.flops_per_token = flops_per_token(model, seq_length, checkpointing_fraction(model)).model
            if accuracy_before is not None:
                self.trainer.log({"eval_accuracy_before": accuracy_before})
            self.step_end = time.perf_counter()  # the first step's data wait and interval start here

        def on_step_begin(self, args, state, control, **kw):
            now = time.perf_counter()
            if self.step_end is not None:
                # the Trainer fetches a step's batches between the last step's bookkeeping and this call
                self.waits.append(now - max(self.step_end, self.last_event or 0.0))

        def on_log(self, *a, **kw):
            self.last_event = time.perf_counter()

        def _interrupted(self, *a, **kw):
            self.last_event = time.perf_counter()
            self.skip_interval = True

        on_save = on_evaluate = _interrupted

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            if self.step_end is not None and not self.skip_interval:  # no evaluation or save in between
                self.intervals.append(now - self.step_end)
            self.step_end, self.skip_interval = now, False
            if state.global_step % args.logging_steps and state.global_step != 1:
                return
            times = timer.times[self.logged_times:]
            self.logged_times = len(timer.times)
            tps = timer.tokens_per_step * len(times) / sum(times) if times else timer.tokens_per_second
            logs = {"tokens_per_s": tps}
            if self.peak_flops:
                logs["mfu"] = utilization(tps, self.flops_per_token, self.peak_flops)
            mem = cuda_memory().get("cuda_max_allocated") or peak_rss_bytes()
            peaks = dist.all_reduce_sum(torch.tensor(
                [mem if r == dist.dist_info().rank else 0 for r in range(args.world_size)], dtype=torch.float64))
            for r, m in enumerate(peaks.tolist()):
                logs[f"peak_memory_gib_rank{r}"] = m / 2**30
            if self.intervals and self.waits:
                logs["data_wait_share"] = min(1.0, sum(self.waits[-len(self.intervals):]) / sum(self.intervals))
            self.waits, self.intervals = self.waits[-1:], []
            # log() ends with on_log, which clears control.should_log: keep the Trainer's own decisions for this
            # step (its loss log, evaluation, save), which it acts on after on_step_end
            flags = (control.should_log, control.should_evaluate, control.should_save)
            self.trainer.log(logs)
            for c in {id(control): control, id(self.trainer.control): self.trainer.control}.values():
                c.should_log, c.should_evaluate, c.should_save = flags

        def detach(self) -> None:
            """After train(): keep the integrations (not the Trainer, which holds the model) for ``finish``."""
            from transformers.integrations import integration_utils

            t = self.trainer
            self.history = list(t.state.log_history)
            self.after = (t.args, t.state, t.control, t.is_world_process_zero(),
                          [cb for cb in t.callback_handler.callbacks if type(cb).__module__ == integration_utils.__name__])
            self.trainer = None

        def finish(self, metrics: dict[str, float | None]) -> None:
            """Send post-training numbers to the report_to integrations, then close them (rank 0)."""
            from transformers.integrations import integration_utils

            args, state, control, main, integrations = self.after
            if main and active(report_to):
                logs = {k: float(v) for k, v in metrics.items() if v is not None}
                for cb in integrations:
                    cb.on_log(args, state, control, logs=logs)
                    if isinstance(cb, integration_utils.TensorBoardCallback):
                        cb.on_train_end(args, state, control)  # flush and close the event file
                if self.mlflow_run is not None:
                    import mlflow

                    mlflow.end_run()
                if "wandb" in report_to:
                    import wandb

                    if wandb.run is not None:
                        wandb.finish()

    return SftMetrics()
