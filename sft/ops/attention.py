"""Per-document causal attention for packed blocks ("varlen" attention for SDPA on CPU).

A packed block holds several documents; their per-document ``position_ids`` restart at 0. transformers turns
that into a block-diagonal mask for SDPA, and with an explicit mask PyTorch's CPU flash kernel computes every
(query block, key block) pair of the full L x L square: twice the causal work, and far more than the documents
need (sum of len^2 instead of L^2). Here the block is cut into its documents and each runs through
``F.scaled_dot_product_attention(is_causal=True)`` on its own, which is exactly the block-diagonal causal
attention, without a mask and without the masked work. The same boundaries also isolate documents for models
whose mask ignores position ids (OPT).

Used on packed blocks: while training (module.training), and in sft's evaluation, which runs its forwards
inside :func:`packed_blocks`; always with position ids and no KV cache. Everything else (generation with padding
and a cache) goes to transformers' own SDPA path with its mask. It runs on CPU and CUDA alike; on CUDA,
FlashAttention-2's varlen kernel (``model.attn_implementation=flash_attention_2``, with the flash-attn package)
does the same in one kernel. Registered with transformers (``attn_implementation="sft_varlen"``) by
``sft.patches.transformers.register_attention``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch
import torch.nn.functional as F

from sft.ops.capabilities import cpu_flags

NAME = "sft_varlen"


_packed = contextvars.ContextVar("sft_packed_blocks", default=False)

#: ``SFT_ATTENTION_FP32``: ``1`` computes bf16 attention on CPU in fp32, ``0`` keeps bf16; unset = ``auto``.
UPCAST_ENV = "SFT_ATTENTION_FP32"


def upcast_on_cpu(dtype: torch.dtype) -> bool:
    """Whether per-document attention on CPU runs in fp32 for bf16 inputs (cast in, cast back out).

    PyTorch's CPU flash kernel is slower in bf16 than in fp32 on a CPU without AMX. Measured fwd + bwd of one
    causal document, 12 heads x 64, 2-core AMD EPYC with AVX512-BF16 (torch 2.13): bf16 flash 0.92 / 3.86 / 8.48 /
    24.98 ms at 32 / 128 / 256 / 512 tokens, bf16 math 0.52 / 2.59 / 9.20 / 33.34, fp32 flash including both
    casts 0.33 / 1.96 / 6.86 / 23.12. With AMX the bf16 kernel's GEMMs run on the tiles, so ``auto`` keeps bf16
    there (not measured: set SFT_ATTENTION_FP32=1 or 0 to compare on such a machine)."""
    if dtype != torch.bfloat16:
        return False
    choice = os.environ.get(UPCAST_ENV, "auto").strip().lower()
    if choice in ("1", "true", "yes"):
        return True
    if choice in ("0", "false", "no"):
        return False
    return "amx_bf16" not in cpu_flags()


@contextlib.contextmanager
def packed_blocks():
    """Forwards inside this context (outside training, e.g. evaluation) are on packed blocks: isolate documents."""
    token = _packed.set(True)
    try:
        yield
    finally:
        _packed.reset(token)


def document_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per batch row, the [start, end) spans of its documents: a span starts where the position does not follow
    the previous one (a restart at 0, or any jump)."""
    pos = position_ids
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    L = pos.shape[1]
    spans = []
    for row in starts.cpu():
        idx = row.nonzero().flatten().tolist()
        spans.append(list(zip(idx, idx[1:] + [L])))
    return spans


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


