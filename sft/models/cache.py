"""On-disk copies in sft's cache (``$SFT_CACHE``, default ~/.cache/sft), each made once: random-init
architectures as safetensors (what 4-bit, ZeRO-3 and multi-rank 16-bit loads read) and dense copies of GGUF files."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sft.distributed import zero3_init
from sft.io import atomic_dir
from sft.models.architectures import build_random


def cache_dir() -> Path:
    return Path(os.environ.get("SFT_CACHE", Path.home() / ".cache" / "sft"))


def _save_once(out: Path, save) -> Path:
    """Run ``save(tmp_dir)`` and rename it to the cache entry ``out``; a crash leaves no half-written entry, and an
    entry another process wrote meanwhile is kept."""
    with atomic_dir(out, replace=False) as tmp:
        save(tmp)
    return out


def materialize_arch(arch: str, seed: int, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save a random-init architecture as safetensors in the cache (once per arch, seed and dtype).

    The weights equal the in-memory path's (``build_random(arch, seed)`` in fp32, then cast): transformers runs
    its initialisers in fp32 and casts, so building directly in bf16 gives the same bits at half the memory
    (tests/test_qlora.py checks it). bf16 is what QLoRA quantizes and what the bf16 policies train against;
    fp32 (``dtype=torch.float32``, cache entry ``...-fp32``) is what the fp32 policy trains against."""
    suffix = "" if dtype == torch.bfloat16 else "-" + str(dtype).replace("torch.", "").replace("float", "fp")
    out = cache_dir() / "arch" / f"{arch}-seed{seed}{suffix}"
    if (out / "config.json").exists():
        return out
    if zero3_init():
        raise RuntimeError(f"materialize_arch({arch!r}) under a live ZeRO-3 config would save a partitioned model; "
                           "call it before TrainingArguments are created (sft.recipe does)")
    model = build_random(arch, seed, dtype=dtype)
    return _save_once(out, lambda tmp: model.save_pretrained(tmp, max_shard_size="2GB"))


def dense_copy_of_gguf(folder: str, file: str) -> Path:
    """GGUF -> a dense fp32 safetensors copy in the cache, made once.

    transformers dequantizes GGUF tensors on every load (~6 s for 135M, minutes for 7B) and marks the result
    as a quantized model, which forbids dtype casts and confuses PEFT although the layers are plain dense
    ``nn.Linear``. Loading the dense copy is ~1 s and gives an ordinary model."""
    from sft.models.pretrained import load_pretrained

    key = Path(file).stem + "-" + str(os.path.getsize(os.path.join(folder, file)))
    out = cache_dir() / "gguf" / key
    if (out / "config.json").exists():
        return out
    model = load_pretrained(folder, gguf_file=file, dtype=torch.float32)
    from sft.patches.transformers import forget_quantization

    forget_quantization(model)
    return _save_once(out, lambda tmp: model.save_pretrained(tmp, safe_serialization=True))
