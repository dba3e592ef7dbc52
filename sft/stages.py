"""The stages of a run that sft.recipe.train lists, each a short call into its room (data, models, trainer)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sft import distributed as dist
from sft.config import RunConfig
from sft.data.inputs import RunData, open_data
from sft.errors import DataError, SftError
from sft.metrics import StepTimer, checkpointing_fraction, flops_per_token


def open_checked(cfg: RunConfig, rank: int, world: int, check_model: bool = True) -> RunData:
    """Resolve the model and open (validate) the data before loading anything: a bad path, an unreachable hub or a
    4-bit storage dtype that ZeRO-3 / FSDP would train silently wrong with (accelerate#3983, axolotl#2992) fails in
    a second, not after a minute, and the user learns about every problem at once."""
    from sft.models.sources import resolve_source
    from sft.preflight import check_output_dir

    problems: list[str] = []
    if check_model:
        try:
            resolve_source(cfg.model)
        except SftError as e:
            problems.append(str(e))
    data = None
    try:
        data = open_data(cfg, rank, world)
    except SftError as e:
        problems.append(str(e))
    problems += check_output_dir(cfg)  # training.output_dir writable
    if cfg.quantization.mode == "nf4":  # ZeRO-3 / FSDP need the 4-bit weights stored as the compute dtype
        from sft.models.quantization import resolve_quant_storage

        try:
            resolve_quant_storage(cfg.quantization)
        except SftError as e:
            problems.append(str(e))
    if problems:
        raise SftError("\n".join(problems) if len(problems) == 1 else "\n  " + "\n  ".join(problems))
    return data


def data_plan(cfg: RunConfig, data: RunData, tokenizer, world: int):
    """Steps per epoch (from the rows' token lengths: cached, counted once, or not needed with max_steps), the
    step count, and the packed train / eval datasets."""
    from sft.data.packing import PackedDataset
    from sft.data.steps import plan_steps

    per_step = cfg.training.per_device_train_batch_size * cfg.training.gradient_accumulation_steps
    plan = plan_steps(cfg, tokenizer, data.train, data.eval, per_step, world)
    steps_per_epoch = plan.steps_per_epoch or 0
    if plan.steps_per_epoch is not None and steps_per_epoch < 1 and cfg.training.max_steps <= 0:
        raise DataError(
            f"data.path: one epoch of the smallest rank's share packs into fewer blocks of {cfg.data.seq_length} "
            f"tokens than one optimizer step needs ({per_step}); lower data.seq_length or the batch size, or add data"
        )
    max_steps = cfg.training.max_steps if cfg.training.max_steps > 0 else \
        math.ceil(cfg.training.num_epochs * steps_per_epoch)
    eval_ds = None
    if plan.has_eval:
        eval_ds = PackedDataset.for_source(cfg.data, tokenizer, data.eval, infinite=False)
    elif data.eval is not None and cfg.training.eval_strategy != "no" and dist.is_main_process():
        import logging

        logging.getLogger(__name__).warning("data.eval_path holds less than one block of tokens: evaluation loss "
                                            "is skipped")
    train_ds = PackedDataset.for_source(cfg.data, tokenizer, data.train, infinite=True)
    train_ds.report_overlong = plan.counting == "skipped"  # else the counting pass reported them already
    return per_step, max_steps, plan, train_ds, eval_ds


def arguments(cfg: RunConfig, out: Path, max_steps: int, steps_per_epoch: int, has_eval: bool,
              extra: dict[str, Any] | None):
    """TrainingArguments (epoch intervals become step intervals) and the trackers' environment (a context the
    caller closes at the end)."""
    from sft.trainer import tracking
    from sft.trainer.arguments import training_arguments

    def interval(strategy: str, steps: int) -> tuple[str, int]:
        # "epoch" without a counted epoch (training.max_steps skips the counting pass): once, at the last step,
        # not every step (which wrote a checkpoint and ran the evaluation after each optimizer step)
        epoch = steps_per_epoch if steps_per_epoch > 0 else max_steps
        return ("steps", max(1, epoch)) if strategy == "epoch" else (strategy, steps)

    eval_strategy, eval_steps = interval(cfg.training.eval_strategy if has_eval else "no", cfg.training.eval_steps)
    save_strategy, save_steps = interval(cfg.training.save_strategy, cfg.training.save_steps)
    args = training_arguments(cfg, out / "checkpoints", max_steps, eval_strategy, eval_steps, save_strategy,
                              save_steps, dist.device(), extra)
    args.run_name = tracking.run_name(out)  # trackers log to output_dir/logs/<run> (sft/trainer/tracking.py)
    env = contextlib.ExitStack()
    env.enter_context(tracking.environment(out, args.run_name, cfg.training.report_to))
    return args, env


def model(cfg: RunConfig, given, tokenizer):
    """sft's base (loaded after TrainingArguments exist: under a ZeRO-3 launch they make transformers load the
    weights partitioned, so no rank ever holds the whole model) or the caller's, prepared for training. The
    resolved checkpointing decision goes into ``cfg`` (the run's resolved copy)."""
    from sft.models import load_model_and_tokenizer, prepare_model

    tokens = cfg.training.per_device_train_batch_size * cfg.data.seq_length
    if given is None:
        m, _, _ = load_model_and_tokenizer(cfg.model, cfg.lora, cfg.quantization, seed=cfg.training.seed,
                                           tokenizer=tokenizer, tokens_per_micro_batch=tokens)
    else:
        m = prepare_model(given, tokenizer, cfg.model, cfg.lora, cfg.quantization, cfg.training.seed, tokens)
    if hasattr(m, "sft_checkpointing"):
        cfg.model.gradient_checkpointing = m.sft_checkpointing  # summary.json and HFU see what ran
    if cfg.training.export_gguf:  # an architecture the exporter refuses fails now, not after training
        from sft.gguf_export import check_supported

        check_supported(m.config, quantized_ok=True)
    return m


def checkpoint_extras(cfg: RunConfig, meta: dict):
    """Files every checkpoint-N carries besides the Trainer's: sft_base.json (so `sft merge --adapter
    .../checkpoint-N` works) and what a resumed run must share with it."""
    from sft.io import atomic_write_json
    from sft.merging import write_base_meta
    from sft.trainer.checkpoint_format import RESUME_META

    def extras(directory: Path) -> None:
        write_base_meta(directory, cfg.model, cfg.quantization, cfg.training.seed)
        atomic_write_json(directory / RESUME_META, meta, fsync=True)

    return extras


def record_training(summary, trainer, result, timer: StepTimer, losses: list[float], train_ds, eval_ds,
                    seq_length: int) -> dict:
    """Steps, tokens, timing, losses, the final evaluation loss and model TFLOP/s into ``summary``."""
    summary.steps = int(result.global_step)
    summary.packing = asdict(train_ds.stats)
    summary.tokens = summary.steps * timer.tokens_per_step
    timing = timer.summary()
    summary.tokens_per_s = timing["tokens_per_s"]
    summary.first_step_s = timing["first_step_s"]
    summary.step_time_median_s = timing["step_time_median_s"]
    if losses:
        summary.loss_first, summary.loss_last, summary.loss_history = losses[0], losses[-1], losses
    if eval_ds is not None:
        last = trainer.state.log_history[-2:] if trainer.state.log_history else []
        evaluated = [h for h in last if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        # the Trainer evaluated at the last step already (eval_steps divides max_steps): do not do it twice
        summary.eval_loss = evaluated[-1]["eval_loss"] if evaluated else trainer.evaluate().get("eval_loss")
        if summary.eval_loss is not None:
            summary.eval_perplexity = math.exp(min(summary.eval_loss, 700.0))  # exp overflows a float past ~709
    fpt = flops_per_token(trainer.model, seq_length, checkpointing_fraction(trainer.model))
    summary.model_tflops_per_s = fpt.model * summary.tokens_per_s / 1e12
    return timing
