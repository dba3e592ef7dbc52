"""Experiment trackers: sft's own numbers go where the user already looks (TensorBoard, MLflow, W&B).

transformers' integrations (``training.report_to``) already receive every ``Trainer.log()`` call; this module adds
what the Trainer does not know -- tokens/s, MFU, peak memory per rank, the share of step time spent waiting for
data, held-out accuracy and the merge check -- by logging them through that same ``log()``, as they happen.
Numbers that exist only after ``train()`` returned (accuracy after training, the merge check) are sent to the same
integration callbacks afterwards, and then the trackers are closed. The callback that does both is
:class:`sft.trainer.callbacks.TrackerMetrics`; :mod:`sft.config.trackers` checks ``report_to``; this module
points the integrations at the run's log directory.

Where logs land: ``output_dir/logs/<run>`` (TensorBoard event files, the W&B run folder); MLflow uses
``MLFLOW_TRACKING_URI`` when the user set one, else a file store in ``output_dir/logs/mlruns`` (MLflow 3 wants
``MLFLOW_ALLOW_FILE_STORE=true`` for it, which is then set) whose run is named ``<run>``. Nothing goes inside ``checkpoints/``.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

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
