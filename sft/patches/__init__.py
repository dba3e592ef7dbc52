"""Every change sft makes to other libraries' objects, one module per library (transformers, accelerate, peft,
bitsandbytes, deepspeed), each registered with what it changes, why, the versions it was verified on and the
documented alternative (:mod:`sft.patches.registry`). :func:`ran` lists the patches that ran in this process
(summary.json's ``patches``); tests/test_patches.py holds a canary per patch.

Nothing outside this package assigns to another library's objects; sft's Trainer overrides of private
``transformers.Trainer`` methods stay in sft/trainer/ and are registered in :mod:`sft.patches.transformers`."""

from sft.patches import accelerate, bitsandbytes, deepspeed, peft, transformers  # noqa: F401 (registers them)
from sft.patches.registry import (GPU_IMAGE, VERIFIED, Patch, PatchBroken, applied, override, ran, registry,
                                  reset)

__all__ = ["GPU_IMAGE", "VERIFIED", "Patch", "PatchBroken", "applied", "override", "ran", "registry", "reset"]
