"""The ``transformers.TrainingArguments`` of a run: what sft derives from the config, plus what a library caller
adds (``sft.train(..., training_args={...})``: any TrainingArguments field, e.g. ``optim``, ``adam_beta2``,
``lr_scheduler_kwargs``), except the few that sft's data path and checkpoint format depend on."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from sft import distributed as dist
from sft.config import RunConfig
from sft.errors import ConfigError
from sft.models.precision import uses_bf16

#: TrainingArguments that sft's data path and checkpoints rely on: a caller's training_args may not change them.
PINNED = {
    "output_dir": "checkpoints go to training.output_dir/checkpoints (set training.output_dir)",
    "max_steps": "derived from training.max_steps / num_epochs and the step plan (set those)",
    "remove_unused_columns": "the packed blocks carry exactly the model's inputs",
    "dataloader_num_workers": "each rank streams its own Deep Lake shard in the main process",
    "ignore_data_skip": "the data cursor restores the stream position on resume",
    "average_tokens_across_devices": "the loss is normalised over every rank's labelled tokens",
    "prediction_loss_only": "evaluation needs the loss only (the chunked loss returns no logits)",
    "save_only_model": "a checkpoint holds the optimizer state, for exact resume",
}


def check_extra(extra: dict[str, Any] | None) -> dict[str, Any]:
    """A caller's extra TrainingArguments, checked (names exist, none of :data:`PINNED`) before any work."""
    from transformers import TrainingArguments

    extra = dict(extra or {})
    bad = sorted(k for k in extra if k in PINNED)
    if bad:
        raise ConfigError("training_args: " + "; ".join(f"{k} cannot be set ({PINNED[k]})" for k in bad))
    unknown = sorted(k for k in extra if k not in TrainingArguments.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"training_args: no TrainingArguments field named {', '.join(unknown)}; see "
                          "transformers.TrainingArguments for the names")
    return extra


def training_arguments(cfg: RunConfig, ckpt_dir: Path, max_steps: int, eval_strategy: str, eval_steps: int,
                       save_strategy: str, save_steps: int, device: torch.device, extra: dict[str, Any] | None = None):
    """TrainingArguments for the run; ``extra`` (a library caller's) overrides sft's values except :data:`PINNED`."""
    from transformers import TrainingArguments

    kwargs = _sft_arguments(cfg, ckpt_dir, max_steps, eval_strategy, eval_steps, save_strategy, save_steps, device)
    kwargs.update(check_extra(extra))
    with _cpu_deepspeed_bf16(cfg):
        return TrainingArguments(**kwargs)


def _sft_arguments(cfg: RunConfig, ckpt_dir: Path, max_steps: int, eval_strategy: str, eval_steps: int,
                   save_strategy: str, save_steps: int, device: torch.device) -> dict[str, Any]:
    """The TrainingArguments sft derives from the config and the step plan."""
    return dict(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=cfg.training.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.training.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        learning_rate=cfg.training.learning_rate,
        lr_scheduler_type=cfg.training.lr_scheduler,
        warmup_steps=cfg.training.warmup_steps,
        weight_decay=cfg.training.weight_decay,
        max_grad_norm=cfg.training.max_grad_norm,
        max_steps=max_steps,
        eval_strategy=eval_strategy,
        eval_steps=eval_steps or None,
        save_strategy=save_strategy,
        save_steps=save_steps or 500,
        save_total_limit=cfg.training.save_total_limit,
        logging_steps=cfg.training.logging_steps,
        logging_first_step=True,
        report_to=[] if cfg.training.report_to == ["none"] else cfg.training.report_to,
        seed=cfg.training.seed,
        data_seed=cfg.training.seed,
        bf16=uses_bf16(cfg.model.dtype, cfg.quantization.mode, cfg.quantization.compute_dtype),
        use_cpu=device.type == "cpu" and not dist.deepspeed_launch(),  # use_cpu would switch DeepSpeed off
        torch_compile=cfg.training.torch_compile,
        disable_tqdm=not cfg.training.progress or not dist.is_main_process(),
        remove_unused_columns=False,
        prediction_loss_only=True,  # evaluation needs the loss only (the chunked loss returns no logits)
        dataloader_num_workers=0,
        ddp_timeout=cfg.training.dist_timeout_s,
        ddp_find_unused_parameters=False,
        # the loss is sum(token losses) / labelled tokens of the whole optimizer step, over every rank and
        # micro-batch: the same number whatever the world size (tests/test_distributed.py checks it)
        average_tokens_across_devices=True,
        save_only_model=False,
        # the data cursor restores the stream position on resume; never replay (re-iterate) the seen batches
        ignore_data_skip=True,
        # DeepSpeed on CPU: keep the accelerate state sft.distributed configured (TrainingArguments would reset it
        # and count one process)
        **({"accelerator_config": {"use_configured_state": True}}
           if device.type == "cpu" and dist.deepspeed_launch() and dist.is_initialized() else {}),
    )


@contextlib.contextmanager
def _cpu_deepspeed_bf16(cfg: RunConfig):
    """Let TrainingArguments(bf16=True) through for DeepSpeed on CPU.

    transformers refuses bf16 unless ``use_cpu`` is set or a GPU supports it, and ``use_cpu`` switches DeepSpeed
    off (accelerate then trains plain DDP). DeepSpeed's CPU accelerator trains in bf16 (torch CPU kernels), so
    for that one launch the GPU check is answered for the CPU, only while the arguments are built."""
    if not (dist.deepspeed_launch() and not torch.cuda.is_available()
            and uses_bf16(cfg.model.dtype, cfg.quantization.mode, cfg.quantization.compute_dtype)):
        yield
        return
    from sft.patches.transformers import bf16_allowed_on_cpu

    with bf16_allowed_on_cpu():
        yield


def leave_sharded_mode() -> None:
    """Forget the DeepSpeed config that TrainingArguments registered with transformers (a process-wide setting)."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()
