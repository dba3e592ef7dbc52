"""``AutoModelForCausalLM.from_pretrained`` as sft calls it: with transformers' Hub kernels off.

transformers 5 turns ``use_kernels`` on by default whenever the ``kernels`` package is installed (transformers itself
requires it), and every ``model.train()`` / ``model.eval()`` then "kernelizes" the model: it looks up replacement
layers on the Hugging Face Hub (a network call sft does not make without being asked) and resets the ``forward`` of
every kernel-mapped layer, removing instance-level forwards. Found on transformers 5.24 + kernels 0.19: the
Trainer's ``model.train()`` put the embedded SmolLM2's RMSNorms back on transformers' eager forward, so
``model.fused_norm`` never ran in training (the step's profile had the eager ``pow``/``mul``/``rsqrt`` of 40 norm
forwards and no compiled graph). Models that sft builds from a config (``arch:``) never had the flag.
"""

from __future__ import annotations

from typing import Any


def load_pretrained(path: Any, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` with ``use_kernels=False``."""
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("use_kernels", False)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
