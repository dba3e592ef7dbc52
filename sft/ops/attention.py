"""Per-document causal attention for packed blocks ("varlen" attention for SDPA on CPU).

A packed block holds several documents; their per-document ``position_ids`` restart at 0. transformers turns
that into a block-diagonal mask for SDPA, and with an explicit mask PyTorch's CPU flash kernel computes every
(query block, key block) pair of the full L x L square: twice the causal work, and far more than the documents
need (sum of len^2 instead of L^2). Here the block is cut into its documents and each runs through
``F.scaled_dot_product_attention(is_causal=True)`` on its own, which is exactly the block-diagonal causal
attention, without a mask and without the masked work. The same boundaries also isolate documents for models
whose mask ignores position ids (OPT).

Documents are short (the bench's are 40-260 tokens, ~30 per 8 x 512 micro-batch), so one call per document is
mostly per-call overhead: ~30 flash forwards and ~30 backwards of a dozen small ops each, per layer. With
``model.attention_bucket`` (default 32) each document is padded to a multiple of that many tokens and all documents
of one padded length go through one batched causal call (:func:`_bucketed`), which is still exact.

Used on packed blocks: while training (module.training), and in sft's evaluation, which runs its forwards
inside :func:`packed_blocks`; always with position ids and no KV cache. Everything else (generation with padding
and a cache) goes to transformers' own SDPA path with its mask. It runs on CPU and CUDA alike; on CUDA,
FlashAttention-2's varlen kernel (``model.attn_implementation=flash_attention_2``, with the flash-attn package)
does the same in one kernel.
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
    benchmarks.attention`): SmolLM2 shapes 66.7 -> 40.8 ms, OPT shapes 86.6 -> 47.8 ms. Gradient error against
    fp64 on 30 such documents: 2.5-2.9e-3 vs the kernel's 2.9-4.0e-3 (bf16 rounding). For fp32 inputs it gained
    nothing (34 vs 36 ms for those 30 documents), so only bf16 comes here."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        """(N, H, L, D) inputs, any strides; (N, H, L, D) output."""
        out, lse = _flash_cpu(q, k, v, 0.0, True, scale=scale)
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
        p = torch.matmul(q.float(), k.float().transpose(-2, -1)).mul_(scale).sub_(lse[..., None]).exp_().tril_()
        dv = torch.matmul(p.to(q.dtype).transpose(-2, -1), grad)
        delta = (grad.float() * out.float()).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        ds = torch.matmul(grad.float(), v.float().transpose(-2, -1)).sub_(delta).mul_(p).mul_(scale).to(q.dtype)
        return torch.matmul(ds, k), torch.matmul(ds.transpose(-2, -1), q), dv, None


#: set on a model's attention modules by :func:`use_math_backward` (``model.fast_attention_backward``)
MATH_BACKWARD_ATTR = "_sft_attention_math_backward"


def use_math_backward(model: torch.nn.Module) -> int:
    """Route ``model``'s per-document bf16 CPU attention through :class:`_CausalFlashMathBackward`; returns how
    many attention modules were marked."""
    n = 0
    for m in model.modules():
        if hasattr(m, "is_causal") and type(m).__name__.endswith("Attention"):
            setattr(m, MATH_BACKWARD_ATTR, True)
            n += 1
    return n


def _attend(q, k, v, dropout: float, scaling, math_backward: bool):
    """Causal attention of a batch of documents of one length, (N, H, len, D) -> (N, H, len, D)."""
    if math_backward and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _CausalFlashMathBackward.apply(q, k, v, q.shape[-1] ** -0.5 if scaling is None else float(scaling))
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)


#: set on a model's attention modules by :func:`use_buckets` (``model.attention_bucket``)
BUCKET_ATTR = "_sft_attention_bucket"

#: fp32 bytes of one batched call's (documents x heads x len x len) score matrix, at most (the GEMM backward's
#: working set); a bucket with more documents is split into several calls
SCORES_BUDGET = 64 * 2**20


def use_buckets(model: torch.nn.Module, bucket: int) -> int:
    """Set ``model``'s per-document attention to pad documents to multiples of ``bucket`` tokens and attend each
    padded length in one batched call (0: one call per document); returns how many modules were set."""
    n = 0
    for m in model.modules():
        if hasattr(m, "is_causal") and type(m).__name__.endswith("Attention"):
            setattr(m, BUCKET_ATTR, int(bucket))
            n += 1
    return n


def _per_document(query, key, value, spans, dropout, scaling, math):
    """One attention call per document: (B, H, L, D) -> (B, L, H, D)."""
    # unbind/split, not slicing: a slice's backward writes its gradient into a zero tensor of the whole input,
    # and autograd then adds those up, O(documents x block) per layer; split's backward is one concatenation.
    # Measured on OPT-125m 8 x 512 (bf16, 2-core EPYC): SliceBackward + its fill_/add_ took ~1.7 s of a 10.4 s step.
    rows = []
    for qb, kb, vb, row in zip(query.unbind(0), key.unbind(0), value.unbind(0), spans):
        sizes = [e - s for s, e in row]
        parts = [_attend(q[None], k[None], v[None], dropout, scaling, math)[0].transpose(0, 1)  # (len, H, D)
                 for q, k, v in zip(qb.split(sizes, dim=1), kb.split(sizes, dim=1), vb.split(sizes, dim=1))]
        rows.append(torch.cat(parts, dim=0) if len(parts) > 1 else parts[0].contiguous())
    return torch.stack(rows, dim=0)


def _bucketed(query, key, value, spans, dropout, scaling, math, bucket: int):
    """Documents padded to multiples of ``bucket`` tokens, one batched causal call per padded length:
    (B, H, L, D) -> (B, L, H, D).

    A document of n tokens is gathered into P = ceil(n / bucket) * bucket rows, the last token repeated into the
    padding. Under the causal mask a real query (position < n) never sees a padded key, so its output is exact; the
    padded queries' outputs are never gathered back, so their gradient is zero, and so are the gradients they would
    send to the padded keys and values (a padded key is seen by padded queries only). The padding costs
    (P^2 - n^2) of work per document; the batching saves the per-call overhead that dominates short documents."""
    B, H, L, D = query.shape
    dev = query.device
    tok = lambda t: t.transpose(1, 2).reshape(B * L, H, t.shape[-1])  # noqa: E731 - (B*L, H, D), token-major
    qt, kt, vt = tok(query), tok(key), tok(value)
    groups: dict[int, list[tuple[int, int]]] = {}
    for b, row in enumerate(spans):
        for s, e in row:
            groups.setdefault(min(L, -(-(e - s) // bucket) * bucket), []).append((b * L + s, e - s))
    inv = torch.empty(B * L, dtype=torch.long)
    outs, offset = [], 0
    for P in sorted(groups):
        docs = groups[P]
        per = max(1, SCORES_BUDGET // (4 * H * P * P))
        for c in range(0, len(docs), per):
            chunk = docs[c:c + per]
            nd = len(chunk)
            starts = torch.tensor([d[0] for d in chunk])[:, None]
            lens = torch.tensor([d[1] for d in chunk])[:, None]
            j = torch.arange(P)[None]
            idx = starts + torch.minimum(j, lens - 1)  # (nd, P) token rows, the last one repeated
            real = j < lens
            inv[idx[real]] = offset + (torch.arange(nd)[:, None] * P + j)[real]
            flat = idx.flatten().to(dev)
            qb, kb, vb = (t.index_select(0, flat).view(nd, P, H, -1).transpose(1, 2) for t in (qt, kt, vt))
            out = _attend(qb, kb, vb, dropout, scaling, math)  # (nd, H, P, Dv)
            outs.append(out.transpose(1, 2).reshape(nd * P, H, out.shape[-1]))
            offset += nd * P
    padded = torch.cat(outs) if len(outs) > 1 else outs[0]
    return padded.index_select(0, inv.to(dev)).view(B, L, H, -1)


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
    if query.shape[1] != key.shape[1]:
        # grouped-query attention: expand k/v to the query heads (SDPA's enable_gqa leaves the CPU flash kernel)
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    out_dtype = query.dtype
    if query.device.type == "cpu" and upcast_on_cpu(query.dtype):
        query, key, value = query.float(), key.float(), value.float()
    math = (getattr(module, MATH_BACKWARD_ATTR, False) and query.device.type == "cpu"
            and query.dtype == torch.bfloat16 and dropout == 0.0)
    spans, bucket = document_spans(pos), getattr(module, BUCKET_ATTR, 0)
    if bucket > 0:
        out = _bucketed(query, key, value, spans, dropout, scaling, math, bucket)
    else:
        out = _per_document(query, key, value, spans, dropout, scaling, math)
    return out.to(out_dtype), None  # (B, L, H, D), contiguous


def register() -> str:
    """Make ``attn_implementation="sft_varlen"`` known to transformers (attention function and mask builder: the
    SDPA mask, used by the fallback path). Idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, varlen_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
