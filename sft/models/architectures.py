"""Random-init models of published architectures (``model.name=arch:NAME``), and their on-disk copies.

The hyper-parameters are those of the models' config.json on the hub, so random-init models have exactly the
shapes, parameter counts and FLOPs of the real ones; throughput does not depend on weight values.
"""

from __future__ import annotations

from typing import Any

import torch



# Published architecture hyper-parameters (from the models' config.json on the hub), so that random-init
# models have exactly the shapes, parameter counts and FLOPs of the real ones.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "opt-125m": dict(
        model_type="opt", vocab_size=50272, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        ffn_dim=3072, max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True,
        dropout=0.1, attention_dropout=0.0, activation_function="relu", pad_token_id=1, bos_token_id=2,
        eos_token_id=2, tie_word_embeddings=True,
    ),
    "opt-1.3b": dict(
        model_type="opt", vocab_size=50272, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
        ffn_dim=8192, max_position_embeddings=2048, word_embed_proj_dim=2048, do_layer_norm_before=True,
        dropout=0.1, attention_dropout=0.0, activation_function="relu", pad_token_id=1, bos_token_id=2,
        eos_token_id=2, tie_word_embeddings=True,
    ),
    # Llama 3.2 1B
    "llama-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu",
    ),
    # Llama 2 7B
    "llama-7b": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
    ),
    # Tiny shapes for tests: seconds to train, same code paths as the real ones. A larger init scale than the
    # real models' 0.02: with a frozen random head of std 0.02 over 49k ids, logits cannot move more than ~1,
    # so LoRA could barely lower the loss and "the loss drops" would be a weak test.
    "tiny-llama": dict(
        model_type="llama", vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu", initializer_range=0.1,
    ),
    "tiny-opt": dict(
        model_type="opt", vocab_size=50272, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        ffn_dim=256, max_position_embeddings=2048, word_embed_proj_dim=128, do_layer_norm_before=True,
        dropout=0.1, attention_dropout=0.0, activation_function="relu", pad_token_id=1, bos_token_id=2,
        eos_token_id=2, tie_word_embeddings=True, init_std=0.1,
    ),
}


def arch_config(arch: str):
    from transformers import AutoConfig

    params = dict(ARCHITECTURES[arch])
    model_type = params.pop("model_type")
    return AutoConfig.for_model(model_type, **params)


def build_random(arch: str, seed: int, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """A random-init model of a published architecture (on the meta device when device == 'meta')."""
    from transformers import AutoModelForCausalLM

    config = arch_config(arch)
    torch.manual_seed(seed)
    if device == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Built from a config, OPT's lm_head can come out untied (facts.md): tie so the count is the real one.
    model.tie_weights()
    return model
