"""Which experiment trackers ``training.report_to`` may name, and the packages they need: checked when a config
loads, so that a misspelt or uninstalled tracker stops the run before anything starts (sft.trainer.tracking points
the integrations at the run's log directory)."""

from __future__ import annotations

import importlib.util

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
