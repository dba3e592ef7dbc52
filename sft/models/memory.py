"""Activation memory and selective checkpointing (``model.gradient_checkpointing: auto``)."""

from __future__ import annotations

import logging

import torch

from sft.ops.capabilities import supports

log = logging.getLogger(__name__)


def layer_activation_bytes(config, tokens: int, dtype: str, quant_mode: str = "none", fused_norm: bool = False,
                           fused_mlp: bool = False, lean_attention: bool = False) -> int:
    """Estimated activation memory autograd keeps for ONE decoder layer over ``tokens`` tokens (no checkpointing).

    Per token, calibrated from peak RSS of `sft bench` cells with and without checkpointing (8 x 512 tokens,
    fp32, sdpa, LoRA on q/v, this machine): SmolLM2-135M (Llama-style, gated MLP) keeps ~9.2k floats per token
    and layer, i.e. ~10 hidden + ~2.5 intermediate sized tensors; OPT-125m (ReLU MLP) ~8.9k, ~6 hidden + ~1.5
    intermediate. 4 bytes per element in fp32. Under bf16 autocast 3.5: measured 3.36 (SmolLM2, 0.123 GiB per
    layer) and 3.16 (OPT-125m, 0.111 GiB), as (no-ckpt - all-ckpt peak RSS) / layers, bf16-mixed, 8 x 512 tokens,
    2-core AMX Xeon, 2026-12-03 (bf16 activations, but fp32 norm outputs and their saved inputs); rounded up so
    that the estimate never undercounts. (2.5, the figure before that measurement, kept 16 of SmolLM2's 30 layers
    and peaked at 1.2x the seed recipe's RSS.) With the fused RMSNorm (``fused_norm``: no saved fp32 copies, bf16
    norm outputs) and the bool LoRA-dropout masks, SmolLM2's layer keeps 0.066 GiB: (4.07 - 2.09 GiB) / 30 layers,
    same method, tcmalloc, commit cbeb1db; 1.81 bytes per float, rounded up to 2.0. The fused SwiGLU product
    (``fused_mlp``) keeps one intermediate-sized tensor less (silu(gate) is recomputed): counted by
    tests/test_mlp.py with autograd's saved-tensor hooks. Where bf16 attention is computed in fp32 and keeps bf16
    (``lean_attention``: CPUs without AMX, :class:`sft.ops.attention._CausalFlashFp32Lean`), SmolLM2's layer keeps
    0.051 GiB: (3.29 - 1.76 GiB) / 30 layers, no-ckpt - all-ckpt peak RSS, bf16-mixed, tcmalloc, 2-core AMD EPYC
    (avx512_bf16, no AMX), 2026-12-07; 1.66 bytes per float, rounded up to 1.75."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
    inter = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden
    gated = supports("gated_mlp", getattr(config, "model_type", ""))
    floats = 10 * hidden + (1.5 if fused_mlp else 2.5) * inter if gated else 6 * hidden + 1.5 * inter
    if dtype == "fp32" and quant_mode == "none":
        per_elem = 4.0
    else:
        per_elem = (1.75 if lean_attention else 2.0) if fused_norm and gated else 3.5
    return int(tokens * floats * per_elem)


#: What the plain loss path holds at its peak beyond the chunked loss, in fp32 logits (tokens x vocab x 4 bytes).
#: Measured as the peak-RSS difference of the model's own loss and the chunked loss, both with every layer
#: recomputed (`sft bench`, OPT-125m, 8 x 512 tokens, LoRA r16 q/v, 2-core AMD EPYC, 2026-12-06): fp32 3.71 vs
#: 1.58 GiB, i.e. 2.78 x the 0.82 GB of fp32 logits (logits, log-softmax and their gradients); bf16-mixed 3.95
#: vs 1.32 GiB, 3.43 x (bf16 logits, their fp32 upcast, log-softmax, gradients). Used rounded down, so that the
#: budget never exceeds what the plain path really held. bf16 keeps the older 2.0 where a layer keeps fp32 or
#: expanded attention inputs: there the seed recipe's own RSS binds first (SmolLM2 with the fused RMSNorm has 1.70
#: GiB of headroom under the seed, 25 layers at most, and 2.75 would keep 28; see
#: tests/test_checkpointing_plan.py). With the lean fp32 attention (CPUs without AMX) the layers are light enough
#: that it does not: all 30 SmolLM2 layers kept peak at 3.29 GiB against the seed's 4.07 (2-core EPYC,
#: 2026-12-07), so the measured factor applies there, rounded down as for fp32.
PLAIN_LOSS_LOGITS = {"fp32": 2.75}
PLAIN_LOSS_LOGITS_DEFAULT = 2.0
PLAIN_LOSS_LOGITS_LEAN = 2.75


def logits_bytes(config, tokens: int, dtype: str = "fp32", lean_attention: bool = False) -> int:
    """What the plain loss path adds to the memory peak (end of forward, start of backward): its full logits,
    log-softmax and their gradients, a measured multiple (:data:`PLAIN_LOSS_LOGITS`) of ``tokens x vocab x 4``
    bytes."""
    factor = PLAIN_LOSS_LOGITS.get(dtype, PLAIN_LOSS_LOGITS_LEAN if lean_attention else PLAIN_LOSS_LOGITS_DEFAULT)
    return int(factor * tokens * getattr(config, "vocab_size", 0) * 4)


def available_memory_bytes() -> int:
    """Memory this process may plan with: free GPU memory on its device, else this rank's share of the host's
    MemAvailable (/proc/meminfo divided by the ranks on this node, which all plan at the same time); 0 if unknown."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    from sft.distributed import dist_info

    local_ranks = max(1, dist_info().local_world_size)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // local_ranks
    except OSError:
        pass
    return 0


