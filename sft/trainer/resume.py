"""Resuming: which checkpoint a run continues from, and the settings it must share with it.

``training.resume``: ``auto`` (the newest complete checkpoint in output_dir) or a checkpoint path. Every setting in
:data:`RESUME_KEYS` is recorded in each checkpoint's ``sft_resume.json``; a run that differs in any of them is
refused with a message naming each difference and the value to set, before the model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft import distributed as dist
from sft.config import RunConfig
from sft.errors import SftError
from sft.trainer.checkpoint_format import (COMPLETE, OPTIMIZER, PICKLED_FILES, RESUME_META, SCHEDULER, TRAINER_STATE,
                                    checkpoint_step, cursor_name, is_complete, latest_complete)


def check_resumable(path: str | Path, world_size: int) -> None:
    """Raise :class:`SftError` naming ``path`` when it is not a complete checkpoint this code can resume from."""
    path = Path(path)
    if not path.is_dir():
        raise SftError(f"training.resume: checkpoint {path} does not exist (use resume=auto for the newest one)")
    if not is_complete(path):
        pickles = [n for n in PICKLED_FILES if (path / n).exists()]
        why = (f"it holds pickled state ({', '.join(pickles)}) from an older version, which is never unpickled"
               if pickles else "the run stopped while writing it")
        raise SftError(
            f"training.resume: checkpoint {path} is incomplete (no {COMPLETE} marker: {why}); "
            f"resume from an earlier checkpoint, or use resume=auto for the newest complete one"
        )
    fmt = "sft"
    if (path / RESUME_META).is_file():
        fmt = json.loads((path / RESUME_META).read_text())["keys"].get("optimizer_format", "sft")
    state_files = ENGINE_FILES.get(fmt, (f"{OPTIMIZER}.json", f"{SCHEDULER}.json"))
    missing = [n for n in (TRAINER_STATE, RESUME_META, *state_files) if not (path / n).is_file()]
    missing += [cursor_name(r) for r in range(world_size) if not (path / cursor_name(r)).is_file()]
    if missing and (path / RESUME_META).is_file():
        saved_world = json.loads((path / RESUME_META).read_text()).get("world_size")
        if saved_world != world_size:
            return  # the world-size mismatch is reported by check_meta, with the fix
    if missing:
        raise SftError(f"training.resume: checkpoint {path} lacks {', '.join(missing)}; it cannot be resumed from")

#: Settings a resumed run must share with the checkpoint, and why.
RESUME_KEYS = {
    "model.name": "the adapter belongs to this base",
    "model.gguf_file": "the adapter belongs to this base",
    "model.dtype": "the adapter and optimizer state were trained with this dtype policy",
    "quantization.mode": "the adapter was trained against this (quantized) base",
    "lora.r": "the adapter's shape",
    "lora.alpha": "the adapter's scale",
    "lora.target_modules": "the adapter's modules",
    "data.seq_length": "the data cursor and the step arithmetic count blocks of this length; the packed stream "
                       "could be cut differently, but resuming requires the same value",
    "data.template": "the data cursor counts tokens of this formatting",
    "data.answer_only": "the data cursor counts tokens of this formatting",
    "data.overlong": "the data cursor counts tokens after this policy",
    "data.shuffle": "the data order",
    "data.order": "the data cursor is a position in this row order",
    "data.train_rows": "the data cursor points into this dataset",
    "training.seed": "the data order and the initial adapter",
    "training.per_device_train_batch_size": "the data cursor counts blocks per step",
    "training.gradient_accumulation_steps": "the data cursor counts blocks per step",
    "world_size": "every rank has its own data shard and cursor",
    "optimizer_format": "the optimizer state is in this strategy's format (sft: DDP / one process; deepspeed and "
                        "fsdp: their engines' own); relaunch with the same accelerate config",
}

#: Files that hold the optimizer state of a checkpoint, by ``optimizer_format`` (DeepSpeed and FSDP write their own:
#: DeepSpeed a ``latest`` tag and ``global_stepN/`` of torch files, FSDP2 torch.distributed.checkpoint shards).
ENGINE_FILES = {"deepspeed": ("latest", "scheduler.pt"), "fsdp": ("scheduler.pt",)}

#: What a checkpoint that predates a key meant by it (checkpoints written before the key existed).
_BEFORE_KEY = {"data.order": "block-shuffle (sft before the global permutation)"}


def _data_order() -> str:
    from sft.data.source import ORDER

    return ORDER


def optimizer_format() -> str:
    """Which format this process's Trainer writes optimizer state in, from what ``accelerate launch`` exported."""
    return "deepspeed" if dist.deepspeed_launch() else "fsdp" if dist.fsdp_launch() else "sft"


