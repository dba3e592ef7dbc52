"""A fine-tuning run, top to bottom: data -> model -> accuracy before -> train -> save -> accuracy after -> merge.

The loop itself is transformers' ``Trainer`` (checkpointing, resume, logging integrations, DDP / DeepSpeed /
FSDP through accelerate). What we bring is the data path (a rank's shard streamed from Deep Lake, formatted and
packed into constant-length blocks), the model preparation, throughput and memory accounting, and the rank-0
merge. TRL's ``SFTTrainer`` was not used: it wants a ``datasets`` dataset it can map over, packs without
per-document position ids on CPU, and its own packing would re-read our stream; the plain ``Trainer`` takes our
packed ``IterableDataset`` as it is.
"""

from __future__ import annotations

import contextlib
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
from sft.metrics import StepTimer, checkpointing_fraction, flops_per_token, peak_rss_bytes

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    steps: int = 0
    tokens: int = 0
    tokens_per_s: float = float("nan")
    train_seconds: float = 0.0
    first_step_s: float = float("nan")
    step_time_median_s: float = float("nan")  # optimizer steps, excluding the first (warm-up) and eval/save steps
    peak_rss_gb: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    world_size: int = 1
    backend: str = "none"
    strategy: str = "single"  # what the Trainer really ran: single, ddp, deepspeed-zero2/3, fsdp2
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    eval_loss: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None  # the adapter model (None under ZeRO-3 / FSDP: see accuracy_merged)
    accuracy_merged: float | None = None  # the merged model, reloaded from disk as a user would
    sample_question: str | None = None
    sample_answer: str | None = None
    merge_max_abs_diff: float | None = None
    resumed_from: str | None = None  # the checkpoint this run continued from
    resumed_step: int = 0  # its global step (this run trained steps resumed_step+1 .. steps)
    loss_history: list[float] = field(default_factory=list)
    model_tflops_per_s: float = float("nan")
    paths: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    data_counting: str = ""  # how steps per epoch were found: counted, cached (length cache) or skipped (max_steps)
    packing: dict = field(default_factory=dict)  # rank 0's packing counts over the blocks it built in training

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
                         read_batch=cfg.data.read_batch, **_remote_args(cfg))


def _remote_args(cfg: RunConfig) -> dict:
    """data.creds and the bounds of remote reads, for every ShardedSource of the run."""
    return {"creds": cfg.data.creds, "read_timeout_s": cfg.data.read_timeout_s,
            "read_attempts": cfg.data.read_attempts}


def uses_bf16(cfg: RunConfig) -> bool:
    """Whether the run computes in bf16 (autocast / DeepSpeed bf16): the bf16-mixed policy, or a 4-bit base
    dequantized to bf16."""
    return cfg.model.dtype == "bf16-mixed" or (cfg.quantization.mode == "nf4" and cfg.quantization.compute_dtype == "bf16")


IGNORE = -100  # the label of a position that is not trained


def _masked_block(batch: int, seq_length: int) -> dict[str, torch.Tensor]:
    """A batch that contributes nothing to a loss: for ranks that must join a collective forward without data."""
    return {"input_ids": torch.zeros(batch, seq_length, dtype=torch.long),
            "labels": torch.full((batch, seq_length), IGNORE, dtype=torch.long),
            "position_ids": torch.arange(seq_length).repeat(batch, 1)}


class _Collator:
    """Stack constant-length blocks; drop position ids when the config says so.

    With position ids the packed documents are isolated (attention stays inside each), and then the label of each
    document's first token is masked: after the model's label shift it would be predicted from the previous
    document's EOS, a target across documents (as transformers' DataCollatorWithFlattening masks it). Without
    them (the seed's packing, documents see each other) the stream is trained as it is."""

    def __init__(self, position_ids: bool):
        self.position_ids = position_ids

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        keys = [k for k in features[0] if self.position_ids or k != "position_ids"]
        batch = {k: torch.stack([f[k] for f in features]) for k in keys}
        if self.position_ids and "labels" in batch:
            batch["labels"] = batch["labels"].masked_fill(batch["position_ids"] == 0, IGNORE)
        return batch


