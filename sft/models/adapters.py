"""LoRA with PEFT: the adapter config, wrapping the base (with the k-bit preparation QLoRA needs), and parameter
counts."""

from __future__ import annotations

from typing import Any

import torch

from sft.config import LoraSection
from sft.distributed import sharded_launch
from sft.errors import ConfigError


def lora_config(cfg: LoraSection):
    from peft import LoraConfig

    targets: Any = cfg.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias=cfg.bias, target_modules=targets,
        task_type="CAUSAL_LM",
    )


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on every decoder layer. transformers >= 5.2x names it
    ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` deprecated); 5.17 (the GPU image's) has
    only ``gradient_checkpointing_enable``, with the same effect."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def add_lora(model, cfg: LoraSection, gradient_checkpointing: bool, quantized: bool = False):
    """Wrap the base in a PEFT LoRA model; only adapter weights train."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized and sharded_launch():
        # ZeRO-3 / FSDP shard every parameter as one dtype: prepare_model_for_kbit_training's fp32 upcast of the
        # norms and embeddings beside bf16-stored 4-bit weights breaks FSDP1 flattening and only costs memory
        # under FSDP2 (its mixed precision casts them back); TRL skips it for sharded QLoRA too
        if gradient_checkpointing:
            enable_checkpointing(model)
            model.enable_input_require_grads()
    elif quantized:
        # casts the non-quantized layers (norms, head) to fp32 and sets up input grads for checkpointing
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    try:
        peft_model = get_peft_model(model, lora_config(cfg))
    except ValueError as e:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"lora.target_modules: {e}. Linear layers in this model: {', '.join(names)}") from e
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total). 4-bit weights are packed two per byte: count their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # a ZeRO-3 partitioned parameter is empty locally
        if p.__class__.__name__ == "Params4bit":
            n = n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
