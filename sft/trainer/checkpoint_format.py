"""Crash-safe, pickle-free training checkpoints: what a ``checkpoint-N`` holds, how it is written, how it is found.

Layout of ``<output_dir>/checkpoints/checkpoint-N`` (every file JSON or safetensors; nothing needs ``torch.load``)::

    adapter_model.safetensors, adapter_config.json   the LoRA adapter (PEFT format; `sft merge --adapter` takes it)
    sft_base.json                                    which base the adapter belongs to (see sft.merging)
    optimizer.safetensors + optimizer.json           the optimizer's state_dict: tensors / everything else
    scheduler.json                                   the LR scheduler's state_dict
    scaler.json                                      the fp16 grad scaler's state (only with a scaler)
    rng_state_rank{R}.safetensors + .json            python, numpy, torch CPU (and CUDA) RNG states of rank R
    data_cursor_rank{R}.json                         rank R's PackedDataset cursor after the blocks it trained on
    trainer_state.json                               transformers' TrainerState (global step, log history)
    sft_resume.json                                  the settings a resumed run must share (sft/trainer/resume.py)
    COMPLETE                                         written last (fsync'd): the checkpoint is whole

Atomicity. A checkpoint is written into ``checkpoint-N.partial`` by every rank; after a barrier, rank 0 fsyncs the
files, writes ``COMPLETE`` (fsync), renames the directory to ``checkpoint-N`` (fsyncs the parent) and only then
rotates old checkpoints. A process killed at any point leaves either the previous checkpoints untouched plus a
``*.partial`` directory (ignored, removed by the next run) or a complete ``checkpoint-N``. Readers only trust a
directory named ``checkpoint-N`` that holds ``COMPLETE``.

Serialisation (:func:`save_state` / :func:`load_state`): a nested state (dicts, lists, tuples, tensors, numpy arrays,
numbers, strings) becomes a JSON tree in which every tensor is a reference ``{"__tensor__": key}`` into a
safetensors file; tuples, dicts with non-string keys (the optimizer's integer parameter ids), numpy arrays and
dtypes are tagged so that they come back as they were. Anything else is refused (no silent pickling).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sft.io import atomic_file, atomic_write_json

log = logging.getLogger(__name__)


COMPLETE = "COMPLETE"
PARTIAL_SUFFIX = ".partial"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
SCALER = "scaler"
RESUME_META = "sft_resume.json"
TRAINER_STATE = "trainer_state.json"
PICKLED_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "training_args.bin")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def rng_name(rank: int) -> str:
    return f"rng_state_rank{rank}"


def cursor_name(rank: int) -> str:
    return f"data_cursor_rank{rank}.json"


# --------------------------------------------------------------------------------------------- (de)serialisation


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        if key in tensors:
            raise ValueError(f"duplicate tensor key {key}")
        t = obj.detach()
        tensors[key] = t.to("cpu", copy=True).contiguous() if t.device.type != "cpu" else t.clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in obj)
        if plain:
            return {k: _encode(v, f"{path}.{k}" if path else k, tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"{path or 'state'}: dict key {k!r} of type {type(k).__name__} cannot be stored")
            items.append([k, _encode(v, f"{path}.{k}" if path else str(k), tensors)])
        return {"__dict__": items}
    raise TypeError(
        f"{path or 'state'}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored without pickle"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"]).reshape(obj["shape"])
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def encode_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``state`` -> (a JSON-serialisable tree, {key: tensor}) (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(state, "", tensors), tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    return _decode(tree, tensors)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems do not support fsync on directories
        pass


def save_state(state: Any, directory: str | Path, name: str) -> list[Path]:
    """Write ``state`` as ``name.json`` (+ ``name.safetensors`` when it holds tensors); returns the files."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tree, tensors = encode_state(state)
    written = []
    if tensors:
        st = directory / f"{name}.safetensors"
        with atomic_file(st, fsync=True) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        written.append(st)
    atomic_write_json(directory / f"{name}.json", {"format": "sft-state-1", "tensors": bool(tensors), "state": tree},
                      fsync=True)
    written.append(directory / f"{name}.json")
    return written


def has_state(directory: str | Path, name: str) -> bool:
    return (Path(directory) / f"{name}.json").is_file()


