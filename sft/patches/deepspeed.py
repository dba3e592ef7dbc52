"""sft's changes to DeepSpeed's objects: the experimental ``ds-ccl`` backend names oneCCL on DeepSpeed's CPU
accelerator (a private attribute)."""

from __future__ import annotations

import importlib

from sft.patches.registry import need, register
from sft.patches.registry import applied as _ran

CCL_BACKEND = "deepspeed.CPU_Accelerator._communication_backend_name"


def select_ccl(accelerator) -> None:
    """Make DeepSpeed's CPU accelerator report the "ccl" communication backend, so that
    ``deepspeed.init_distributed(dist_backend="ccl")`` builds its CCLBackend on the existing gloo group.

    DeepSpeed's CPU accelerator reports "ccl" only when oneccl_bindings_for_pytorch imports, which it cannot on
    torch >= 2.9 (benchmarks/results/cpu_collectives.md)."""
    if accelerator.device_name() != "cpu" or not hasattr(accelerator, "_communication_backend_name"):
        raise RuntimeError(
            f"backend ds-ccl: DeepSpeed's accelerator is {type(accelerator).__name__} ({accelerator.device_name()}), "
            "expected CPU_Accelerator with a _communication_backend_name attribute (verified with deepspeed 0.19.8)"
        )
    accelerator._communication_backend_name = "ccl"
    _ran(CCL_BACKEND)


def _check() -> None:
    try:
        mod = importlib.import_module("deepspeed.accelerator.cpu_accelerator")
    except ImportError as e:
        raise AssertionError(f"sft patch {CCL_BACKEND}: deepspeed's CPU accelerator does not import ({e})") from e
    cls = getattr(mod, "CPU_Accelerator", None)
    need(cls is not None, CCL_BACKEND, "deepspeed.accelerator.cpu_accelerator.CPU_Accelerator is gone")
    acc = cls()
    need(hasattr(acc, "_communication_backend_name"), CCL_BACKEND,
         "CPU_Accelerator instances no longer have _communication_backend_name")
    need(hasattr(acc, "communication_backend_name"), CCL_BACKEND,
         "CPU_Accelerator has no communication_backend_name() (what init_distributed reads)")


register(
    CCL_BACKEND, "deepspeed", "deepspeed CPU_Accelerator instance: _communication_backend_name (private)",
    "private-attribute",
    what="set to 'ccl' before deepspeed.init_distributed(dist_backend='ccl') (backend ds-ccl, experimental, only "
         "when requested)",
    why="selects DeepSpeed's CCLBackend (all-reduce on oneCCL) without oneccl_bindings_for_pytorch, which does "
        "not build for torch >= 2.9",
    alternative="oneccl_bindings_for_pytorch (the documented route) has no build for torch >= 2.9; kept",
    where=__name__, check=_check)
