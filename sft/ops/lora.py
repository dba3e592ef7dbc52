"""A LoRA linear as one autograd function on CPU (``lora.fused``): ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ``.

PEFT's ``lora.Linear`` under bf16-mixed runs, per adapted projection and per micro-batch: the base GEMM; a cast of the
bf16 input to the fp32 adapter dtype (``_cast_input_dtype``: a 4-byte copy of the whole activation); the dropout on
that fp32 copy; autocast's cast of the dropped copy back to bf16; the two small GEMMs; ``* scaling`` and ``+ result``
over the whole output. Its backward mirrors every one of those passes (fp32 dropout backward, two casts, the
scaling product, and the add of the LoRA path's input gradient to the base's). The adapter's work is rank ``r`` (16)
against the base's thousands of columns; the full-size elementwise passes around it cost more than its GEMMs.

Here, in the compute dtype (bf16 under autocast):

* forward: ``y = x Wᵀ (+ b)``; ``xd = x`` with the dropped elements zeroed (the mask of :func:`sft.ops.dropout.keep_mask`,
  the same draws as ``lora.fast_dropout``'s; with ``lora.fast_dropout=false`` PEFT's path keeps its nn.Dropout); ``u = xd (k·A)ᵀ`` with the dropout's ``1/(1-p)`` folded into the
  r x in matrix ``A``; ``y += u (s·B)ᵀ`` accumulated into ``y`` by the GEMM itself (``addmm_``);
* backward: ``gx = gy W`` (skipped when the input needs no gradient); ``gu = gy (s·B)``; ``gB = s · gyᵀ u`` and
  ``gA = k · guᵀ xd`` (fp32 gradients for the fp32 masters); ``gx += mask ⊙ (gu (k·A))``, or one ``addmm_`` without
  dropout;
* saved: ``xd`` (compute dtype), the bool drop mask and the r-column ``u``; no fp32 copy of anything full-size. The frozen
  base weight gets no gradient.

Numerically this is PEFT's computation under autocast up to where the scalar factors are applied (to the small
matrices instead of the activations: a different bf16 rounding of the same products). Used on CPU while autograd is
on, for the plain case: a ``torch.nn.Linear`` base (not 4-bit, not under ZeRO-3 / FSDP, which own the base
weight's storage), one active vanilla adapter (no DoRA or other variant), not merged, adapters enabled; anything else
runs PEFT's own forward. Installed on PEFT's ``lora.Linear`` instances by ``sft.patches.peft.install_fused_lora``. Unsloth's ``fast_lora`` publishes the same idea as Triton kernels for CUDA.
"""

from __future__ import annotations

import torch

from sft.ops.dropout import LANES, FastDropout, drop_mask


_state = {"runs": 0}  # forwards through _LoraLinear (the canary reads it)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float, p: float, compute_dtype: torch.dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(compute_dtype)
        w = weight.to(compute_dtype)
        if bias is None:
            y = x2 @ w.t()
        else:
            y = torch.addmm(bias.to(compute_dtype), x2, w.t())
        drop, dscale = None, 1.0
        if p > 0.0:
            drop, dscale = drop_mask(x2.shape, p)
            xd = x2.masked_fill(drop, 0)
        else:
            xd = x2
        ad = (a * dscale).to(compute_dtype) if dscale != 1.0 else a.to(compute_dtype)
        bs = (b * scaling).to(compute_dtype)
        u = xd @ ad.t()
        y.addmm_(u, bs.t())
        ctx.save_for_backward(weight, a, b, xd, u, drop)
        ctx.scaling, ctx.dscale, ctx.compute_dtype, ctx.x_dtype = scaling, dscale, compute_dtype, x.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        weight, a, b, xd, u, drop = ctx.saved_tensors
        cd, s, k = ctx.compute_dtype, ctx.scaling, ctx.dscale
        shape = gy.shape
        gy2 = gy.reshape(-1, shape[-1]).to(cd)
        bs = (b * s).to(cd)
        ad = (a * k).to(cd) if k != 1.0 else a.to(cd)
        gu = gy2 @ bs  # (N, r)
        ga = gb = gx = None
        if ctx.needs_input_grad[3]:
            ga = (gu.t() @ xd).to(a.dtype)
            if k != 1.0:
                ga.mul_(k)
        if ctx.needs_input_grad[4]:
            gb = (gy2.t() @ u).to(b.dtype).mul_(s)
        if ctx.needs_input_grad[0]:
            gx = gy2 @ weight.to(cd)
            if drop is None:
                gx.addmm_(gu, ad)
            else:
                gx += (gu @ ad).masked_fill_(drop, 0)
            gx = gx.view(*shape[:-1], gx.shape[-1]).to(ctx.x_dtype)
        return gx, None, None, ga, gb, None, None, None


def _plain_adapter(module) -> str | None:
    """The one adapter name :func:`fused_forward` can compute for ``module``, or None (PEFT's forward runs)."""
    if module.disable_adapters or module.merged:
        return None
    active = [n for n in module.active_adapters if n in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        return None
    if getattr(module, "lora_bias", {}).get(name, False):
        return None
    base = module.base_layer
    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return None
    if base.bias is not None and base.bias.requires_grad:  # lora.bias=all trains it: PEFT's path does that
        return None
    return name


# Not traced by torch.compile: the dropout mask's 64-bit draws are a graph break inside the autograd function (dynamo
# then gives up on the whole function and recompiles around it); the function is already one hand-written op.
@torch.compiler.disable
def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``lora.Linear.forward`` through :class:`_LoraLinear` where it applies (see the module docstring)."""
    name = None
    if x.device.type == "cpu" and torch.is_grad_enabled() and not args and not kwargs:
        name = _plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    drop = self.lora_dropout[name]
    if isinstance(drop, FastDropout):  # the same mask draws as lora.fast_dropout's
        p = float(drop.p) if drop.training else 0.0
    elif isinstance(drop, torch.nn.Identity):  # PEFT's dropout 0
        p = 0.0
    else:  # nn.Dropout (lora.fast_dropout=false): its bernoulli masks are PEFT's to draw
        return type(self).forward(self, x)
    if p >= 1.0 or (p > 0.0 and round(p * LANES) == 0):
        return type(self).forward(self, x)
    compute_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    base = self.base_layer
    _state["runs"] += 1
    with torch.autocast("cpu", enabled=False):
        return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                 float(self.scaling[name]), p, compute_dtype)


def runs() -> int:
    """How many LoRA forwards ran the fused function in this process (sft/patches canaries)."""
    return _state["runs"]