def resume_meta(cfg, world_size: int, train_rows: int) -> dict[str, Any]:
    """The :data:`RESUME_KEYS` of a run (``cfg`` a RunConfig, after dtype resolution)."""
    flat = {
        "model.name": cfg.model.name, "model.gguf_file": cfg.model.gguf_file, "model.dtype": cfg.model.dtype,
        "quantization.mode": cfg.quantization.mode, "lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha,
        "lora.target_modules": list(cfg.lora.target_modules), "data.seq_length": cfg.data.seq_length,
        "data.template": cfg.data.template, "data.answer_only": cfg.data.answer_only,
        "data.overlong": cfg.data.overlong, "data.shuffle": cfg.data.shuffle,
        "data.train_rows": train_rows, "training.seed": cfg.training.seed,
        "training.per_device_train_batch_size": cfg.training.per_device_train_batch_size,
        "training.gradient_accumulation_steps": cfg.training.gradient_accumulation_steps,
        "world_size": world_size, "optimizer_format": optimizer_format(), "data.order": _data_order(),
    }
    return {"keys": flat, "data.path": cfg.data.path}


def check_meta(path: str | Path, current: dict[str, Any]) -> None:
    """Raise :class:`SftError` naming every setting in which the run differs from the checkpoint at ``path``."""
    path = Path(path)
    saved = json.loads((path / RESUME_META).read_text())
    problems = []
    for key, why in RESUME_KEYS.items():
        a, b = saved["keys"].get(key, _BEFORE_KEY.get(key)), current["keys"].get(key)
        if a is None and key not in saved["keys"]:
            continue
        if a != b:
            if key == "world_size":
                problems.append(f"world size: the checkpoint was written by {a} rank(s), this run has {b} ({why}); "
                                f"launch {a} rank(s)")
            elif key == "data.train_rows":
                problems.append(f"data.path: the checkpoint's training data had {a} rows, {current.get('data.path')} "
                                f"has {b} ({why}); resume on the same dataset")
            else:
                problems.append(f"{key}: the checkpoint has {a!r}, this run {b!r}; set {key}={a!r} ({why})")
    if problems:
        raise SftError(
            f"training.resume: checkpoint {path} does not match this run:\n  " + "\n  ".join(problems)
            + "\n  (or start afresh in another training.output_dir)"
        )


@dataclass
class ResumePoint:
    path: Path
    step: int
    cursor: dict | None  # this rank's PackedDataset state


def resolve_resume(cfg: RunConfig, ckpt_dir: Path, rank: int, world: int, train_rows: int) -> ResumePoint | None:
    """The checkpoint to resume from (``training.resume``: auto = the newest complete one, or a path), checked
    against this run's settings; None to start afresh. Every rank must pick the same one."""
    r = cfg.training.resume
    path: Path | None = None
    if r == "auto":
        path = latest_complete(ckpt_dir, warn=dist.is_main_process())
        if path is None and dist.is_main_process():
            print(f"resume=auto: no complete checkpoint in {ckpt_dir}; starting from step 0")
    elif r:
        path = Path(r)
        check_resumable(path, world)
    step = checkpoint_step(path) if path is not None else -1
    if step is None:  # a complete checkpoint under another name: its trainer state knows the step
        step = int(json.loads((path / TRAINER_STATE).read_text())["global_step"])
    lo, hi = dist.all_reduce_min_int(step), -dist.all_reduce_min_int(-step)
    if lo != hi:
        raise SftError(f"training.resume: the ranks found different checkpoints (steps {lo} and {hi}) in {ckpt_dir}; "
                       "every rank must see the same output_dir (a shared filesystem)")
    if path is None:
        return None
    check_resumable(path, world)
    check_meta(path, resume_meta(cfg, world, train_rows))
    state_step = int(json.loads((path / TRAINER_STATE).read_text())["global_step"])
    cursor = None
    if (path / cursor_name(rank)).is_file():
        saved = json.loads((path / cursor_name(rank)).read_text())
        cursor = saved["cursor"]
        per_step = cfg.training.per_device_train_batch_size * cfg.training.gradient_accumulation_steps
        if saved.get("global_step") != state_step or int(cursor.get("blocks", -1)) != state_step * per_step:
            raise SftError(f"training.resume: {path / cursor_name(rank)} does not match the checkpoint's step "
                           f"{state_step}; the checkpoint is damaged, resume from another one")
    return ResumePoint(path=path, step=state_step, cursor=cursor)
