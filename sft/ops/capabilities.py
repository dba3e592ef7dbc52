"""Which model types each of sft's model-level ops supports: the one place these allow-lists live; and what this
CPU supports (:func:`cpu_flags`).

Each set names transformers ``model_type`` values checked by hand against the modelling code of transformers 5.x;
a model type missing from a set keeps transformers' own behaviour for that op (never an error).
"""

from __future__ import annotations

import functools
import importlib
import inspect

# The causal-LM head is exactly ``lm_head(last_hidden_state)`` (no logit scaling or soft-capping) and the module at
# ``base_model_prefix`` returns that hidden state: the chunked loss (sft/ops/loss.py) can replace the model's own.
PLAIN_LM_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "opt", "phi3", "olmo", "olmo2", "smollm3"})

# transformers builds the attention mask from the position ids (create_causal_mask(..., position_ids=...)), so
# packed documents are isolated under plain sdpa; the others (OPT) need sft_varlen (sft/ops/attention.py).
MASK_ISOLATES_PACKED = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3", "gemma",
                                  "gemma2", "gemma3_text", "mixtral", "granite"})

# Gated MLP (gate, up, down projections): ~10 hidden + 2.5 intermediate activations kept per token and layer,
# against ~6 + 1.5 for a plain two-layer MLP (the activation-memory estimate in sft/models).
GATED_MLP = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3", "gemma", "gemma2",
                       "mixtral"})


def supports(op: str, model_type: str | None) -> bool:
    """Whether ``model_type`` is in the allow-list ``op`` (one of the names above)."""
    table = {"plain_lm_head": PLAIN_LM_HEAD, "mask_isolates_packed": MASK_ISOLATES_PACKED, "gated_mlp": GATED_MLP}
    return model_type in table[op]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (``amx_bf16``, ``avx512_bf16``, ...); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def _forward_source(module: str, cls_name: str) -> str | None:
    try:
        return inspect.getsource(getattr(importlib.import_module(module), cls_name).forward)
    except (ImportError, AttributeError, OSError, TypeError):
        return None


@functools.cache
def has_forward_of(cls: type, module: str, cls_name: str) -> bool:
    """Whether ``cls.forward`` is, character for character, the forward of transformers' ``module.cls_name`` (how
    the fused CPU ops recognise the Llama-family norm and MLP in every model that copies them)."""
    ref = _forward_source(module, cls_name)
    if ref is None or not hasattr(cls, "forward"):
        return False
    try:
        return inspect.getsource(cls.forward) == ref
    except (OSError, TypeError):
        return False
