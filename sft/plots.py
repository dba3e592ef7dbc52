"""``output_dir/training.png``: one picture of a run, drawn from the Trainer's log history.

Four panels against the optimizer step: loss (train and eval), learning rate, tokens/s, and peak memory per rank
(the numbers :mod:`sft.trainer.tracking` logs at every logging step). The caption names the machine and the run.
"""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

from sft.io import atomic_file

PANELS = ("loss", "learning rate", "throughput", "peak memory")


def machine_caption() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{socket.gethostname()}: {cpu}, {os.cpu_count()} CPUs{gpu}; torch {torch.__version__}"


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float)) and "step" in h]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def training_figure(history: list[dict], title: str, caption: str | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    (a_loss, a_lr), (a_tps, a_mem) = axes
    for key, label, style in (("loss", "train", "-"), ("eval_loss", "eval", "o--")):
        x, y = _series(history, key)
        if x:
            a_loss.plot(x, y, style, label=label)
    a_loss.set(title="loss", ylabel="cross-entropy (nats / token)")
    a_loss.legend(fontsize=8)
    x, y = _series(history, "learning_rate")
    a_lr.plot(x, y, color="#9467bd")
    a_lr.set(title="learning rate", ylabel="learning rate")
    a_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    x, y = _series(history, "tokens_per_s")
    a_tps.plot(x, y, marker=".", color="#2ca02c")
    a_tps.set(title="throughput", ylabel="tokens/s (all ranks)", xlabel="optimizer step")
    ranks = sorted({k for h in history for k in h if k.startswith("peak_memory_gib_rank")},
                   key=lambda k: int(k.rsplit("rank", 1)[1]))
    for k in ranks:
        x, y = _series(history, k)
        a_mem.plot(x, y, marker=".", label=k.replace("peak_memory_gib_", ""))
    a_mem.set(title="peak memory", ylabel="GiB (peak RSS, or CUDA max allocated)", xlabel="optimizer step")
    if ranks:
        a_mem.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.005, caption if caption is not None else machine_caption(), ha="center", fontsize=8,
             color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def save_training_plot(history: list[dict], path: Path, title: str) -> Path:
    """Draw and write the PNG atomically (temporary file + rename)."""
    import matplotlib.pyplot as plt

    fig = training_figure(history, title)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path
