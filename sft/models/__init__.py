"""Base models: where they come from (sources, architectures, the cache), their tokenizers, the dtype policy
(precision), 4-bit quantization, LoRA adapters, activation memory, and the loading that ties them together.

The names below are the room's public API; everything else is imported from its module."""

from sft.models.adapters import add_lora, count_parameters, lora_config
from sft.models.architectures import ARCHITECTURES, arch_config, build_random
from sft.models.cache import cache_dir, dense_copy_of_gguf, materialize_arch
from sft.models.loading import (load_base_model, load_model_and_tokenizer, prepare_model, prepare_weights,
                                resolve_attention, set_base_dropout)
from sft.models.memory import apply_checkpointing, choose_checkpointing, layer_activation_bytes, logits_bytes
from sft.models.precision import apply_dtype_policy, cpu_has_fast_bf16, resolve_dtype_policy, uses_bf16
from sft.models.quantization import NF4_BLOCKSIZE, nf4_roundtrip, quantized_weight_names, resolve_quant_storage
from sft.models.sources import EMBEDDED_MODELS, ModelSource, check_safetensors, embedded_gguf, is_hub_id, resolve_source
from sft.models.tokenizers import byte_tokenizer, load_tokenizer

__all__ = [
    "ARCHITECTURES", "EMBEDDED_MODELS", "NF4_BLOCKSIZE", "ModelSource", "add_lora", "apply_checkpointing",
    "apply_dtype_policy", "arch_config", "build_random", "byte_tokenizer", "cache_dir", "check_safetensors",
    "choose_checkpointing", "count_parameters", "cpu_has_fast_bf16", "dense_copy_of_gguf", "embedded_gguf",
    "is_hub_id", "layer_activation_bytes", "load_base_model", "load_model_and_tokenizer", "load_tokenizer",
    "logits_bytes", "lora_config", "materialize_arch", "nf4_roundtrip", "prepare_model", "prepare_weights", "quantized_weight_names",
    "resolve_attention", "resolve_dtype_policy", "resolve_quant_storage", "resolve_source", "set_base_dropout",
    "uses_bf16",
]
