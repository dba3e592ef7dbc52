"""Load a base model and prepare it for training: weights on disk for random architectures, the dtype policy,
4-bit, the attention implementation, base dropout, the chunked loss, checkpointing and LoRA."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from sft.config import LoraSection, ModelConfig, QuantizationConfig
from sft.errors import ModelError
from sft.models.adapters import add_lora
from sft.distributed import sharded_launch, zero3_init
from sft.models.architectures import build_random
from sft.models.cache import dense_copy_of_gguf, materialize_arch
from sft.models.memory import apply_checkpointing, choose_checkpointing
from sft.models.precision import apply_dtype_policy, resolve_dtype_policy, to_torch_dtype
from sft.models.quantization import bnb_config
from sft.models.sources import ModelSource, resolve_source
from sft.models.tokenizers import load_tokenizer
from sft.ops.capabilities import supports
from sft.patches import bitsandbytes as bnb_patches, peft as peft_patches, transformers as tf_patches
from sft.patches.transformers import set_base_dropout

log = logging.getLogger(__name__)


def resolve_attention(name: str, model_type: str | None = None) -> str:
    """``auto`` -> sft_varlen (per-document SDPA, :mod:`sft.ops.attention`) on CPU for every model type, and on CUDA
    for the model types whose own mask lets packed documents attend to each other (OPT); sdpa on CUDA for the Llama
    family, whose SDPA mask transformers builds block-diagonal from the position ids (one fused kernel there).
    Registers sft_varlen when it is used.

    Measured on CPU (fwd + bwd of one layer's attention, 8 x 512 tokens of 40-260-token documents, bf16, 2-core
    EPYC with AVX512-BF16): SmolLM2-135M's shapes (9 query / 3 kv heads) 164 ms
    with the block-diagonal mask, 100 ms per document (fp32 kernel, see :func:`sft.ops.attention.upcast_on_cpu`);
    OPT-125m's 178 ms (bf16 per document) -> 115 ms; ``python -m benchmarks.studies.attention``. (An earlier fp32
    measurement had kept sdpa for Llama: the attention halved but peak RSS rose, from the per-document slices'
    backward, which now splits instead.)"""
    if name == "auto":
        isolates = model_type is not None and supports("mask_isolates_packed", model_type)
        name = "sdpa" if isolates and torch.cuda.is_available() else "sft_varlen"
    if name == "sft_varlen":
        tf_patches.register_attention()
    return name


def prepare_weights(cfg: ModelConfig, quant: QuantizationConfig, seed: int, zero3: bool) -> None:
    """Write the on-disk copy that :func:`load_base_model` will read for a random ``arch:`` model (4-bit loads and
    ZeRO-3 loads go through ``from_pretrained``). Call on one rank, before TrainingArguments exist."""
    source = resolve_source(cfg)
    if source.kind != "arch":
        return
    if quant.mode == "nf4":
        materialize_arch(source.path, seed)
    elif zero3 or _arch_from_disk(cfg, quant):
        materialize_arch(source.path, seed, dtype=torch.float32 if cfg.dtype == "fp32" else torch.bfloat16)


def _arch_from_disk(cfg: ModelConfig, quant: QuantizationConfig) -> bool:
    """Whether a random ``arch:`` base (not 4-bit) is loaded from its on-disk copy rather than built in memory."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return quant.mode != "nf4" and (zero3_init() or (world > 1 and cfg.dtype != "fp32"))


def load_base_model(cfg: ModelConfig, quant: QuantizationConfig, seed: int = 42, source: ModelSource | None = None):
    """Load the base model with the configured dtype policy (and 4-bit quantization when asked)."""
    from sft.models.pretrained import load_pretrained

    source = source or resolve_source(cfg)
    # auto needs the model type: load with sdpa, then switch (resolve_attention) once the config is known
    attn = "sdpa" if cfg.attn_implementation == "auto" else resolve_attention(cfg.attn_implementation)
    common: dict[str, Any] = dict(attn_implementation=attn)
    if quant.mode == "nf4":
        common["quantization_config"] = bnb_config(quant)
        common["dtype"] = to_torch_dtype(quant.compute_dtype)
    try:
        if source.kind == "arch":
            if quant.mode == "nf4":
                # bitsandbytes quantizes while loading weights: materialise the random model once on disk.
                model_dir = materialize_arch(source.path, seed)
                model = load_pretrained(model_dir, use_safetensors=True, **common)
            elif _arch_from_disk(cfg, quant):
                # ZeRO-3 loads partitioned (zero.Init) through from_pretrained, and several ranks of a 16-bit run
                # each load the 16-bit copy instead of building the model in fp32 (2x the host memory per rank):
                # the same weights as build_random's, saved once, so every strategy starts from identical parameters
                dtype = torch.float32 if cfg.dtype == "fp32" else torch.bfloat16
                model = load_pretrained(materialize_arch(source.path, seed, dtype=dtype),
                                                             use_safetensors=True, dtype=dtype, attn_implementation=attn)
            else:
                # built in the dtype it trains in: transformers initialises in fp32 and casts, so a bf16 build has
                # the fp32 build's bits after the cast, without the fp32 copy (Llama-3.2-1B: a 5.9 GiB load peak
                # for 2.3 GiB of weights, above the seed recipe's whole run)
                dtype = torch.float32 if resolve_dtype_policy(cfg.dtype) == "fp32" else torch.bfloat16
                model = build_random(source.path, seed, dtype=dtype)
                tf_patches.set_attention(model, attn)
        elif source.kind == "gguf":
            if quant.mode == "nf4":
                model = load_pretrained(dense_copy_of_gguf(source.path, source.gguf_file),
                                                             use_safetensors=True, **common)
            else:
                model = load_pretrained(
                    dense_copy_of_gguf(source.path, source.gguf_file), dtype=torch.float32,
                    attn_implementation=attn, use_safetensors=True,
                )
        else:
            # safetensors only, also for hub ids: a pickled checkpoint is never unpickled
            model = load_pretrained(source.path, revision=cfg.revision, use_safetensors=True,
                                                         **common)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {cfg.name}: {e} (only safetensors weights are loaded)") from e
    if cfg.attn_implementation == "auto":
        chosen = resolve_attention("auto", getattr(model.config, "model_type", None))
        if chosen != attn:
            model.set_attn_implementation(chosen)
    if quant.mode != "nf4":
        apply_dtype_policy(model, cfg.dtype)
    else:
        bnb_patches.keep_4bit_layout(model)
    return model