class _CausalFlashMathBackward(torch.autograd.Function):
    """Causal attention of one document, (H, L, D) bf16 on CPU: PyTorch's flash kernel forward, and a backward of
    four whole-document GEMMs (two in bf16 on the AMX tiles, two in fp32) around fp32 softmax arithmetic,
    recomputing the probabilities from the forward's log-sum-exp as a flash backward does.

    Why hand-written: PyTorch's CPU flash backward ran ~1.5 ms per 150-token document (9 heads x 64; ~45 GFLOP/s,
    a few percent of the AMX peak) and took 1.35 s of a 6 s SmolLM2 step. Measured per-document attention fwd + bwd
    of one 8 x 512 layer of 40-260-token documents, bf16, 2-core AMX Xeon, torch 2.13 (`python -m
    benchmarks.studies.attention`): SmolLM2 shapes 66.7 -> 40.8 ms, OPT shapes 86.6 -> 47.8 ms. Gradient error against
    fp64 on 30 such documents: 2.5-2.9e-3 vs the kernel's 2.9-4.0e-3 (bf16 rounding). For fp32 inputs it gained
    nothing (34 vs 36 ms for those 30 documents), so only bf16 comes here."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        out, lse = _flash_cpu(q[None], k[None], v[None], 0.0, True, scale=scale)
        out, lse = out[0], lse[0]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        scale = ctx.scale
        grad = grad.contiguous()
        # S and dP in fp32 GEMMs: exp() of a bf16-rounded S is off by up to |S| * 2^-9 in the exponent, and dP
        # loses its low bits just before dP - delta cancels them; the other two GEMMs take bf16 operands.
        p = torch.matmul(q.float(), k.float().transpose(1, 2)).mul_(scale).sub_(lse[..., None]).exp_().tril_()
        dv = torch.matmul(p.to(q.dtype).transpose(1, 2), grad)
        delta = (grad.float() * out.float()).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        ds = torch.matmul(grad.float(), v.float().transpose(1, 2)).sub_(delta).mul_(p).mul_(scale).to(q.dtype)
        return torch.matmul(ds, k), torch.matmul(ds.transpose(1, 2), q), dv, None


class _CausalFlashFp32Lean(torch.autograd.Function):
    """Causal attention of one document, bf16 (H, L, D) query and (KV, L, D) key/value on CPU, computed in fp32
    by PyTorch's flash kernel (what ``upcast_on_cpu`` chooses without AMX), that keeps bf16 for its backward.

    Autograd through ``q.float()`` + SDPA keeps fp32 copies of q, k and v, with k and v expanded to the query
    heads, and the fp32 output: on SmolLM2's shapes (9 query, 3 kv heads) 38 MB a layer of 8 x 512 tokens. This
    keeps the bf16 inputs, unexpanded, and the bf16 output (12.6 MB) and casts them again in the backward, which
    then runs the same fp32 flash kernel; k and v's gradients are summed over their query heads. The output is the
    same bf16 rounding of the same fp32 result; the backward differs by the output's bf16 rounding in
    rowsum(dO * O) (gradient error against fp64 in tests/test_packed_attention.py)."""

    @staticmethod
    def _fp32_heads(k, v, rep: int):
        """k and v in fp32, expanded to the query heads (the CPU flash kernel takes no grouped heads)."""
        kf, vf = k.float(), v.float()
        return (kf.repeat_interleave(rep, 0), vf.repeat_interleave(rep, 0)) if rep > 1 else (kf, vf)

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        rep = q.shape[0] // k.shape[0]
        kf, vf = _CausalFlashFp32Lean._fp32_heads(k, v, rep)
        out, lse = _flash_cpu(q.float()[None], kf[None], vf[None], 0.0, True, scale=scale)
        out = out[0].to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.rep = scale, rep
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        rep = ctx.rep
        kf, vf = _CausalFlashFp32Lean._fp32_heads(k, v, rep)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.float()[None], q.float()[None], kf[None], vf[None], out.float()[None], lse, 0.0, True,
            scale=ctx.scale)
        dq, dk, dv = dq[0], dk[0], dv[0]
        if rep > 1:
            dk = dk.unflatten(0, (k.shape[0], rep)).sum(1)
            dv = dv.unflatten(0, (v.shape[0], rep)).sum(1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


#: set on a model's attention modules by ``sft.patches.transformers.use_math_backward``
#: (``model.fast_attention_backward``); read here
MATH_BACKWARD_ATTR = "_sft_attention_math_backward"

# runs: documents whose attention took the math backward (the canary reads it); lean: layer calls that kept bf16
# for an fp32 computation (:class:`_CausalFlashFp32Lean`)
_state = {"runs": 0, "lean": 0}


def lean_runs() -> int:
    """How many layer calls took :class:`_CausalFlashFp32Lean` (bf16 computed in fp32, bf16 kept) in this process."""
    return _state["lean"]


def runs() -> int:
    """How many documents' attention ran with :class:`_CausalFlashMathBackward` in this process (sft/patches canaries)."""
    return _state["runs"]


