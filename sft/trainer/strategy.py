"""Which parallel strategy a Trainer really runs (accelerate can silently fall back to DDP): named in summary.json
and in the first-step check's messages."""

from __future__ import annotations


def strategy(trainer) -> str:
    """The parallel strategy the Trainer will really use: single, ddp, deepspeed-zero2/3, fsdp1/2."""
    if trainer.is_deepspeed_enabled:
        from transformers.integrations import is_deepspeed_zero3_enabled

        return "deepspeed-zero3" if is_deepspeed_zero3_enabled() else "deepspeed-zero2"
    if trainer.is_fsdp_enabled:
        return f"fsdp{getattr(trainer.accelerator.state.fsdp_plugin, 'fsdp_version', 1)}"
    return "ddp" if trainer.args.world_size > 1 else "single"
