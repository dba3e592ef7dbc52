"""Writing the trained adapter: PEFT format (adapter_config.json + adapter_model.safetensors), the tokenizer, and
sft_base.json (how to rebuild the base)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sft import distributed as dist
from sft.config import RunConfig


def save_adapter(trainer, tokenizer, adapter_dir: Path, cfg: RunConfig) -> None:
    """PEFT format (adapter_config.json + adapter_model.safetensors), the tokenizer, and how to rebuild the base.

    Every rank calls this: under DeepSpeed ZeRO-3 the adapter weights are partitioned and ``save_model`` gathers
    them (a collective) before the main process writes. Written to a temporary directory that every rank names the
    same way (save_model runs on all of them), then renamed."""
    from sft.models.base_meta import write_base_meta

    tmp = adapter_dir.parent / (adapter_dir.name + ".tmp-save")
    dist.set_phase("save-adapter")
    if dist.is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    try:
        if trainer.is_fsdp_enabled:
            # FSDP: save_model writes nothing under SHARDED_STATE_DICT; gather the full state (a collective) and
            # let PEFT keep the adapter's tensors
            state = trainer.accelerator.get_state_dict(trainer.model)
            if dist.is_main_process():
                trainer.accelerator.unwrap_model(trainer.model).save_pretrained(tmp, state_dict=state)
            del state
        else:
            trainer.save_model(str(tmp))
        if dist.is_main_process():
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; nothing here loads it
            tokenizer.save_pretrained(tmp)
            write_base_meta(tmp, cfg.model, cfg.quantization, cfg.training.seed)
            if adapter_dir.exists():
                shutil.rmtree(adapter_dir)
            os.replace(tmp, adapter_dir)
    except BaseException:
        if dist.is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