def load_model_and_tokenizer(model_cfg: ModelConfig, lora_cfg: LoraSection | None, quant: QuantizationConfig,
                             seed: int = 42, tokens_per_micro_batch: int | None = None, tokenizer=None):
    """Base (+ LoRA when lora_cfg is given) and its tokenizer, ready for training: base dropout set, the chunked
    loss installed, checkpointing decided (``auto`` needs ``tokens_per_micro_batch``; without it, on)."""
    source = resolve_source(model_cfg)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_cfg, source)
    model = load_base_model(model_cfg, quant, seed=seed, source=source)
    return prepare_model(model, tokenizer, model_cfg, lora_cfg, quant, seed, tokens_per_micro_batch), tokenizer, source


def prepare_model(model, tokenizer, model_cfg: ModelConfig, lora_cfg: LoraSection | None, quant: QuantizationConfig,
                  seed: int = 42, tokens_per_micro_batch: int | None = None):
    """A loaded base (sft's or a library caller's) made ready for training: base dropout, the chunked loss, the
    checkpointing decision and LoRA. ``model.sft_checkpointing`` records what ``auto`` resolved to."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ModelError(
            f"the tokenizer has {len(tokenizer)} ids but the model's embedding has "
            f"{model.get_input_embeddings().num_embeddings}; pass a matching model.tokenizer"
        )
    if model_cfg.dropout is not None:
        set_base_dropout(model, model_cfg.dropout)
    if model_cfg.chunked_loss and zero3_init():
        # The chunked loss reads lm_head.weight without calling lm_head, so DeepSpeed's hooks never gather the
        # partitioned (and, when tied, embedding-shared) weight; gathering it by hand collides with the embedding's
        # own fetch of the same tensor ("Cannot free a ZeRO-3 parameter while it is still active").
        log.info("model.chunked_loss: not used under DeepSpeed ZeRO-3 (the model's own loss runs)")
    elif model_cfg.chunked_loss:
        if not tf_patches.install_chunked_loss(model):
            log.info("model.chunked_loss: %s is not a supported model type; using its own loss",
                     getattr(model.config, "model_type", "?"))
    if model_cfg.fused_norm and not zero3_init():
        model._sft_fused_norm = tf_patches.install_fused_norm(model) > 0
    if model_cfg.fused_mlp and not zero3_init():
        model._sft_fused_mlp = tf_patches.install_fused_mlp(model) > 0
    if model_cfg.fused_rope:
        tf_patches.install_fused_rope(model)
    if model_cfg.fast_attention_backward:
        tf_patches.use_math_backward(model)
    if lora_cfg is not None:
        torch.manual_seed(seed)  # LoRA A matrices are random: same seed, same adapter init
        checkpointing, keep = model_cfg.gradient_checkpointing, 0
        if checkpointing == "auto":
            keep = 0 if tokens_per_micro_batch is None else choose_checkpointing(
                model.config, tokens_per_micro_batch, model_cfg.dtype, quant.mode,
                chunked_loss=getattr(model, "_sft_chunked_loss", False),
                fused_norm=getattr(model, "_sft_fused_norm", False),
                fused_mlp=getattr(model, "_sft_fused_mlp", False), lean_attention=lean_attention(model, model_cfg))
            checkpointing = keep < getattr(model.config, "num_hidden_layers", 0)
        model = add_lora(model, lora_cfg, checkpointing, quantized=quant.mode == "nf4")
        if lora_cfg.fast_dropout:
            peft_patches.install_fast_dropout(model)
        if lora_cfg.fused and not sharded_launch() and not zero3_init():
            peft_patches.install_fused_lora(model)
        if checkpointing and keep:
            apply_checkpointing(model, keep)
        model.sft_checkpointing = checkpointing  # what `auto` resolved to (the config is not changed)
    return model


def lean_attention(model, model_cfg) -> bool:
    """Whether this model's training attention keeps bf16 inputs while computing in fp32
    (``model.fast_attention_backward`` and :func:`sft.ops.attention.upcast_on_cpu`: bf16 on a CPU without AMX,
    through sft_varlen)."""
    from sft.ops.attention import NAME, upcast_on_cpu

    return (model_cfg.fast_attention_backward and not torch.cuda.is_available()
            and resolve_dtype_policy(model_cfg.dtype) in ("bf16", "bf16-mixed")
            and getattr(model.config, "_attn_implementation", None) == NAME and upcast_on_cpu(torch.bfloat16))


__all__ = ["load_base_model", "load_model_and_tokenizer", "prepare_model", "prepare_weights", "resolve_attention",
           "set_base_dropout"]
