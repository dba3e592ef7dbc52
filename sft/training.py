"""A fine-tuning run, top to bottom: data -> model -> accuracy before -> train -> save -> accuracy after -> merge.

The loop itself is transformers' ``Trainer`` (checkpointing, resume, logging integrations, DDP / DeepSpeed /
FSDP through accelerate). What we bring is the data path (a rank's shard streamed from Deep Lake, formatted and
packed into constant-length blocks), the model preparation, throughput and memory accounting, and the rank-0
merge. TRL's ``SFTTrainer`` was not used: it wants a ``datasets`` dataset it can map over, packs without
per-document position ids on CPU, and its own packing would re-read our stream; the plain ``Trainer`` takes our
packed ``IterableDataset`` as it is.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sft import distributed as dist
from sft.config import RunConfig
from sft.errors import DataError, SftError
from sft.metrics import StepTimer, flops_per_token, peak_rss_bytes

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    steps: int = 0
    tokens: int = 0
    tokens_per_s: float = float("nan")
    train_seconds: float = 0.0
    first_step_s: float = float("nan")
    peak_rss_gb: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    world_size: int = 1
    backend: str = "none"
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    eval_loss: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    sample_question: str | None = None
    sample_answer: str | None = None
    merge_max_abs_diff: float | None = None
    loss_history: list[float] = field(default_factory=list)
    model_tflops_per_s: float = float("nan")
    paths: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(1, self.total_params)


# --------------------------------------------------------------------------------------------- data


def prepare_demo_data(cfg: RunConfig) -> None:
    """Generate the demo task into data.path / data.eval_path if they do not exist (rank 0; others wait)."""
    from sft.data.demo import generate_examples
    from sft.data.ingest import write_dataset

    if dist.is_main_process():
        for path, split, n in ((cfg.data.path, "train", cfg.data.demo_train_rows),
                               (cfg.data.eval_path, "test", cfg.data.demo_test_rows)):
            if path and not Path(path).exists():
                rows = generate_examples(n, seed=cfg.training.seed, split=split)
                write_dataset(path, rows, progress=cfg.training.progress)
                print(f"demo: wrote {n} {split} rows to {path}")
    dist.barrier()


def _source(cfg: RunConfig, path: str, shuffle: bool, rank: int, world: int):
    from sft.data.source import ShardedSource

    return ShardedSource(path, rank=rank, world_size=world, seed=cfg.training.seed, shuffle=shuffle,
                         read_batch=cfg.data.read_batch)


def _packed(cfg: RunConfig, tokenizer, source, infinite: bool):
    from sft.data.packing import PackedDataset

    return PackedDataset(
        rows_fn=source.iter_rows, tokenizer=tokenizer, template=cfg.data.template, seq_length=cfg.data.seq_length,
        answer_only=cfg.data.answer_only, overlong=cfg.data.overlong, infinite=infinite,
    )


def _count_blocks(cfg: RunConfig, tokenizer, source) -> int:
    from sft.data.packing import count_blocks

    stats = count_blocks(source.iter_rows(0), tokenizer, cfg.data.template, cfg.data.seq_length,
                         answer_only=cfg.data.answer_only, overlong=cfg.data.overlong)
    return stats.blocks


class _Collator:
    """Stack constant-length blocks; drop position ids when the config says so."""

    def __init__(self, position_ids: bool):
        self.position_ids = position_ids

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        keys = [k for k in features[0] if self.position_ids or k != "position_ids"]
        return {k: torch.stack([f[k] for f in features]) for k in keys}


# --------------------------------------------------------------------------------------------- accuracy


def held_out_rows(cfg: RunConfig, n: int) -> list[dict[str, str]]:
    from sft.data.source import ShardedSource

    src = ShardedSource(cfg.data.eval_path, shuffle=False, read_batch=cfg.data.read_batch)
    rows = []
    for row in src.iter_rows(0):
        rows.append(row)
        if len(rows) >= n:
            break
    return rows


def accuracy(cfg: RunConfig, model, tokenizer, rows: list[dict[str, str]], desc: str) -> float:
    """Held-out exact match of greedy answers, prompted exactly as in training."""
    from sft.data.demo import evaluate_accuracy
    from sft.data.formatting import prompt_text

    bf16 = cfg.model.dtype == "bf16-mixed" or cfg.quantization.mode == "nf4"
    acc, _ = evaluate_accuracy(
        model, tokenizer, rows, lambda q: prompt_text(tokenizer, q, cfg.data.template),
        batch_size=cfg.training.per_device_eval_batch_size * 4, max_new_tokens=cfg.training.max_new_tokens,
        progress=cfg.training.progress, autocast_dtype=torch.bfloat16 if bf16 else None,
        add_special_tokens=cfg.data.template == "default", desc=desc,
    )
    return acc


# --------------------------------------------------------------------------------------------- trainer


def _make_trainer_class():
    from transformers import Trainer

    class ShardAwareTrainer(Trainer):
        """Our datasets are already this rank's shard: do not let accelerate re-shard or dispatch them."""

        def get_train_dataloader(self):
            if self.args.world_size <= 1:
                return super().get_train_dataloader()
            from torch.utils.data import DataLoader

            return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator)

        def get_eval_dataloader(self, eval_dataset=None):
            if self.args.world_size <= 1:
                return super().get_eval_dataloader(eval_dataset)
            from torch.utils.data import DataLoader

            ds = eval_dataset if eval_dataset is not None else self.eval_dataset
            return DataLoader(ds, batch_size=self.args.eval_batch_size, collate_fn=self.data_collator)

    return ShardAwareTrainer


