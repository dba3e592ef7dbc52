"""The SwiGLU product of Llama-family MLPs as one fused CPU kernel (``model.fused_mlp``), by torch.compile.

transformers' ``LlamaMLP.forward`` is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. Eagerly, the product
``silu(g) * u`` is two passes over (tokens x intermediate) tensors forward and three backward (the product's two
gradients, then silu's), and autograd keeps three intermediate-sized tensors per layer: ``g`` (for silu's
backward), ``silu(g)`` and ``u`` (for the product's). Here the product is one compiled function per direction:
the forward reads ``g`` and ``u`` once and writes the product; the backward recomputes ``silu(g)`` from the
saved ``g`` (inductor's partitioner keeps the inputs and recomputes the pointwise op), so ``silu(g)`` is never
stored. The projections are untouched (LoRA on gate/up/down keeps working).

Numerics: fp32 inputs give the eager values up to fp32 rounding; bf16 inputs (under autocast) are computed in fp32
inside the kernel and rounded once, where eager rounds ``silu(g)`` to bf16 before the product.

Measured: see ``layer_activation_bytes`` (sft/models/memory.py) for what a layer keeps, and the ``eager-mlp``
variant of ``sft bench`` for the step time. Installed by ``sft.patches.transformers.install_fused_mlp`` (an
instance-level ``forward``) on modules whose ``forward`` has the source of
``LlamaMLP.forward`` and whose activation is SiLU, on CPU and with autograd on; everything else (other devices,
evaluation, generation) runs the module's own forward. A machine where compilation fails falls back to that with
one warning.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from sft.ops.capabilities import CompileFailed, has_forward_of, run_compiled

log = logging.getLogger(__name__)

_state = {"broken": False, "runs": 0}  # runs: compiled-kernel forwards (the canary reads it)


def _silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return (F.silu(g.float()) * u.float()).to(g.dtype)


@functools.cache
def _compiled():
    return torch.compile(_silu_mul, dynamic=None, fullgraph=True)


def is_llama_mlp(cls: type) -> bool:
    """Whether ``cls.forward`` is transformers' Llama MLP forward, character for character."""
    return has_forward_of(cls, "transformers.models.llama.modeling_llama", "LlamaMLP")


def swiglu_mlp(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a Llama-style SiLU MLP ``module``, the product through the compiled kernel on CPU."""
    if x.device.type != "cpu" or _state["broken"] or not torch.is_grad_enabled():
        return type(module).forward(module, x)
    g, u = module.gate_proj(x), module.up_proj(x)
    if not torch.compiler.is_compiling():
        _state["runs"] += 1
    try:
        with torch.autocast("cpu", enabled=False):
            h = run_compiled(_compiled(), g, u)
    except CompileFailed as e:  # any compiler failure: keep training on the eager forward
        _state["broken"] = True
        log.warning("model.fused_mlp: torch.compile failed (%s); using transformers' MLP from now on. "
                    "Install a C++ compiler (apt-get install g++) for the fused kernel, or set "
                    "model.fused_mlp=false to silence this.", e)
        h = module.act_fn(g) * u
    return module.down_proj(h)


def _is_silu(act) -> bool:
    try:
        from transformers.activations import SiLUActivation
    except ImportError:  # pragma: no cover - older transformers
        SiLUActivation = torch.nn.SiLU
    return type(act) in (torch.nn.SiLU, SiLUActivation)


def applies_to(m: torch.nn.Module) -> bool:
    """Whether :func:`swiglu_mlp` can be ``m``'s forward: a Llama-style MLP with a SiLU activation."""
    return is_llama_mlp(type(m)) and _is_silu(getattr(m, "act_fn", None)) \
        and all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj"))


def runs() -> int:
    """How many training forwards ran the compiled kernel in this process (sft/patches canaries)."""
    return _state["runs"]
