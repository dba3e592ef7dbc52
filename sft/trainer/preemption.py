"""Stopping on a scheduler's signal with a complete checkpoint: preemption, ``scancel``, ``scontrol requeue`` and
the early warning a job asks for (``#SBATCH --signal=USR1@300``).

Slurm (like Kubernetes) ends a job with SIGTERM and, ``KillWait`` seconds later (30 s by default), SIGKILL. The
handler installed by :func:`install` only records the signal. :class:`StopOnSignal` checks at every optimizer-step
boundary whether any rank received one (one all-reduce of a flag, so that all ranks stop at the same step even when
the signal reached one node only), and then asks the Trainer to save ``checkpoint-N`` (written atomically, see
sft.trainer.checkpoint_format) and stop. The run then raises :class:`sft.errors.Preempted`; ``sft train`` prints where
the checkpoint is and exits with :data:`sft.errors.EXIT_PREEMPTED` (75). Rerun with ``training.resume=auto`` (the
Slurm templates add it to a requeued job by themselves) and the run continues from that step, ending with the
adapter of an uninterrupted run.

The checkpoint has to fit in the grace window: the rest of the step in progress plus the write (the job log gives
both, ``checkpoint-N written in X s``). A signal that arrives after the last step (during the merge) is ignored.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from transformers import TrainerCallback

from sft import distributed as dist

#: SIGTERM: scancel, preemption, ``scontrol requeue``, ``docker stop``, Kubernetes; SIGUSR1: the early warning.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[tuple[str, float]] = []  # (signal name, time.monotonic()) in the order received
_previous: dict[int, object] = {}  # the handlers install() replaced


def install() -> bool:
    """Record STOP_SIGNALS instead of dying (main thread only; returns False where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _received.clear()
    for sig in STOP_SIGNALS:
        prev = signal.signal(sig, _record)
        _previous.setdefault(sig, prev)
    return True


def uninstall() -> None:
    """Put back the handlers :func:`install` replaced (``sft.train()`` called from a longer-lived program)."""
    if threading.current_thread() is threading.main_thread():
        for sig, prev in list(_previous.items()):
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
            del _previous[sig]


def _record(signum, frame) -> None:
    _received.append((signal.Signals(signum).name, time.monotonic()))
    if len(_received) == 1:
        rank = dist.dist_info().rank
        print(f"rank {rank}: received {signal.Signals(signum).name}: saving a checkpoint at the end of this step, "
              "then stopping", file=sys.stderr, flush=True)


def received() -> str | None:
    """The first stop signal this process received, or None."""
    return _received[0][0] if _received else None


class StopOnSignal(TrainerCallback):
    """At each step end: if any rank received a stop signal, save this step's checkpoint and stop training."""

    def __init__(self):
        self.stopped_at: int | None = None
        self.decided = self.saved = None  # time.monotonic() of the decision and of the finished checkpoint

    def on_step_end(self, args, state, control, **kw):
        if self.stopped_at is not None:
            return
        if dist.all_reduce_max_flag(bool(_received)):  # every rank calls it at every step: they agree
            self.stopped_at, self.decided = state.global_step, time.monotonic()
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kw):
        if self.stopped_at is not None and self.saved is None:
            self.saved = time.monotonic()

    def report(self) -> dict:
        """What happened, for the message and summary: step, signal, checkpoint write time, signal-to-saved time."""
        sig, t_sig = _received[0] if _received else (None, None)
        out = {"step": self.stopped_at, "signal": sig, "checkpoint_seconds": None, "signal_to_saved_seconds": None}
        if self.saved is not None:
            out["checkpoint_seconds"] = self.saved - self.decided
            if t_sig is not None:
                out["signal_to_saved_seconds"] = self.saved - t_sig
        return out