def choose_checkpointing(config, tokens_per_micro_batch: int, dtype: str, quant_mode: str = "none",
                         chunked_loss: bool = True, available: int | None = None, fraction: float = 0.25,
                         fused_norm: bool = False, fused_mlp: bool = False, live_memory: bool | None = None,
                         lean_attention: bool = False) -> int:
    """``gradient_checkpointing: auto``: how many decoder layers keep their activations (the rest recompute them).

    The budget is the memory the chunked loss saves against the plain loss path (its full fp32 logits), capped at
    ``fraction`` of the memory available: the default path then needs no more memory than the plain path with
    full checkpointing, and spends what it saved on skipping recomputation (one forward pass of each layer kept,
    ~1/4 of that layer's training compute). Without the chunked loss nothing is saved: every layer recomputes.
    Unknown available memory: every layer recomputes.

    The estimates count live tensors, which is what the process's peak RSS follows on jemalloc, tcmalloc and on
    glibc malloc with a fixed mmap threshold (sft fixes it: :func:`sft.allocator.tune_system_malloc`). On an
    allocator that keeps freed activations resident (glibc with its dynamic threshold: +1.0 GiB on SmolLM2 8 x 512
    with 24 of 30 layers kept, 1.13x the seed recipe's RSS), nothing is kept: ``live_memory`` (default: asked of
    :func:`sft.allocator.plans_with_live_memory`) False makes every layer recompute."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    # lean_attention (CPUs without AMX, bf16): measured on the fused-norm Llama layer only; elsewhere unchanged
    lean = lean_attention and quant_mode == "none" and fused_norm
    per_layer = max(1, layer_activation_bytes(config, tokens_per_micro_batch, dtype, quant_mode, fused_norm,
                                              fused_mlp, lean))
    avail = available_memory_bytes() if available is None else available
    saved = logits_bytes(config, tokens_per_micro_batch, dtype, lean) if chunked_loss else 0
    budget = min(saved, int(fraction * avail))
    if live_memory is None and not torch.cuda.is_available():
        from sft.allocator import plans_with_live_memory

        live_memory = plans_with_live_memory()
    if live_memory is False and budget > 0:
        log.warning("gradient_checkpointing auto: this process's allocator keeps freed memory resident (glibc "
                    "malloc with its dynamic mmap threshold), so every layer recomputes; run on tcmalloc or "
                    "jemalloc (training.allocator) or fix the threshold (MALLOC_MMAP_THRESHOLD_=1048576)")
        budget = 0
    keep = max(0, min(layers, budget // per_layer))
    log.info("gradient_checkpointing auto: %d of %d layers keep activations (~%.2f GiB each; budget %.2f GiB)",
             keep, layers, per_layer / 2**30, budget / 2**30)
    wanted = min(layers, saved // per_layer)  # what the saved memory alone would keep
    if avail > 0 and keep < wanted:
        log.warning("gradient_checkpointing auto: only %.2f GiB of memory is available, so %d layers keep their "
                    "activations instead of %d (the budget is capped at %.0f%% of it); free memory (or set "
                    "model.gradient_checkpointing explicitly) for a faster, reproducible step",
                    avail / 2**30, keep, wanted, fraction * 100)
    return int(keep)


def apply_checkpointing(model, keep_layers: int | None) -> int:
    """After ``activation_checkpointing_enable``: let the first ``keep_layers`` checkpointed layers keep their
    activations (selective checkpointing; transformers checks each layer's ``gradient_checkpointing`` flag).
    Returns the number of layers that still recompute."""
    from sft.patches.transformers import keep_activations

    return keep_activations(model, keep_layers)