# --------------------------------------------------------------------------------------------- accuracy


def held_out_rows(cfg: RunConfig, n: int) -> list[dict[str, str]]:
    from sft.data.source import ShardedSource

    src = ShardedSource(cfg.data.eval_path, shuffle=False, read_batch=cfg.data.read_batch, **_remote_args(cfg))
    rows = []
    for row in src.iter_rows(0):
        rows.append(row)
        if len(rows) >= n:
            break
    return rows


def accuracy(cfg: RunConfig, model, tokenizer, rows: list[dict[str, str]], desc: str, merged: bool = False) -> float:
    """Held-out exact match of greedy answers, prompted exactly as in training (a merged model, reloaded in fp32,
    runs without autocast)."""
    from sft.data.demo import evaluate_accuracy
    from sft.data.formatting import prompt_text

    bf16 = not merged and uses_bf16(cfg)
    acc, _ = evaluate_accuracy(
        model, tokenizer, rows, lambda q: prompt_text(tokenizer, q, cfg.data.template),
        batch_size=cfg.training.per_device_eval_batch_size * 4, max_new_tokens=cfg.training.max_new_tokens,
        progress=cfg.training.progress, autocast_dtype=torch.bfloat16 if bf16 else None,
        add_special_tokens=cfg.data.template == "default", desc=desc,
    )
    return acc


# --------------------------------------------------------------------------------------------- trainer


