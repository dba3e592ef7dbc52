"""Causal-LM loss without the full logits: lm_head + cross-entropy in chunks of tokens, on labelled rows only.

The model's own loss computes ``logits = lm_head(hidden)`` for every position (batch x seq x vocab, cast to fp32:
8 x 512 x 50272 x 4 bytes = 0.8 GB for OPT-125m, plus log-softmax and its gradient, ~3 GB at the peak) and then
discards the rows whose label is -100. Here:

* only rows with a label are projected (answer-only training skips the prompt tokens' share of the lm_head GEMMs);
* rows are processed ``chunk`` at a time, so at most ``chunk x vocab`` fp32 logits exist at once;
* the gradient with respect to the hidden states (and the lm_head weight, if it trains) is computed in the same
  pass, ``(softmax - onehot) @ W``, so the backward pass neither stores nor recomputes logits.

The FLOPs are those of the plain path (one forward GEMM and one or two gradient GEMMs per chunk); what changes is
memory, and with it what else fits (e.g. no activation checkpointing). Liger-Kernel has the same idea for CUDA
(Triton); it does not run on CPU, hence this ~100-line version in plain torch, which runs on both.

Semantics follow transformers' ``ForCausalLMLoss``: labels are shifted inside (position t predicts label t+1),
-100 is ignored, and with ``num_items_in_batch`` the summed loss is divided by it (gradient accumulation across
micro-batches and ranks), otherwise by the number of labelled tokens.

Installed as the model's forward (with labels) by ``sft.patches.transformers.install_chunked_loss``.
"""

from __future__ import annotations

from typing import Any

import torch

from sft.ops.capabilities import supports

IGNORE_INDEX = -100

_state = {"runs": 0}  # losses computed by chunked_causal_lm_loss (the canary reads it)


