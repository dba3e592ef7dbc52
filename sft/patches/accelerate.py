"""sft's changes to accelerate's objects: FSDP2 on CPU ranks (``AcceleratorState.__init__`` wrapped)."""

from __future__ import annotations

import importlib
import inspect

from sft.patches.registry import need, need_attr, need_params, register
from sft.patches.registry import applied as _ran

FSDP_ON_CPU = "accelerate.AcceleratorState.__init__"

_INIT_PARAMS = ("self", "mixed_precision", "cpu", "dynamo_plugin", "deepspeed_plugin", "fsdp_plugin")


def enable_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP plugin run on CPU ranks (FSDP2 only; torch's FSDP2 ``fully_shard`` works on a CPU
    device mesh over gloo).

    accelerate 1.15 keeps the FSDP plugin only for GPU-like distributed types: on CPU the state is MULTI_CPU, the
    plugin is dropped without a word and the Trainer wraps the model in plain DDP. This wraps
    ``AcceleratorState.__init__`` so that a MULTI_CPU state given an FSDP plugin becomes an FSDP state with that
    plugin (and its mixed precision), as it would be on GPUs. It changes nothing on GPUs (never MULTI_CPU) and
    nothing without an FSDP plugin. FSDP1 stays impossible on CPU (torch: "FSDP needs a non-CPU accelerator
    device"), which is why the shipped config is FSDP2. A later version that supports this itself makes the
    wrapper a no-op."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    _ran(FSDP_ON_CPU)
    if getattr(AcceleratorState.__init__, "_sft_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    def __init__(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None, fsdp_plugin=None,
                 *args, **kwargs):
        original(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if str(getattr(fsdp_plugin, "fsdp_version", 1)) != "2":
                raise RuntimeError("FSDP on CPU needs fsdp_version: 2 in the accelerate config (torch's FSDP1 "
                                   "refuses CPU devices)")
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._sft_fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__


def _check() -> None:
    state = importlib.import_module("accelerate.state")
    cls = need_attr(state, "AcceleratorState", FSDP_ON_CPU)
    init = getattr(cls.__init__, "__wrapped__", None) or cls.__init__
    if getattr(cls.__init__, "_sft_fsdp_on_cpu", False):  # already wrapped in this process: check the original
        init = inspect.getclosurevars(cls.__init__).nonlocals.get("original", init)
    need_params(init, _INIT_PARAMS, FSDP_ON_CPU)
    need(isinstance(getattr(need_attr(state, "PartialState", FSDP_ON_CPU), "_shared_state", None), dict),
         FSDP_ON_CPU, "PartialState._shared_state is no longer a dict")
    utils = importlib.import_module("accelerate.utils")
    dt = need_attr(utils, "DistributedType", FSDP_ON_CPU)
    need(hasattr(dt, "MULTI_CPU") and hasattr(dt, "FSDP"), FSDP_ON_CPU, "DistributedType.MULTI_CPU / FSDP are gone")
    plugin = need_attr(utils, "FullyShardedDataParallelPlugin", FSDP_ON_CPU)
    need_attr(plugin, "set_mixed_precision", FSDP_ON_CPU)


register(
    FSDP_ON_CPU, "accelerate", "accelerate.state.AcceleratorState.__init__ (class method, wrapped), "
    "PartialState._shared_state['distributed_type']", "wrapped-method",
    what="a MULTI_CPU state given an FSDP plugin becomes an FSDP state with that plugin and its mixed precision",
    why="accelerate drops the FSDP plugin on CPU without a word and the Trainer trains plain DDP; sft proves FSDP2 "
        "on CPU ranks in CI",
    alternative="none in accelerate (no CPU FSDP distributed type); kept, applied only under an FSDP launch on CPU",
    where=__name__, check=_check)
