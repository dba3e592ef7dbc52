"""sft's changes to PEFT's objects: the fused LoRA linear (instance ``forward`` of ``lora.Linear``) and the cheaper
LoRA dropout (modules swapped into ``lora_dropout``)."""

from __future__ import annotations

import importlib

import torch

from sft.patches.registry import need, need_attr, need_params, register, route_forward
from sft.patches.registry import applied as _ran

FUSED_LORA = "peft.lora_linear_forward"
FAST_DROPOUT = "peft.lora_dropout_modules"


def install_fused_lora(model: torch.nn.Module) -> int:
    """Route every PEFT ``lora.Linear`` of ``model`` through :func:`sft.ops.lora.fused_forward` (an instance-level
    ``forward``; the class, the adapter weights and what is saved are unchanged). Returns how many were routed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from sft.ops.lora import fused_forward

    return route_forward(model, lambda m: type(m) is LoraLinear, fused_forward, FUSED_LORA)


def install_fast_dropout(model: torch.nn.Module) -> int:
    """Replace every LoRA input dropout (PEFT's ``lora_dropout`` ModuleDicts) of ``model`` with
    :class:`sft.ops.dropout.FastDropout` of the same probability. Returns how many were replaced; the frozen base's
    own dropout is left alone."""
    from sft.ops.dropout import FastDropout

    n = 0
    for m in model.modules():
        drops = getattr(m, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, d in list(drops.items()):
            if type(d) is torch.nn.Dropout and d.p > 0:
                drops[name] = FastDropout(d.p)
                drops[name].train(d.training)
                n += 1
    if n:
        _ran(FAST_DROPOUT)
    return n


def _lora_linear():
    from peft import LoraConfig, get_peft_model

    class Proj(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.q_proj(x)

    return get_peft_model(Proj(), LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj"])).base_model.model.q_proj


def _check_fused_lora() -> None:
    layer = importlib.import_module("peft.tuners.lora.layer")
    cls = need_attr(layer, "Linear", FUSED_LORA)
    need_params(cls.forward, ("self", "x"), FUSED_LORA)
    lin = _lora_linear()
    need(type(lin) is cls, FUSED_LORA, f"get_peft_model wraps an nn.Linear in {type(lin).__qualname__}, not "
         "peft.tuners.lora.layer.Linear")
    for attr in ("disable_adapters", "merged", "active_adapters", "lora_A", "lora_B", "lora_dropout", "scaling",
                 "base_layer", "use_dora", "lora_bias"):
        need(hasattr(lin, attr), FUSED_LORA, f"lora.Linear has no {attr} (read by sft.ops.lora._plain_adapter)")


def _check_fast_dropout() -> None:
    lin = _lora_linear()
    drops = getattr(lin, "lora_dropout", None)
    need(isinstance(drops, torch.nn.ModuleDict) and "default" in drops and type(drops["default"]) is torch.nn.Dropout, FAST_DROPOUT,
         f"lora.Linear.lora_dropout is {type(drops).__name__} of {[type(d).__name__ for d in (drops or {}).values()]}, "
         "not a ModuleDict of nn.Dropout")


register(
    FUSED_LORA, "peft", "peft.tuners.lora.layer.Linear instances: forward", "instance-forward",
    what="each lora.Linear's instance `forward` becomes sft.ops.lora.fused_forward (base GEMM + adapter as one "
         "autograd function on CPU for the plain case; PEFT's forward otherwise)",
    why="lora.fused: no fp32 copies of the activation, no full-size scaling/add passes (sft/ops/lora.py)",
    alternative="PEFT's custom-module registration (LoraConfig._register_custom_module; 'experimental', a private "
                "method, documented for layer types PEFT does not support, and nn.Linear is one it does) would build "
                "an sft subclass of lora.Linear instead; not switched: the layer class changes, which PEFT's "
                "merge/unload and sft's checks (type(m) is lora.Linear) see; kept",
    where=__name__, check=_check_fused_lora, runs=lambda: importlib.import_module("sft.ops.lora").runs())

register(
    FAST_DROPOUT, "peft", "peft lora.Linear.lora_dropout ModuleDict entries", "module-swap",
    what="each nn.Dropout with p > 0 becomes sft.ops.dropout.FastDropout (an nn.Dropout subclass) of the same p",
    why="lora.fast_dropout: four mask elements per 64-bit draw instead of bernoulli_ per element (1.09 s of a "
        "7.3 s SmolLM2 step)",
    alternative="none: LoraConfig takes only a dropout probability; kept",
    where=__name__, check=_check_fast_dropout, runs=lambda: importlib.import_module("sft.ops.dropout").runs())