def default_chunk(vocab: int, itemsize: int = 2, budget_bytes: int = 256 * 2**20) -> int:
    """Rows per lm_head GEMM: 768 in bf16, 1024 in fp32, fewer where one chunk of logits in the compute dtype
    would pass ``budget`` (a very large vocabulary), a multiple of 64 and at least 64.

    The two lm_head GEMMs of a chunk, (rows x d) @ (d x vocab) and (rows x vocab) @ (vocab x d), reach the
    machine's peak only with enough rows, and run worst at odd counts. Measured at OPT-125m's shapes (d 768,
    vocab 50272), 2-core AMD EPYC, torch 2.13, both GEMMs per 4096 rows: bf16 (AVX512-BF16) 1.61 / 1.86 / 1.64 /
    1.61 / 1.62 s at 256 / 333 / 512 / 768 / 1024 rows; fp32 (held to AVX2) 3.98 / 3.82 / 3.56 / 3.38 / 3.29 s.
    The earlier fixed 32 MiB budget gave 333 rows in both dtypes."""
    rows = 1024 if itemsize >= 4 else 768
    rows = min(rows, budget_bytes // (itemsize * max(1, vocab)))
    return max(64, rows // 64 * 64)


ROW_BLOCK = 16  # rows of fp32 softmax work at a time: 16 x 50k x 4 B = 3 MB, stays in cache across its passes


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits of one chunk and their per-row log-sum-exp (the no-grad path)."""
    logits = h.to(compute_dtype) @ weight.to(compute_dtype).t()
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    logits = logits.float()
    return logits, torch.logsumexp(logits, dim=-1)


def _softmax_grad_rows(logits: torch.Tensor, y: torch.Tensor, scale: float, buf: torch.Tensor) -> torch.Tensor:
    """Over ``logits`` (rows x vocab, compute dtype), in place: the summed cross-entropy of the rows (fp32, returned)
    and ``scale * (softmax - onehot)`` written back into ``logits``, the gradient the next GEMM reads.

    The logits are the GEMM's output in the compute dtype (under bf16 they are bf16-rounded exactly as the plain
    path's autocast lm_head output is); max, exp, sum and log-sum-exp are fp32, ``ROW_BLOCK`` rows at a time in a
    reused fp32 buffer ``buf``, so no fp32 copy of the chunk's logits exists and every pass over a block hits the
    cache (the one-shot version, ``logits.float()`` + ``logsumexp`` + ``exp``, spent as long as the GEMMs)."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for r in range(0, logits.shape[0], ROW_BLOCK):
        rows_out = logits[r:r + ROW_BLOCK]
        k = rows_out.shape[0]
        b = buf[:k] if buf.dtype != logits.dtype else rows_out  # fp32 compute: work on the logits themselves
        if b is not rows_out:
            b.copy_(rows_out)
        yr = y[r:r + k]
        idx = torch.arange(k, device=logits.device)
        target = b[idx, yr].clone()
        m = b.amax(1, keepdim=True)
        b.sub_(m).exp_()
        ssum = b.sum(1, keepdim=True)
        total += (m.squeeze(1) + ssum.log().squeeze(1) - target).sum()
        b.mul_(scale / ssum)
        b[idx, yr] -= scale
        if b is not rows_out:
            rows_out.copy_(b)
    return total


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, chunk, compute_dtype, need_w):
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_w and bias is not None else None
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        vocab = weight.shape[0]
        # one logits buffer (chunk x vocab, compute dtype) and one fp32 row block, reused by every chunk: no
        # allocation (and no page faults on fresh pages) per chunk
        logits_buf = torch.empty((min(chunk, n), vocab), dtype=compute_dtype, device=hidden.device)
        row_buf = torch.empty((ROW_BLOCK, vocab), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk].to(compute_dtype)
            logits = logits_buf[:h.shape[0]]
            if b is None:
                torch.mm(h, w.t(), out=logits)
            else:
                torch.addmm(b, h, w.t(), out=logits)
            total += _softmax_grad_rows(logits, targets[s:s + chunk], scale, row_buf)
            grad_h[s:s + chunk] = (logits @ w).to(hidden.dtype)  # logits now hold scale * (softmax - onehot)
            if grad_w is not None:
                grad_w.addmm_(logits.t().float(), h.float())
                if grad_b is not None:
                    grad_b += logits.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, None if bias is None else bias.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        gb = None if grad_b is None else (grad_b * grad_out).to(ctx.bias_dtype)
        return gh, gw, gb, None, None, None, None, None


# Not traced by torch.compile (training.torch_compile): which rows carry a label is data (a boolean index) and the
# loop over chunks runs its own GEMMs, so a traced version guarded on the labelled-row count and recompiled for
# nearly every batch (measured, `sft bench` OPT-125m 8 x 512 with training.torch_compile=true, 2-core AMD EPYC: one
# recompile per step at 4061-4067 labelled rows, the second step still compiling after 10 minutes).
@torch.compiler.disable
def chunked_causal_lm_loss(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor,
                           num_items_in_batch: Any = None, chunk: int | None = None) -> torch.Tensor:
    """The causal-LM loss of ``head(hidden)`` against ``labels`` (batch x seq), never building all logits.

    Equal to ``ForCausalLMLoss(head(hidden), labels, vocab, num_items_in_batch)`` up to fp32 summation order."""
    _state["runs"] += 1
    weight, bias = head.weight, head.bias
    shift = labels[:, 1:].reshape(-1)
    keep = shift != IGNORE_INDEX
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    y = shift[keep].to(hidden.device)
    if num_items_in_batch is None:
        denom = float(y.numel())
    else:
        denom = float(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    scale = 1.0 / max(denom, 1.0)
    if y.numel() == 0:
        return hidden.sum() * 0.0  # keeps the graph connected (DDP) when a micro-batch has no labelled token
    compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else weight.dtype
    chunk = chunk or default_chunk(weight.shape[0], compute_dtype.itemsize)
    need_w = weight.requires_grad or (bias is not None and bias.requires_grad)
    return _loss(h, weight, bias, y, scale, chunk, compute_dtype, need_w)


def _loss(h, weight, bias, y, scale, chunk, compute_dtype, need_w) -> torch.Tensor:
    if not torch.is_grad_enabled() or not (h.requires_grad or need_w):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                logits, lse = _chunk_loss(h[s:s + chunk], weight, bias, compute_dtype)
                total += (lse - logits.gather(1, y[s:s + chunk, None]).squeeze(1)).sum()
        return total * scale
    with torch.autocast(h.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(h, weight, bias, y, scale, chunk, compute_dtype, need_w)


def runs() -> int:
    """How many losses the chunked path computed in this process (sft/patches canaries)."""
    return _state["runs"]
