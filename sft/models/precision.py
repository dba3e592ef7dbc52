"""The dtype policy (``model.dtype``): what ``auto`` means on this machine, and how a model's parameters are cast."""

from __future__ import annotations

import torch

from sft.errors import ConfigError
from sft.ops.capabilities import cpu_flags


def to_torch_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "uint8": torch.uint8}[name]


def apply_dtype_policy(model: torch.nn.Module, policy: str) -> None:
    """bf16-mixed (the seed's recipe): bf16 weights but fp32 1-D parameters (norms, biases), used under
    autocast so that fp32 norm outputs are cast back to bf16 before the next matmul.
    bf16: everything bf16. fp32: everything fp32. Parameters partitioned by ZeRO-3 are left alone: DeepSpeed
    owns their dtype (its bf16 section) and their storage."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return
    if policy == "fp32":
        model.float()
    elif policy in ("bf16", "bf16-mixed"):
        # parameters only: buffers such as RoPE's inv_freq stay fp32 (model.to() would round them, and the
        # merged model, loaded fresh, would then use other frequencies than training did)
        for p in model.parameters():
            p.data = p.data.to(torch.float32 if policy == "bf16-mixed" and p.ndim == 1 else torch.bfloat16)
    else:
        raise ConfigError(f"model.dtype: unknown policy {policy!r}")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: where bf16 matmuls beat fp32 on CPU. Without them (e.g. AVX2-only cores) oneDNN
    emulates bf16 and autocast is 3-4x SLOWER than fp32 (measured on a 2-core EPYC: see benchmarks/studies/demo_tuning.py)."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def resolve_dtype_policy(policy: str) -> str:
    """``auto`` -> bf16-mixed on CUDA or on CPUs with fast bf16, fp32 elsewhere; other policies unchanged."""
    if policy != "auto":
        return policy
    if torch.cuda.is_available():
        # bf16 needs Ampere or newer (V100 and T4 emulate it, several times slower than fp32)
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if cpu_has_fast_bf16():
        return "bf16-mixed"
    return "fp32"


def uses_bf16(model_dtype: str, quant_mode: str = "none", compute_dtype: str = "bf16") -> bool:
    """Whether a run computes in bf16 (autocast / DeepSpeed bf16): the bf16-mixed policy, or a 4-bit base
    dequantized to bf16."""
    return model_dtype == "bf16-mixed" or (quant_mode == "nf4" and compute_dtype == "bf16")
