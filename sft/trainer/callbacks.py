"""sft's own Trainer callbacks.

* :class:`ThroughputCallback`: step timing for tokens/s (sft.metrics.StepTimer), the phase the watchdog reports,
  the loss history, and the per-step fault-injection points (sft.faults).
* :class:`TrackerMetrics`: the numbers the Trainer does not know (tokens/s, MFU, peak memory per rank, data wait),
  logged through ``Trainer.log()`` to the ``report_to`` trackers.
"""

from __future__ import annotations

import os
import time

import torch
from transformers import TrainerCallback

from sft import distributed as dist, faults
from sft.metrics import (StepTimer, checkpointing_fraction, cuda_memory, flops_per_token, peak_rss_bytes,
                         utilization)
from sft.trainer.tracking import active


class ThroughputCallback(TrainerCallback):
    def __init__(self, timer: StepTimer, losses: list[float]):
        self.timer, self.losses = timer, losses

    def on_train_begin(self, args, state, control, **kw):
        self.timer.start()

    def on_step_begin(self, args, state, control, **kw):
        dist.set_phase("train", state.global_step + 1)

    def on_step_end(self, args, state, control, **kw):
        self.timer.step()
        rank = dist.dist_info().rank
        faults.kill_at_step(faults.KILL, rank, state.global_step)
        faults.signal_at(rank, state.global_step)
        if faults.desync_at(rank, state.global_step):
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, **kw):
        self.timer.interrupted()

    def on_save(self, args, state, control, **kw):
        self.timer.interrupted()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class TrackerMetrics(TrainerCallback):
    """Logs sft's numbers to the ``report_to`` trackers at every logging step: tokens/s, MFU, peak memory per rank,
    the data-wait share, and the run hooks' numbers measured before training at step 0 (``at_start``; see
    :mod:`sft.trainer.tracking`).

    ``bind(trainer)`` after the Trainer exists, ``detach()`` when train() returned, ``finish(metrics)`` after the
    merge and its checks."""

    def __init__(self, timer: StepTimer, report_to: list[str], seq_length: int,
                 at_start: dict[str, float] | None = None):
        self.timer, self.report_to, self.seq_length = timer, list(report_to), seq_length
        self.at_start = dict(at_start or {})
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
        if "mlflow" in self.report_to and trainer.is_world_process_zero():
            # our own run, so that it stays open for the numbers that exist only after train() returned
            import mlflow

            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
            self.mlflow_run = mlflow.start_run(run_name=trainer.args.run_name)

    def on_train_begin(self, args, state, control, model=None, **kw):
        if active(self.report_to):  # MFU needs this machine's measured peak (about a second)
            from sft.metrics import measure_gemm_peak

            dtype = torch.bfloat16 if args.bf16 else torch.float32
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.peak_flops = measure_gemm_peak(dtype, size=1024, seconds=1.0, device=device)["peak"] * args.world_size
        if model is not None:
            self.flops_per_token = flops_per_token(model, self.seq_length, checkpointing_fraction(model)).model
        if self.at_start:
            self.trainer.log(dict(self.at_start))
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
        logs = {**self._throughput(), **self._peak_memory(args.world_size), **self._data_wait()}
        # log() ends with on_log, which clears control.should_log: keep the Trainer's own decisions for this
        # step (its loss log, evaluation, save), which it acts on after on_step_end
        flags = (control.should_log, control.should_evaluate, control.should_save)
        self.trainer.log(logs)
        for c in {id(control): control, id(self.trainer.control): self.trainer.control}.values():
            c.should_log, c.should_evaluate, c.should_save = flags

    def _throughput(self) -> dict[str, float]:
        """tokens/s over the steps since the last log (and MFU when the peak was measured)."""
        times = self.timer.times[self.logged_times:]
        self.logged_times = len(self.timer.times)
        tps = self.timer.tokens_per_step * len(times) / sum(times) if times else self.timer.tokens_per_second
        logs = {"tokens_per_s": tps}
        if self.peak_flops:
            logs["mfu"] = utilization(tps, self.flops_per_token, self.peak_flops)
        return logs

    @staticmethod
    def _peak_memory(world_size: int) -> dict[str, float]:
        """Every rank's peak memory (a collective: all ranks log at the same steps)."""
        mem = cuda_memory().get("cuda_max_allocated") or peak_rss_bytes()
        rank = dist.dist_info().rank
        peaks = dist.all_reduce_sum(torch.tensor([mem if r == rank else 0 for r in range(world_size)],
                                                 dtype=torch.float64))
        return {f"peak_memory_gib_rank{r}": m / 2**30 for r, m in enumerate(peaks.tolist())}

    def _data_wait(self) -> dict[str, float]:
        logs = {}
        if self.intervals and self.waits:
            logs["data_wait_share"] = min(1.0, sum(self.waits[-len(self.intervals):]) / sum(self.intervals))
        self.waits, self.intervals = self.waits[-1:], []
        return logs

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
        if not (main and active(self.report_to)):
            return
        logs = {k: float(v) for k, v in metrics.items() if v is not None}
        for cb in integrations:
            cb.on_log(args, state, control, logs=logs)
            if isinstance(cb, integration_utils.TensorBoardCallback):
                cb.on_train_end(args, state, control)  # flush and close the event file
        if self.mlflow_run is not None:
            import mlflow

            mlflow.end_run()
        if "wandb" in self.report_to:
            import wandb

            if wandb.run is not None:
                wandb.finish()
