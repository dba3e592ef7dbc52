"""oneCCL on CPU. Backend ``ccl`` needs ``oneccl_bindings_for_pytorch`` (it registers the process-group backend).

Backend ``ds-ccl`` (EXPERIMENTAL, only when requested: ``SFT_BACKEND=ds-ccl``, set by ``sft launch --backend
ds-ccl``): DeepSpeed ZeRO-2 with its all-reduce on oneCCL through DeepSpeed's ``deepspeed_ccl_comm`` op. torch >= 2.9
has no "ccl" process group (``deepspeed.init_distributed(dist_backend="ccl")`` alone fails with ``AssertionError:
Unknown backend type ccl``), so the process group is created as gloo first, then DeepSpeed's CPU accelerator's
(private) ``_communication_backend_name`` is set to "ccl" and ``deepspeed.init_distributed(dist_backend="ccl")``
builds ``deepspeed.comm.ccl.CCLBackend`` on that group (all_reduce / broadcast / barrier on oneCCL, every other
collective on gloo). It does NOT set ACCELERATE_USE_CPU (that makes accelerate ignore the DeepSpeed config and run
plain DDP). See benchmarks/results/cpu_collectives.md.
"""

from __future__ import annotations

import datetime
import os

from sft.distributed.ranks import DistInfo


_ds_ccl_active = False  # set once the DeepSpeed CCLBackend workaround is in place (reported by run_metadata)


def ccl_importable() -> bool:
    try:
        import oneccl_bindings_for_pytorch  # noqa: F401  (registers the "ccl" backend)
    except Exception:  # ImportError, or an OSError / undefined symbol from a binding built for another torch
        return False
    return True


def deepspeed_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        return False


def init_deepspeed_ccl(info: DistInfo, timeout: datetime.timedelta) -> None:
    """Force DeepSpeed's CCLBackend (oneCCL through its deepspeed_ccl_comm op) onto the gloo group just created.

    The workaround of benchmarks/results/cpu_collectives.md: DeepSpeed's CPU accelerator reports "ccl" only when
    oneccl_bindings_for_pytorch imports (it cannot on torch >= 2.9), and CCLBackend skips its own
    init_process_group("ccl") when a group exists.
    """
    global _ds_ccl_active
    # oneCCL under torchrun/accelerate: no Hydra/PMI, so it needs its local rank/size; LOCAL_SIZE for DeepSpeed's shm op
    os.environ.setdefault("CCL_PROCESS_LAUNCHER", "none")
    os.environ.setdefault("CCL_LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("CCL_LOCAL_SIZE", str(info.local_world_size))
    os.environ.setdefault("LOCAL_SIZE", str(info.local_world_size))
    if os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
        raise RuntimeError(f"backend ds-ccl needs DS_ACCELERATOR=cpu, got {os.environ['DS_ACCELERATOR']!r}")
    os.environ["DS_ACCELERATOR"] = "cpu"
    if not os.environ.get("CCL_ROOT"):
        raise RuntimeError("backend ds-ccl needs CCL_ROOT (the oneCCL 2021.17.2 prefix); plan it with "
                           "`sft launch --backend ds-ccl`, which sets it with CPATH and LD_LIBRARY_PATH")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as e:
        raise RuntimeError(f"backend ds-ccl needs deepspeed: pip install 'deepspeed>=0.16' ({e})") from e
    from sft.patches.deepspeed import select_ccl

    select_ccl(get_accelerator())  # a private attribute: the only way to select CCLBackend without the binding
    try:
        deepspeed.init_distributed(dist_backend="ccl", timeout=timeout)
    except Exception as e:
        raise RuntimeError(
            f"backend ds-ccl: deepspeed.init_distributed(dist_backend='ccl') failed: {type(e).__name__}: {e}. "
            "The deepspeed_ccl_comm op needs CPATH=$CCL_ROOT/include at build time and LD_LIBRARY_PATH=$CCL_ROOT/lib "
            "at process start, g++ and ninja; see benchmarks/results/cpu_collectives.md"
        ) from e
    from deepspeed import comm as ds_comm

    cdb = type(getattr(ds_comm.comm, "cdb", None)).__name__
    if cdb != "CCLBackend":
        raise RuntimeError(f"backend ds-ccl: DeepSpeed's communication backend is {cdb}, not CCLBackend")
    _ds_ccl_active = True