def _make_callback(timer: StepTimer, losses: list[float]):
    from transformers import TrainerCallback

    class ThroughputCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            timer.start()

        def on_step_end(self, args, state, control, **kw):
            timer.step()
            # Fault injection for the dead-rank tests: SFT_FAULT_KILL="RANK:STEP" SIGKILLs that rank at that step.
            fault = os.environ.get("SFT_FAULT_KILL")
            if fault:
                kill_rank, kill_step = (int(x) for x in fault.split(":"))
                if state.global_step == kill_step and dist.dist_info().rank == kill_rank:
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)

        def on_evaluate(self, args, state, control, **kw):
            timer.interrupted()

        def on_save(self, args, state, control, **kw):
            timer.interrupted()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return ThroughputCallback()


def _resolve_resume(cfg: RunConfig, ckpt_dir: Path) -> str | None:
    r = cfg.training.resume
    if not r:
        return None
    if r == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if not Path(r).is_dir():
        raise DataError(f"training.resume: checkpoint {r} does not exist (use resume=auto for the newest one)")
    return r


def train(cfg: RunConfig) -> RunSummary:
    from transformers import TrainingArguments

    from sft.merging import base_meta_callback, merge_adapter
    from sft.models import count_parameters, load_model_and_tokenizer, resolve_source

    t_start = time.perf_counter()
    from sft.models import resolve_dtype_policy

    cfg.model.dtype = resolve_dtype_policy(cfg.model.dtype)  # "auto" becomes what this machine runs fastest
    dist.init_process_group_if_needed(timeout_s=cfg.training.dist_timeout_s,
                                      device="cuda" if torch.cuda.is_available() else "cpu")
    dist.start_watchdog()
    info = dist.dist_info()
    rank, world = info.rank, info.world_size
    out = Path(cfg.training.output_dir)
    summary = RunSummary(world_size=world, backend=info.backend or "none")

    if cfg.data.demo:
        prepare_demo_data(cfg)
    # Resolve the model and open (validate) the data before loading anything: a bad path or an unreachable hub
    # fails in a second, not after a minute, and the user learns about every problem at once.
    problems: list[str] = []
    try:
        resolve_source(cfg.model)
    except SftError as e:
        problems.append(str(e))
    train_src = eval_src = None
    try:
        if not cfg.data.path:
            raise DataError("data.path is not set: pass a Deep Lake dataset (make one with `sft ingest FILE --out PATH`)")
        train_src = _source(cfg, cfg.data.path, cfg.data.shuffle, rank, world)
        eval_src = _source(cfg, cfg.data.eval_path, False, rank, world) if cfg.data.eval_path else None
    except SftError as e:
        problems.append(str(e))
    if problems:
        raise SftError("\n".join(problems) if len(problems) == 1 else "\n  " + "\n  ".join(problems))

    model, tokenizer, source = load_model_and_tokenizer(cfg.model, cfg.lora, cfg.quantization, seed=cfg.training.seed)
    summary.trainable_params, summary.total_params = count_parameters(model)
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    # Steps per epoch from a tokenizing pass over this rank's shard; every rank takes the same number of steps
    # (the smallest), so that no rank waits at a collective for a peer that ran out of data.
    blocks = _count_blocks(cfg, tokenizer, train_src)
    per_step = cfg.training.per_device_train_batch_size * cfg.training.gradient_accumulation_steps
    steps_per_epoch = dist.all_reduce_min_int(blocks // per_step)
    if steps_per_epoch < 1 and cfg.training.max_steps <= 0:
        raise DataError(
            f"data.path: one epoch of this rank's shard packs into {blocks} blocks of {cfg.data.seq_length} tokens, "
            f"fewer than one optimizer step needs ({per_step}); lower data.seq_length or the batch size, or add data"
        )
    max_steps = cfg.training.max_steps if cfg.training.max_steps > 0 else math.ceil(cfg.training.num_epochs * steps_per_epoch)

    eval_dataset = None
    if eval_src is not None and cfg.training.eval_strategy != "no":
        if _count_blocks(cfg, tokenizer, eval_src) >= 1:
            eval_dataset = _packed(cfg, tokenizer, eval_src, infinite=False)
        else:
            log.warning("data.eval_path holds less than one block of tokens: evaluation loss is skipped")

    rows_for_accuracy: list[dict[str, str]] = []
    if cfg.training.accuracy_samples and cfg.data.eval_path and dist.is_main_process():
        rows_for_accuracy = held_out_rows(cfg, cfg.training.accuracy_samples)
        model.to(device)
        summary.accuracy_before = accuracy(cfg, model, tokenizer, rows_for_accuracy, "accuracy before")
        print(f"held-out accuracy before training: {100 * summary.accuracy_before:.1f}% ({len(rows_for_accuracy)} rows)")

    def interval(strategy: str, steps: int) -> tuple[str, int]:
        if strategy == "epoch":
            return "steps", max(1, steps_per_epoch)
        return strategy, steps

    eval_strategy, eval_steps = interval(cfg.training.eval_strategy if eval_dataset is not None else "no",
                                         cfg.training.eval_steps)
    save_strategy, save_steps = interval(cfg.training.save_strategy, cfg.training.save_steps)
    ckpt_dir = out / "checkpoints"
    args = TrainingArguments(
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
        bf16=cfg.model.dtype == "bf16-mixed" or cfg.quantization.mode == "nf4",
        use_cpu=device.type == "cpu",
        torch_compile=cfg.training.torch_compile,
        disable_tqdm=not cfg.training.progress or not dist.is_main_process(),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_timeout=cfg.training.dist_timeout_s,
        ddp_find_unused_parameters=False,
        save_only_model=False,
    )
    timer = StepTimer(tokens_per_step=per_step * cfg.data.seq_length * world)
    losses: list[float] = []
    Trainer = _make_trainer_class()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_packed(cfg, tokenizer, train_src, infinite=True),
        eval_dataset=eval_dataset,
        data_collator=_Collator(cfg.data.position_ids),
        callbacks=[_make_callback(timer, losses),
                   # every checkpoint-N carries sft_base.json, so `sft merge --adapter .../checkpoint-N` works
                   base_meta_callback(cfg.model, cfg.quantization, cfg.training.seed)],
    )
    resume = _resolve_resume(cfg, ckpt_dir)
    t_train = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except Exception as e:
        if world > 1:
            dist.explain_failure(e)  # names the dead peer and exits, if that is what happened
        raise
    summary.train_seconds = time.perf_counter() - t_train
    summary.steps = int(result.global_step)
    summary.tokens = summary.steps * timer.tokens_per_step
    timing = timer.summary()
    summary.tokens_per_s = timing["tokens_per_s"]
    summary.first_step_s = timing["first_step_s"]
    if losses:
        summary.loss_first, summary.loss_last = losses[0], losses[-1]
        summary.loss_history = losses
    if eval_dataset is not None:
        summary.eval_loss = trainer.evaluate().get("eval_loss")
    fpt = flops_per_token(trainer.model, cfg.data.seq_length, cfg.model.gradient_checkpointing)
    summary.model_tflops_per_s = fpt.model * summary.tokens_per_s / 1e12

    adapter_dir = out / "adapter"
    _save_adapter(trainer, tokenizer, adapter_dir, cfg)
    if dist.is_main_process():
        summary.paths["adapter"] = str(adapter_dir)
        if rows_for_accuracy:
            summary.accuracy_after = accuracy(cfg, trainer.model, tokenizer, rows_for_accuracy, "accuracy after")
            print(f"held-out accuracy after training: {100 * summary.accuracy_after:.1f}%")
    del trainer, model
    gc.collect()

    if cfg.training.merge:
        merged_dir = out / "merged"
        if dist.is_main_process():
            report = merge_adapter(adapter_dir, merged_dir, overwrite=True)
            print(f"rank {rank}: merged the adapter into {merged_dir} (logits check max |diff| {report.max_abs_diff:.2e})")
            summary.merge_max_abs_diff = report.max_abs_diff
            summary.paths["merged"] = str(merged_dir)
            q, a = _sample_answer(cfg, merged_dir, rows_for_accuracy)
            summary.sample_question, summary.sample_answer = q, a
        dist.barrier()  # the other ranks wait here for rank 0's merge
    dist.stop_watchdog()

    summary.peak_rss_gb = peak_rss_bytes() / 2**30
    summary.wall_seconds = time.perf_counter() - t_start
    if dist.is_main_process():
        summary.paths["summary"] = str(out / "summary.json")
        _write_json(out / "summary.json", {"summary": asdict(summary), "config": cfg.to_dict(),
                                           "run": dist.run_metadata(), "timing": timing})
    return summary


def _save_adapter(trainer, tokenizer, adapter_dir: Path, cfg: RunConfig) -> None:
    """PEFT format (adapter_config.json + adapter_model.safetensors), the tokenizer, and how to rebuild the base.

    Every rank calls this: under DeepSpeed ZeRO-3 the adapter weights are partitioned and ``save_model`` gathers
    them (a collective) before the main process writes. Written to a temporary directory, then renamed."""
    import shutil

    from sft.merging import write_base_meta

    tmp = adapter_dir.parent / (adapter_dir.name + ".tmp-save")
    if dist.is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    try:
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


def _sample_answer(cfg: RunConfig, merged_dir: Path, rows: list[dict[str, str]]) -> tuple[str, str]:
    """Reload the merged model the way a user would and answer one held-out question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.data.formatting import prompt_text
    from sft.generation import generate_texts

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    question = rows[0]["question"] if rows else "What is the capital of France?"
    text = generate_texts(model, tokenizer, [prompt_text(tokenizer, question, cfg.data.template)],
                          max_new_tokens=cfg.training.max_new_tokens,
                          add_special_tokens=cfg.data.template == "default")[0]
    return question, text.strip()


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