def _attend(q, k, v, dropout: float, scaling, math_backward: bool, lean: bool = False):
    """Causal attention of one document, (H, len, D) -> (H, len, D); with ``lean``, k and v keep their own (KV)
    heads."""
    scale = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    if lean:
        return _CausalFlashFp32Lean.apply(q, k, v, scale)
    if math_backward and (q.requires_grad or k.requires_grad or v.requires_grad):
        _state["runs"] += 1
        return _CausalFlashMathBackward.apply(q, k, v, scale)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=dropout, is_causal=True,
                                          scale=scaling)[0]


# Not traced by torch.compile: the document boundaries are data (read with .tolist()), so a traced version guards
# on every block's split sizes and recompiles for each new packing layout. Measured (`sft bench`, OPT-125m 8 x 512,
# training.torch_compile=true, AMX Xeon): 195-464 s steps, recompiling every step. Excluded from the graph, the
# attention runs eagerly and the code around it compiles once per layer shape.
@torch.compiler.disable
def varlen_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """transformers attention-interface function: (B, H, L, D) inputs, (B, L, H, D) output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = kwargs.get("position_ids")
    L = query.shape[2]
    if (pos is None or not (module.training or _packed.get()) or key.shape[2] != L or pos.shape[-1] != L
            or kwargs.get("output_attentions") or getattr(module, "is_causal", True) is False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if pos.dim() == 1:
        pos = pos[None]
    if pos.shape[0] != query.shape[0]:
        pos = pos.expand(query.shape[0], -1)
    out_dtype = query.dtype
    # bf16 computed in fp32 while training (no AMX): each document casts inside _CausalFlashFp32Lean, which keeps
    # the bf16 tensors (k/v with their own heads) for its backward instead of autograd's fp32 copies
    lean = (getattr(module, MATH_BACKWARD_ATTR, False) and query.device.type == "cpu" and upcast_on_cpu(query.dtype)
            and dropout == 0.0 and torch.is_grad_enabled()
            and (query.requires_grad or key.requires_grad or value.requires_grad)
            and query.shape[1] % key.shape[1] == 0)
    if lean:
        _state["lean"] += 1
    elif query.shape[1] != key.shape[1]:
        # grouped-query attention: expand k/v to the query heads (SDPA's enable_gqa leaves the CPU flash kernel)
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    # unbind/split, not slicing: a slice's backward writes its gradient into a zero tensor of the whole input,
    # and autograd then adds those up, O(documents x block) per layer; split's backward is one concatenation.
    # Measured on OPT-125m 8 x 512 (bf16, 2-core EPYC): SliceBackward + its fill_/add_ took ~1.7 s of a 10.4 s step.
    if not lean and query.device.type == "cpu" and upcast_on_cpu(query.dtype):
        query, key, value = query.float(), key.float(), value.float()
    math = (not lean and getattr(module, MATH_BACKWARD_ATTR, False) and query.device.type == "cpu"
            and query.dtype == torch.bfloat16 and dropout == 0.0)
    rows = []
    for qb, kb, vb, spans in zip(query.unbind(0), key.unbind(0), value.unbind(0), document_spans(pos)):
        sizes = [e - s for s, e in spans]
        parts = [_attend(q, k, v, dropout, scaling, math, lean).transpose(0, 1)  # (len, H, D)
                 for q, k, v in zip(qb.split(sizes, dim=1), kb.split(sizes, dim=1), vb.split(sizes, dim=1))]
        rows.append(torch.cat(parts, dim=0) if len(parts) > 1 else parts[0].contiguous())
    return torch.stack(rows, dim=0).to(out_dtype), None  # (B, L, H, D), contiguous

