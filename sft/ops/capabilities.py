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


def run_compiled(fn, *args):
    """``fn(*args)`` for a compiled kernel, under the caller's ``except Exception`` fallback to eager code: raises
    :class:`CompileFailed` for a failure of the compiled call, and lets through the exceptions that are not
    failures. torch's non-reentrant activation checkpoint stops a recomputation early by raising from a
    saved-tensor hook (``torch.utils.checkpoint._StopRecomputationError``), which can fire inside a compiled
    kernel; taken for a compiler failure, the layer went on in eager code and backward died with "Unexpected
    state: target_frame.early_stop is set" (every recomputed layer of a QLoRA run, tests/test_recompute.py)."""
    try:
        return fn(*args)
    except Exception as e:
        if type(e).__name__ == "_StopRecomputationError" and type(e).__module__ == "torch.utils.checkpoint":
            raise
        raise CompileFailed(e) from e


class CompileFailed(Exception):
    """A compiled kernel failed (``.error``: what it raised); the caller falls back to eager code."""

    def __init__(self, error: BaseException):
        super().__init__(f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}")
        self.error = error