def _fault(var: str, step: int) -> None:
    """Fault injection for the kill tests: ``var`` = "STEP" (rank 0) or "RANK:STEP" SIGKILLs that rank at that step."""
    spec = os.environ.get(var)
    if not spec:
        return
    kill_rank, kill_step = (int(x) for x in spec.split(":")) if ":" in spec else (0, int(spec))
    if step == kill_step and dist.dist_info().rank == kill_rank:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _make_trainer_class():
    from transformers import Trainer

    class ShardAwareTrainer(Trainer):
        """Our datasets are already this rank's shard: do not let accelerate re-shard or dispatch them.

        Checkpoints are crash-safe and pickle-free (see :mod:`sft.checkpoint`): written into
        ``checkpoint-N.partial`` by every rank, marked ``COMPLETE`` and renamed into place by the main process; the
        optimizer, scheduler, scaler and RNG states go to safetensors + JSON, each rank adds its data cursor, and
        ``training_args.bin`` (a pickle) is never written. ``checkpoint_extras(dir)`` (main process) adds files of
        ours (sft_base.json, sft_resume.json) before the checkpoint is marked complete. DeepSpeed and FSDP keep
        their own optimizer formats (their engines write them)."""

        def __init__(self, *args, checkpoint_extras=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.checkpoint_extras = checkpoint_extras

        def _own_optimizer_format(self) -> bool:
            from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

            return not (self.is_deepspeed_enabled or self.is_fsdp_enabled or is_torch_xla_available()
                        or is_sagemaker_mp_enabled())

        # -- checkpoint writing --------------------------------------------------------------------------------
        def _save_checkpoint(self, model, trial):
            import shutil

            from sft import checkpoint as ck

            step = self.state.global_step
            dist.set_phase("save", step)
            run_dir = Path(self._get_output_dir(trial=trial))
            final = run_dir / f"checkpoint-{step}"
            tmp = run_dir / f"checkpoint-{step}{ck.PARTIAL_SUFFIX}"
            main = self.args.should_save
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            if self.hp_search_backend is None and trial is None:
                self.store_flos()
            self.save_model(str(tmp), _internal_call=True)
            if not self.args.save_only_model:
                self._save_optimizer_and_scheduler(str(tmp))
                _fault("SFT_FAULT_KILL_SAVE", step)  # the kill tests: die with half a checkpoint written
                self._save_scaler(str(tmp))
                self._save_rng_state(str(tmp))
            ds = self.train_dataset
            if hasattr(ds, "state_dict"):
                # The DataLoader may have fetched ahead: the cursor is taken at the blocks actually trained on.
                blocks = step * self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
                ck.write_json(tmp / ck.cursor_name(self.args.process_index),
                              {"global_step": step, "cursor": ds.state_dict(blocks=blocks)})
            if main:
                if self.state.best_global_step:
                    best = run_dir / f"checkpoint-{self.state.best_global_step}"
                    if best == final or best.is_dir():
                        self.state.best_model_checkpoint = str(best)
                from transformers.trainer_callback import ExportableState

                for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                    name = cb.__class__.__name__
                    if isinstance(self.state.stateful_callbacks.get(name), list):
                        self.state.stateful_callbacks[name].append(cb.state())
                    else:
                        self.state.stateful_callbacks[name] = cb.state()
                self.state.save_to_json(str(tmp / ck.TRAINER_STATE))
                if self.checkpoint_extras is not None:
                    self.checkpoint_extras(tmp)
            self.accelerator.wait_for_everyone()  # every rank's files are in tmp
            if main:
                ck.mark_complete(tmp, step)
                ck.publish(tmp, final)
                ck.rotate(run_dir, self.args.save_total_limit, final, protect=(self.state.best_model_checkpoint,))
            self.accelerator.wait_for_everyone()

        def _save(self, output_dir=None, state_dict=None):
            """transformers' ``_save`` without ``torch.save(self.args, "training_args.bin")`` (a pickle)."""
            from peft import PeftModel
            from transformers import PreTrainedModel

            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save and not getattr(self, "is_distributed_loading_by_transformers", False):
                return
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
            supported = (PreTrainedModel, PeftModel)
            if isinstance(self.model, supported):
                self.model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
            else:
                if state_dict is None:
                    state_dict = self.model.state_dict()
                unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
                if isinstance(unwrapped, supported):
                    unwrapped.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
                elif self.args.should_save:
                    from safetensors.torch import save_file

                    save_file(state_dict, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
            if self.args.should_save and self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

        def _save_optimizer_and_scheduler(self, output_dir):
            if not self._own_optimizer_format():
                return super()._save_optimizer_and_scheduler(output_dir)
            from sft import checkpoint as ck

            if self.args.should_save:  # DDP: every rank's optimizer state is the same
                ck.save_optimizer(self.optimizer, output_dir)
                ck.save_state(self.lr_scheduler.state_dict(), output_dir, ck.SCHEDULER)

        def _save_scaler(self, output_dir):
            from sft import checkpoint as ck

            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None and self.args.should_save:
                ck.save_state(scaler.state_dict(), output_dir, ck.SCALER)

        def _save_rng_state(self, output_dir):
            from sft import checkpoint as ck

            ck.save_state(ck.capture_rng(), output_dir, ck.rng_name(self.args.process_index))

        # -- checkpoint reading ------------------------------------------------------------------------------
        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None:
                return
            if not self._own_optimizer_format():
                return super()._load_optimizer_and_scheduler(checkpoint)
            from sft import checkpoint as ck

            for name in (ck.OPTIMIZER, ck.SCHEDULER):
                if not ck.has_state(checkpoint, name):
                    raise SftError(f"training.resume: {checkpoint} has no {name}.json; it cannot be resumed from")
            ck.load_optimizer(self.optimizer, checkpoint)
            self.lr_scheduler.load_state_dict(ck.load_state(checkpoint, ck.SCHEDULER))

        def _load_scaler(self, checkpoint):
            from sft import checkpoint as ck

            scaler = getattr(self.accelerator, "scaler", None)
            if checkpoint is not None and scaler is not None and ck.has_state(checkpoint, ck.SCALER):
                scaler.load_state_dict(ck.load_state(checkpoint, ck.SCALER))

        def _load_rng_state(self, checkpoint):
            if checkpoint is None:
                return
            from sft import checkpoint as ck

            name = ck.rng_name(self.args.process_index)
            if not ck.has_state(checkpoint, name):
                log.warning("resume: %s has no %s.json; the RNG streams (dropout) will differ from an "
                            "uninterrupted run", checkpoint, name)
                return
            ck.restore_rng(ck.load_state(checkpoint, name))

        def get_train_dataloader(self):
            if self.args.world_size <= 1:
                return super().get_train_dataloader()
            from torch.utils.data import DataLoader

            return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator)

        def _forward_is_collective(self) -> bool:
            """ZeRO-3 and FSDP gather parameters inside the forward: every rank must run every forward pass."""
            if self.is_fsdp_enabled:
                return True
            if self.is_deepspeed_enabled:
                from transformers.integrations import is_deepspeed_zero3_enabled

                return is_deepspeed_zero3_enabled()
            return False

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            """The evaluation loss over every rank's eval shard, weighted by labelled tokens.

            transformers' loop gathers after every batch, so ranks whose shards pack into different numbers of
            blocks wait for each other forever (the DDP-with-evaluation hang), and it averages per-batch means.
            Here the ranks agree before each batch whether any of them still has one (one tiny all-reduce), a
            rank that ran out forwards an all-masked block where the forward itself is collective (ZeRO-3, FSDP)
            and skips it otherwise, and the loss is sum(token losses) / labelled tokens over all ranks."""
            from torch.utils.data import DataLoader

            from sft.ops.attention import packed_blocks

            ds = eval_dataset if eval_dataset is not None else self.eval_dataset
            dist.set_phase("eval", self.state.global_step)
            start = time.time()
            model = self.model_wrapped if (self.is_deepspeed_enabled or self.is_fsdp_enabled) else self.model
            was_training = model.training
            model.eval()
            collective = self._forward_is_collective()
            world = self.args.world_size
            batches = iter(DataLoader(ds, batch_size=self.args.eval_batch_size, collate_fn=self.data_collator)) \
                if ds is not None else iter(())
            dummy = None
            total = torch.zeros(2, dtype=torch.float64)  # (sum of token losses, labelled tokens)
            with torch.no_grad():
                while True:
                    batch = next(batches, None)
                    if world > 1:
                        if not dist.all_reduce_max_flag(batch is not None):
                            break
                    elif batch is None:
                        break
                    if batch is None:
                        if not collective:
                            continue
                        batch = dummy if dummy is not None else _masked_block(self.args.eval_batch_size, ds.seq_length)
                    elif dummy is None:
                        dummy = {k: (torch.full_like(v, IGNORE) if k == "labels" else v.clone()) for k, v in batch.items()}
                    inputs = self._prepare_inputs(batch)
                    with self.compute_loss_context_manager(), packed_blocks():
                        loss = model(**inputs).loss
                    n = int((batch["labels"][:, 1:] != IGNORE).sum())
                    if n:
                        total += torch.tensor([float(loss) * n, n], dtype=torch.float64)
            total = dist.all_reduce_sum(total)
            if was_training:
                model.train()
            metrics = {f"{metric_key_prefix}_loss": float(total[0] / total[1]) if total[1] else float("nan"),
                       f"{metric_key_prefix}_tokens": int(total[1]),
                       f"{metric_key_prefix}_runtime": round(time.time() - start, 4)}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return ShardAwareTrainer


def _make_callback(timer: StepTimer, losses: list[float]):
    from transformers import TrainerCallback

    class ThroughputCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            timer.start()

        def on_step_begin(self, args, state, control, **kw):
            dist.set_phase("train", state.global_step + 1)

        def on_step_end(self, args, state, control, **kw):
            timer.step()
            # Fault injection for the dead-rank and resume tests: SFT_FAULT_KILL="RANK:STEP" SIGKILLs that rank at
            # the end of that step (before the step's checkpoint, if one is due, is written).
            _fault("SFT_FAULT_KILL", state.global_step)
            # SFT_FAULT_DESYNC="RANK:STEP": that rank alone evaluates after that step, a rank-dependent condition
            # that leaves it in an evaluation collective while its peers train (the desync detector's test)
            spec = os.environ.get("SFT_FAULT_DESYNC")
            if spec and [int(x) for x in spec.split(":")] == [dist.dist_info().rank, state.global_step]:
                control.should_evaluate = True

        def on_evaluate(self, args, state, control, **kw):
            timer.interrupted()

        def on_save(self, args, state, control, **kw):
            timer.interrupted()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return ThroughputCallback()


@dataclass
class _ResumePoint:
    path: Path
    step: int
    cursor: dict | None  # this rank's PackedDataset state


def _resolve_resume(cfg: RunConfig, ckpt_dir: Path, rank: int, world: int, train_rows: int) -> _ResumePoint | None:
    """The checkpoint to resume from (``training.resume``: auto = the newest complete one, or a path), checked
    against this run's settings; None to start afresh. Every rank must pick the same one."""
    from sft import checkpoint as ck

    r = cfg.training.resume
    path: Path | None = None
    if r == "auto":
        path = ck.latest_complete(ckpt_dir, warn=dist.is_main_process())
        if path is None and dist.is_main_process():
            print(f"resume=auto: no complete checkpoint in {ckpt_dir}; starting from step 0")
    elif r:
        path = Path(r)
        ck.check_resumable(path, world)
    step = ck.checkpoint_step(path) if path is not None else -1
    if step is None:  # a complete checkpoint under another name: its trainer state knows the step
        step = int(json.loads((path / ck.TRAINER_STATE).read_text())["global_step"])
    lo, hi = dist.all_reduce_min_int(step), -dist.all_reduce_min_int(-step)
    if lo != hi:
        raise SftError(f"training.resume: the ranks found different checkpoints (steps {lo} and {hi}) in {ckpt_dir}; "
                       "every rank must see the same output_dir (a shared filesystem)")
    if path is None:
        return None
    ck.check_resumable(path, world)
    ck.check_meta(path, ck.resume_meta(cfg, world, train_rows))
    state_step = int(json.loads((path / ck.TRAINER_STATE).read_text())["global_step"])
    cursor = None
    if (path / ck.cursor_name(rank)).is_file():
        saved = json.loads((path / ck.cursor_name(rank)).read_text())
        cursor = saved["cursor"]
        per_step = cfg.training.per_device_train_batch_size * cfg.training.gradient_accumulation_steps
        if saved.get("global_step") != state_step or int(cursor.get("blocks", -1)) != state_step * per_step:
            raise SftError(f"training.resume: {path / ck.cursor_name(rank)} does not match the checkpoint's step "
                           f"{state_step}; the checkpoint is damaged, resume from another one")
    return _ResumePoint(path=path, step=state_step, cursor=cursor)


def train(cfg: RunConfig) -> RunSummary:

    from sft.merging import merge_adapter, write_base_meta
    from sft.models import (count_parameters, load_model_and_tokenizer, load_tokenizer, prepare_weights, resolve_source,
                            sharded_launch)

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
    problems += __import__("sft.preflight").preflight.check_output_dir(cfg)  # training.output_dir writable
    if problems:
        raise SftError("\n".join(problems) if len(problems) == 1 else "\n  " + "\n  ".join(problems))

    # Which checkpoint to resume from, checked against this run's settings before the model is loaded.
    from sft import checkpoint as ck

    resume_meta = ck.resume_meta(cfg, world, train_src.total_rows)
    resume_point = _resolve_resume(cfg, out / "checkpoints", rank, world, train_src.total_rows)

    tokenizer = load_tokenizer(cfg.model)
    if dist.is_main_process():  # random arch: models that load from disk are written once, by one rank
        prepare_weights(cfg.model, cfg.quantization, cfg.training.seed, zero3=sharded_launch() == "DeepSpeed ZeRO-3")
    dist.barrier()
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    # Steps per epoch (every rank takes the same number: the smallest share) and whether evaluation has data,
    # from the rows' token lengths: cached per dataset version and tokenizer, counted once otherwise, not needed
    # when max_steps is set (sft.data.steps).
    from sft.data.packing import PackedDataset
    from sft.data.steps import plan_steps

    per_step = cfg.training.per_device_train_batch_size * cfg.training.gradient_accumulation_steps
    plan = plan_steps(cfg, tokenizer, train_src, eval_src, per_step, world)
    summary.data_counting = plan.counting
    steps_per_epoch = plan.steps_per_epoch or 0
    if plan.steps_per_epoch is not None and steps_per_epoch < 1 and cfg.training.max_steps <= 0:
        raise DataError(
            f"data.path: one epoch of the smallest rank's share packs into fewer blocks of {cfg.data.seq_length} "
            f"tokens than one optimizer step needs ({per_step}); lower data.seq_length or the batch size, or add data"
        )
    max_steps = cfg.training.max_steps if cfg.training.max_steps > 0 else math.ceil(cfg.training.num_epochs * steps_per_epoch)

    eval_dataset = None
    if plan.has_eval:
        eval_dataset = PackedDataset.for_source(cfg.data, tokenizer, eval_src, infinite=False)
    elif eval_src is not None and cfg.training.eval_strategy != "no" and dist.is_main_process():
        log.warning("data.eval_path holds less than one block of tokens: evaluation loss is skipped")

    def interval(strategy: str, steps: int) -> tuple[str, int]:
        if strategy == "epoch":
            return "steps", max(1, steps_per_epoch)
        return strategy, steps

    eval_strategy, eval_steps = interval(cfg.training.eval_strategy if eval_dataset is not None else "no",
                                         cfg.training.eval_steps)
    save_strategy, save_steps = interval(cfg.training.save_strategy, cfg.training.save_steps)
    ckpt_dir = out / "checkpoints"
    with _cpu_deepspeed_bf16(cfg):
        args = _training_arguments(cfg, ckpt_dir, max_steps, eval_strategy, eval_steps, save_strategy, save_steps,
                                   device)
    from sft import tracking

    args.run_name = tracking.run_name(out)  # trackers log to output_dir/logs/<run> (sft/tracking.py)
    tracking_env = contextlib.ExitStack()
    tracking_env.enter_context(tracking.environment(out, args.run_name, cfg.training.report_to))
    # The model is loaded after TrainingArguments exist: under a ZeRO-3 launch they carry the DeepSpeed config that
    # makes transformers load the weights partitioned (zero.Init), so no rank ever holds the whole model.
    model, tokenizer, source = load_model_and_tokenizer(
        cfg.model, cfg.lora, cfg.quantization, seed=cfg.training.seed, tokenizer=tokenizer,
        tokens_per_micro_batch=cfg.training.per_device_train_batch_size * cfg.data.seq_length)
    summary.trainable_params, summary.total_params = count_parameters(model)
    if cfg.training.export_gguf:  # an architecture the exporter refuses fails now, not after training
        from sft.gguf_export import check_supported

        check_supported(model.config, quantized_ok=True)
    sharded = sharded_launch()  # ZeRO-3 / FSDP: every forward is a collective of all ranks

    rows_for_accuracy: list[dict[str, str]] = []
    if cfg.training.accuracy_samples and cfg.data.eval_path:
        if dist.is_main_process():
            rows_for_accuracy = held_out_rows(cfg, cfg.training.accuracy_samples)
        if sharded is None and dist.is_main_process():
            model.to(device)
            summary.accuracy_before = accuracy(cfg, model, tokenizer, rows_for_accuracy, "accuracy before")
            print(f"held-out accuracy before training: {100 * summary.accuracy_before:.1f}% "
                  f"({len(rows_for_accuracy)} rows)")
        elif sharded is not None and dist.is_main_process():
            print(f"{sharded}: the model is sharded across ranks, so held-out accuracy is measured once, on the "
                  "merged model after training")
    timer = StepTimer(tokens_per_step=per_step * cfg.data.seq_length * world)
    losses: list[float] = []
    train_dataset = PackedDataset.for_source(cfg.data, tokenizer, train_src, infinite=True)
    train_dataset.report_overlong = plan.counting == "skipped"  # else the counting pass reported them already

    def checkpoint_extras(directory: Path) -> None:
        # every checkpoint-N carries sft_base.json, so `sft merge --adapter .../checkpoint-N` works, and what a
        # resumed run must share with it
        write_base_meta(directory, cfg.model, cfg.quantization, cfg.training.seed)
        ck.write_json(directory / ck.RESUME_META, resume_meta)

    sft_metrics = tracking.make_callback(timer, cfg.training.report_to, cfg.data.seq_length, summary.accuracy_before)
    Trainer = _make_trainer_class()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=_Collator(cfg.data.position_ids),
        callbacks=[_make_callback(timer, losses), sft_metrics],
        checkpoint_extras=checkpoint_extras,
    )
    sft_metrics.bind(trainer)
    if dist.is_main_process():
        for p in ck.remove_partials(ckpt_dir):
            log.warning("removed %s: a checkpoint whose writing was interrupted", p)
    dist.barrier()
    resume = None
    if resume_point is not None:
        if resume_point.cursor is not None:
            train_dataset.load_state_dict(resume_point.cursor)
        else:
            log.warning("resume: %s has no data cursor for rank %d; the data restarts from the beginning",
                        resume_point.path, rank)
        resume = str(resume_point.path)
        summary.resumed_from, summary.resumed_step = resume, resume_point.step
        if dist.is_main_process():
            print(f"resuming from {resume} (step {resume_point.step} of {max_steps})")
    summary.strategy = _strategy(trainer)
    if dist.is_main_process():
        print(f"strategy: {summary.strategy} ({world} rank(s))")
    t_train = time.perf_counter()
    try:
        if resume_point is not None and resume_point.step >= max_steps:
            # transformers would train one more step past max_steps: load the adapter and go on to the outputs
            from transformers.trainer_utils import TrainOutput

            if dist.is_main_process():
                print(f"{resume} is at step {resume_point.step} >= max_steps {max_steps}: nothing left to train")
            trainer._load_from_checkpoint(resume)
            result = TrainOutput(resume_point.step, float("nan"), {})
        else:
            result = trainer.train(resume_from_checkpoint=resume)
    except Exception as e:
        if world > 1:
            dist.explain_failure(e)  # names the dead peer and exits, if that is what happened
        raise
    summary.train_seconds = time.perf_counter() - t_train
    summary.steps = int(result.global_step)
    summary.packing = asdict(train_dataset.stats)
    summary.tokens = summary.steps * timer.tokens_per_step
    timing = timer.summary()
    summary.tokens_per_s = timing["tokens_per_s"]
    summary.first_step_s = timing["first_step_s"]
    summary.step_time_median_s = timing["step_time_median_s"]
    if losses:
        summary.loss_first, summary.loss_last = losses[0], losses[-1]
        summary.loss_history = losses
    if eval_dataset is not None:
        last = trainer.state.log_history[-2:] if trainer.state.log_history else []
        evaluated = [h for h in last if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        # the Trainer evaluated at the last step already (eval_steps divides max_steps): do not do it twice
        summary.eval_loss = evaluated[-1]["eval_loss"] if evaluated else trainer.evaluate().get("eval_loss")
    fpt = flops_per_token(trainer.model, cfg.data.seq_length, checkpointing_fraction(trainer.model))
    summary.model_tflops_per_s = fpt.model * summary.tokens_per_s / 1e12

    adapter_dir = out / "adapter"
    _save_adapter(trainer, tokenizer, adapter_dir, cfg)
    if dist.is_main_process():
        summary.paths["adapter"] = str(adapter_dir)
        if rows_for_accuracy and sharded is None:
            summary.accuracy_after = accuracy(cfg, trainer.model, tokenizer, rows_for_accuracy, "accuracy after")
            print(f"held-out accuracy after training: {100 * summary.accuracy_after:.1f}%")
    sft_metrics.detach()
    del trainer, model, args
    gc.collect()
    # From here rank 0 works alone (merge, reload, generation): a live ZeRO-3 config would make transformers load
    # those models partitioned (zero.Init) and every forward a collective that the other ranks never join.
    _leave_sharded_mode()

    if cfg.training.merge:
        merged_dir = out / "merged"
        dist.set_phase("merge" if dist.is_main_process() else "wait-merge")
        if dist.is_main_process():
            report = merge_adapter(adapter_dir, merged_dir, overwrite=True)
            print(f"rank {rank}: merged the adapter into {merged_dir} (logits check max |diff| {report.max_abs_diff:.2e})")
            summary.merge_max_abs_diff = report.max_abs_diff
            summary.paths["merged"] = str(merged_dir)
            q, a, acc = _check_merged(cfg, merged_dir, rows_for_accuracy)
            summary.sample_question, summary.sample_answer, summary.accuracy_merged = q, a, acc
            if cfg.training.export_gguf:
                from sft.gguf_export import export_after_merge

                summary.paths.update(export_after_merge(merged_dir, out, cfg.training.export_gguf,
                                                        progress=cfg.training.progress))
        dist.barrier()  # the other ranks wait here for rank 0's merge
    dist.stop_watchdog()

    summary.peak_rss_gb = peak_rss_bytes() / 2**30
    summary.wall_seconds = time.perf_counter() - t_start
    sft_metrics.finish({"eval_accuracy_after": summary.accuracy_after, "eval_accuracy_merged": summary.accuracy_merged,
                        "eval_merge_max_abs_diff": summary.merge_max_abs_diff})
    tracking_env.close()
    if dist.is_main_process():
        from sft.plots import save_training_plot

        title = f"sft train: {cfg.model.name}, {summary.steps} steps, {world} rank(s) ({out.name})"
        summary.paths["plot"] = str(save_training_plot(sft_metrics.history, out / "training.png", title))
        summary.paths["summary"] = str(out / "summary.json")
        _write_json(out / "summary.json", {"summary": asdict(summary), "config": cfg.to_dict(),
                                           "run": dist.run_metadata(), "timing": timing})
    return summary


def _training_arguments(cfg: RunConfig, ckpt_dir: Path, max_steps: int, eval_strategy: str, eval_steps: int,
                        save_strategy: str, save_steps: int, device: torch.device):
    from transformers import TrainingArguments

    return TrainingArguments(
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
        bf16=uses_bf16(cfg),
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
            and uses_bf16(cfg)):
        yield
        return
    import transformers.training_args as ta

    original = ta.is_torch_bf16_gpu_available
    ta.is_torch_bf16_gpu_available = lambda: True
    try:
        yield
    finally:
        ta.is_torch_bf16_gpu_available = original


def _save_adapter(trainer, tokenizer, adapter_dir: Path, cfg: RunConfig) -> None:
    """PEFT format (adapter_config.json + adapter_model.safetensors), the tokenizer, and how to rebuild the base.

    Every rank calls this: under DeepSpeed ZeRO-3 the adapter weights are partitioned and ``save_model`` gathers
    them (a collective) before the main process writes. Written to a temporary directory, then renamed."""
    import shutil

    from sft.merging import write_base_meta

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


def _strategy(trainer) -> str:
    """The parallel strategy the Trainer will really use (accelerate can silently fall back to DDP)."""
    if trainer.is_deepspeed_enabled:
        from transformers.integrations import is_deepspeed_zero3_enabled

        return "deepspeed-zero3" if is_deepspeed_zero3_enabled() else "deepspeed-zero2"
    if trainer.is_fsdp_enabled:
        return f"fsdp{getattr(trainer.accelerator.state.fsdp_plugin, 'fsdp_version', 1)}"
    return "ddp" if trainer.args.world_size > 1 else "single"


def _leave_sharded_mode() -> None:
    """Forget the DeepSpeed config that TrainingArguments registered with transformers (a process-wide setting)."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()


def _check_merged(cfg: RunConfig, merged_dir: Path, rows: list[dict[str, str]]) -> tuple[str, str, float | None]:
    """Reload the merged model the way a user would: answer one held-out question, and measure held-out accuracy
    on the same rows as before training (None without rows)."""
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
    acc = None
    if rows:
        acc = accuracy(cfg, model, tokenizer, rows, "accuracy merged", merged=True)
        print(f"held-out accuracy of the reloaded merged model: {100 * acc:.1f}%")
    return question, text.strip(), acc


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
