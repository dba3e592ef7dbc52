"""sft's own Trainer callback: step timing for tokens/s (sft.metrics.StepTimer), the phase the watchdog reports,
the loss history, and the per-step fault-injection points (sft.faults)."""

from __future__ import annotations

from transformers import TrainerCallback

from sft import dist, faults
from sft.metrics import StepTimer


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
        if faults.desync_at(rank, state.global_step):
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, **kw):
        self.timer.interrupted()

    def on_save(self, args, state, control, **kw):
        self.timer.interrupted()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
