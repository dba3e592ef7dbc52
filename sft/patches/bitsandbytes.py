"""sft's changes to bitsandbytes' objects: the NF4 weight layout is kept (no CPU repacking)."""

from __future__ import annotations

import importlib

import torch

from sft.patches.registry import need, need_attr, register
from sft.patches.registry import applied as _ran

KEEP_LAYOUT = "bitsandbytes.Linear4bit.support_avx512bf16_for_cpu"


def keep_4bit_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking NF4 weights for its AVX512-BF16 CPU kernel.

    On such CPUs an inference-mode forward (evaluation) rewrites ``weight.data`` of every Linear4bit into a CPU
    tile layout for good, and the training forwards after it run on that layout with other rounding: a run that
    evaluated at step 2 and one resumed from step 2 then train steps 3.. differently (measured: adapters 9e-3
    apart, tests/test_strategies.py), so resume is no longer exact. Under ZeRO-3 / FSDP the weight is a sharded
    bf16-stored tensor: the rewrite corrupts the shard and the first checkpoint fails with an AssertionError
    inside bitsandbytes' ``state_dict`` (AMD EPYC with avx512_bf16, bitsandbytes 0.50.2). Training keeps one
    layout; evaluation is slower on those CPUs for it. Returns how many layers were set."""
    n = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    if n:
        _ran(KEEP_LAYOUT)
    return n


def _check() -> None:
    nn = importlib.import_module("bitsandbytes.nn")
    cls = need_attr(nn, "Linear4bit", KEEP_LAYOUT)
    layer = cls(8, 8, bias=False, quant_type="nf4")
    need(hasattr(layer, "support_avx512bf16_for_cpu"), KEEP_LAYOUT, "Linear4bit instances no longer have "
         "support_avx512bf16_for_cpu: find how this version switches the CPU repacking off")


register(
    KEEP_LAYOUT, "bitsandbytes", "bitsandbytes.nn.Linear4bit instances: support_avx512bf16_for_cpu",
    "instance-attribute",
    what="set to False on every Linear4bit of a QLoRA model",
    why="an inference forward on an AVX512-BF16 CPU repacks the NF4 weights for good: training after evaluation "
        "then rounds differently (resume not exact) and a sharded bf16-stored weight is corrupted",
    alternative="none documented; kept",
    where=__name__, check=_check)