def load_state(directory: str | Path, name: str) -> Any:
    """Read what :func:`save_state` wrote (tensors on the CPU)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    doc = json.loads((directory / f"{name}.json").read_text())
    tensors = load_file(str(directory / f"{name}.safetensors")) if doc.get("tensors") else {}
    return decode_state(doc["state"], tensors)


# --------------------------------------------------------------------------------------------- optimizer, RNG


def save_optimizer(optimizer, directory: str | Path) -> list[Path]:
    return save_state(optimizer.state_dict(), directory, OPTIMIZER)


def load_optimizer(optimizer, directory: str | Path) -> None:
    """``optimizer.load_state_dict`` from :func:`save_optimizer`'s files (it moves the state to the params' device)."""
    optimizer.load_state_dict(load_state(directory, OPTIMIZER))


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another number of visible devices: this process's device gets its own saved state if there is one
            dev = torch.cuda.current_device()
            if dev < len(cuda):
                torch.cuda.set_rng_state(cuda[dev])


# --------------------------------------------------------------------------------------------- directories


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def mark_complete(path: str | Path, step: int) -> None:
    """fsync every file of ``path``, then write ``COMPLETE`` (fsync'd) and fsync the directory."""
    path = Path(path)
    for p in sorted(path.rglob("*")):
        if p.is_file():
            _fsync_file(p)
    for p in sorted({q.parent for q in path.rglob("*")} | {path}, reverse=True):
        fsync_dir(p)
    atomic_write_json(path / COMPLETE, {"step": step}, fsync=True)
    fsync_dir(path)


def checkpoint_step(path: str | Path) -> int | None:
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """``[(step, path, complete)]`` of the ``checkpoint-N`` directories, by step."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        step = checkpoint_step(p)
        if step is not None and p.is_dir():
            out.append((step, p, is_complete(p)))
    return sorted(out)


def latest_complete(ckpt_dir: str | Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint; incomplete ones (killed mid-write, or older formats) are skipped, with a
    warning when they are newer than the one returned."""
    found = list_checkpoints(ckpt_dir)
    best = None
    for step, path, complete in found:
        if complete:
            best = (step, path)
    if warn:
        for step, path, complete in found:
            if not complete and (best is None or step > best[0]):
                log.warning("resume: skipping %s: incomplete (no %s marker; the run stopped while writing it, or "
                            "it was written by an older version)", path, COMPLETE)
    return best[1] if best else None


def remove_partials(ckpt_dir: str | Path, keep: set[str] | frozenset = frozenset()) -> list[Path]:
    """Delete ``checkpoint-*.partial`` (and ``checkpoint-*.old``, see :func:`publish`) leftovers of interrupted
    saves (call on the main process only)."""
    ckpt_dir = Path(ckpt_dir)
    removed = []
    if ckpt_dir.is_dir():
        for p in sorted([*ckpt_dir.glob(f"checkpoint-*{PARTIAL_SUFFIX}"), *ckpt_dir.glob("checkpoint-*.old")]):
            if p.name not in keep and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def publish(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` into place as ``final`` (replacing an older ``final``), durably."""
    if not is_complete(tmp):
        raise RuntimeError(f"{tmp} is not complete; refusing to publish it")
    old = None
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def rotate(ckpt_dir: str | Path, limit: int | None, newest: Path, protect: tuple[str | Path | None, ...] = ()) -> list[Path]:
    """Keep at most ``limit`` complete checkpoints: delete the oldest (by step) others; never ``newest`` (the one
    just written) nor anything in ``protect`` (e.g. the best checkpoint). Incomplete directories are not counted
    and not touched here."""
    if limit is None or limit <= 0:
        return []
    newest = Path(newest).resolve()
    keep = {newest} | {Path(p).resolve() for p in protect if p}
    complete = [p.resolve() for _, p, ok in list_checkpoints(ckpt_dir) if ok]
    others = [p for p in complete if p != newest]
    order = others + ([newest] if newest in complete else [])  # the newest counts as the latest whatever its step
    excess = len(order) - max(limit, 1)
    removed = []
    for p in order:
        if excess <= 0:
            break
        if p in keep:
            continue
        log.info("deleting older checkpoint %s (save_total_limit=%s)", p, limit)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        excess -= 1
    return removed


# --------------------------------------------------------------------------------------------- resume checks
