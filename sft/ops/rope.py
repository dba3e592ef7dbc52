"""The rotary position embedding of Llama-family attention as one fused CPU kernel (``model.fused_rope``), by
torch.compile.

transformers' ``apply_rotary_pos_emb`` computes ``q * cos + rotate_half(q) * sin`` and the same for ``k``, where
``rotate_half`` cuts the head dimension in halves, negates the second and concatenates them the other way round.
Eagerly that is five passes over each of q and k forward (two products, the negation, the concatenation, the sum);
backward, the two products' gradients, and each half-slice's gradient written into a zeroed tensor of the whole
input and then added. Here each direction is one compiled kernel over q and k: the forward reads q, k, cos and sin
once and writes the rotated q and k; the backward reads the two gradients once. Nothing is saved but cos and sin
(the eager products keep them too).

Numerics: computed in fp32 and rounded once to the dtype the eager expression returns (``q``'s and ``cos``'s
promoted dtype); eager bf16 rounds each product and the sum, so the two differ by bf16 rounding (tests compare both
to fp32).

Measured: fwd + bwd of one SmolLM2 layer's q and k, (8, 9, 512, 64) and (8, 3, 512, 64) bf16, 2-core AMD EPYC with
AVX512-BF16, torch 2.13 (``python -m benchmarks.studies.rope``, median of 21): transformers' function 5.0-5.5 ms, this 3.4 ms; Llama-3.2-1B's
(32 and 8 heads of 64, 8 x 512) 19-23 ms -> 9.2-10.8 ms. A SmolLM2 step of 8 x 512 tokens runs 30 layers: ~0.06 s of
a ~9 s step (the ``eager-rope`` row of ``sft bench --matrix llama`` measures it in the step).

Installed by ``sft.patches.transformers.install_fused_rope``: the modeling module's ``apply_rotary_pos_emb`` is
swapped for :func:`fused` of it, in every transformers modeling module whose function computes Llama's
(:func:`is_llama_rope`: Llama, and the models that copy it); it takes the kernel on CPU tensors with autograd on and the default
``unsqueeze_dim``, and calls the original otherwise (other devices, evaluation, generation). A machine where
compilation fails falls back to the original with one warning.
"""

from __future__ import annotations

import functools
import logging

import torch

from sft.ops.capabilities import CompileFailed, run_compiled

log = logging.getLogger(__name__)

_state = {"broken": False, "runs": 0}  # runs: compiled-kernel forwards (the canary reads it)

def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in fp32, written per half (x1, x2 -> x1 c1 - x2 s1, x2 c2 + x1 s2): inductor
    then reads each half once instead of building the rotated copy (fwd of SmolLM2's q and k 2.0 -> 1.5 ms)."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos[..., :half] - x2 * sin[..., :half], x2 * cos[..., half:] + x1 * sin[..., half:]), -1)


def _rope(q, k, cos, sin, q_dtype: torch.dtype, k_dtype: torch.dtype):
    cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    return _rotate(q, cos, sin).to(q_dtype), _rotate(k, cos, sin).to(k_dtype)


@functools.cache
def _compiled():
    return torch.compile(_rope, dynamic=None, fullgraph=True)


def _reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]


def is_llama_rope(fn) -> bool:
    """Whether ``fn(q, k, cos, sin)`` is Llama's ``apply_rotary_pos_emb``: checked by what it computes (fp64, random
    inputs, grouped heads), not by its source, since transformers may hand it out wrapped (with the ``kernels``
    package installed it is a Hub-kernel ``nn.Module``). A model whose rotary embedding differs (partial rotary
    dimensions, interleaved pairs) computes something else and keeps its own."""
    if not callable(fn) or hasattr(fn, "_sft_original"):
        return False
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 2, 5, 8, generator=g,
                                                                                 dtype=torch.float64)
    cos, sin = torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 5, 8, generator=g,
                                                                                  dtype=torch.float64)
    try:
        with torch.no_grad():
            got = fn(q, k, cos, sin)
        return len(got) == 2 and all(torch.allclose(a, _reference(x, cos, sin), rtol=1e-12, atol=1e-12)
                                     for a, x in zip(got, (q, k)))
    except Exception:  # a different signature or shape contract: not Llama's
        return False


def fused(original):
    """``original`` (a Llama-style ``apply_rotary_pos_emb``) with the compiled kernel on CPU while training."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (_state["broken"] or unsqueeze_dim != 1 or q.device.type != "cpu" or not torch.is_grad_enabled()
                or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape or q.shape[-1] % 2):
            # no-grad forwards (evaluation, generation) gain little and would compile again for every new shape
            return original(q, k, cos, sin, unsqueeze_dim)
        if not torch.compiler.is_compiling():
            _state["runs"] += 1
        q_dtype, k_dtype = torch.promote_types(q.dtype, cos.dtype), torch.promote_types(k.dtype, cos.dtype)
        try:
            with torch.autocast("cpu", enabled=False):
                return run_compiled(_compiled(), q, k, cos, sin, q_dtype, k_dtype)
        except CompileFailed as e:  # any compiler failure: keep training on the eager function
            _state["broken"] = True
            log.warning("model.fused_rope: torch.compile failed (%s); using transformers' rotary embedding from now "
                        "on. Install a C++ compiler (apt-get install g++) for the fused kernel, or set "
                        "model.fused_rope=false to silence this.", e)
            return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb._sft_original = original
    return apply_rotary_pos_emb


def runs() -> int:
    """How many training forwards ran the compiled kernel in this process (sft/patches canaries)."""
    return _state["runs"]
