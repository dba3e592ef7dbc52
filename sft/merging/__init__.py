"""Merge a LoRA adapter into its base: a standalone model that ``AutoModelForCausalLM.from_pretrained`` loads.

Only rank 0 calls :func:`merge_adapter` (the trainer makes the other ranks wait at a barrier). The merge reads the
adapter from disk (``adapter_model.safetensors``), never from a live, possibly ZeRO-3-partitioned model, so nothing
has to be gathered here; an adapter saved from partitioned parameters (empty tensors) is refused.

Which base
    Training writes ``sft_base.json`` (the model and quantization sections of the run config and the seed) next to
    the adapter, and into every ``checkpoint-N`` (:mod:`sft.models.base_meta`). For a checkpoint without it, the run's
    ``adapter/sft_base.json``, ``sft_base.json`` or ``summary.json`` is used (see :func:`find_base_meta`); failing
    all of that, the adapter's own ``base_model_name_or_path``. That is what makes
    ``sft merge`` work for every model source, random-init architectures and GGUF files included.

Shard by shard (the normal path)
    The base's safetensors files are read one tensor at a time (``safe_open``, pread backend: no mapping of the
    file stays resident), every LoRA-targeted weight gets ``scale * B @ A`` added in fp32 and is cast once, and
    each output shard is streamed to disk tensor by tensor (:mod:`sft.merging.shards`), so peak memory is about the
    largest tensor (plus the adapter and the interpreter), not the model. The base's config is copied (only its
    ``dtype`` field follows the written dtype), plus generation config and tokenizer, and a
    ``model.safetensors.index.json`` for several shards. Bases with safetensors on disk: local model dirs, cached
    hub snapshots, ``arch:`` models (materialised into the cache first: :func:`sft.models.materialize_arch`,
    fp32 for the fp32 policy, bf16 otherwise) and GGUF files (their dense copy,
    :func:`sft.models.dense_copy_of_gguf`). Anything else (a hub id not in the cache, an adapter with DoRA or
    other variants this code does not reproduce, checkpoint names that differ from module names) falls back to
    the whole-model path: PEFT's ``merge_and_unload`` on the loaded base (a full copy in memory).

Which weights the adapter is added to
    The adapter was trained against what the base computed with, so that is what it is added to: the dtype
    policy's weights (bf16-rounded for the bf16 policies, fp32 for fp32), and for a 4-bit (QLoRA) base the
    *dequantized NF4* weights. For every weight that loading with ``quantization.mode=nf4`` stores in 4 bits
    (:func:`sft.models.quantized_weight_names`, asked of transformers itself), the shard's tensor is quantized with
    the same settings training used (compute-dtype cast, block size 64, double quantization) and dequantized with
    bitsandbytes (:func:`sft.models.nf4_roundtrip`): bit for bit the weight the trained model saw
    (tests/test_qlora.py checks equality with the loaded 4-bit model). Those dequantized weights, with the adapter
    added where it applies, are written in the compute dtype (bf16). Adding the adapter to the original 16-bit
    weights instead would put the 4-bit quantization error back into the model. Measured on tiny-llama (init scale
    0.1, LoRA r8 on every linear layer, random B; tests/test_qlora.py prints it), against the adapter on the 4-bit
    base (fp32 arithmetic on its dequantized weights; max |logit| 5.4): merged onto the dequantized weights, max
    |logit diff| 0.040, mean 0.0051 (the bf16 rounding of the merged weights; bitsandbytes' own bf16 4-bit forward
    is 0.089 away from the same reference); merged onto the original weights, max 1.95, mean 0.26, about 50x more.

Safety
    The model is written into a temporary sibling directory; then (unless ``check`` is off) it is reloaded and its
    logits on a few tokens are compared with the adapter model's (base as trained, fp32 arithmetic, for a 4-bit
    base the dequantized weights); only then is the directory renamed into place. Any failure (unreadable or
    corrupted adapter, an adapter that does not fit the base, non-finite weights, a logits mismatch) raises
    :class:`MergeError` and leaves neither the output nor the temporary directory. One mismatch has a remedy:
    when the bf16 merged model fails the check and the same merge written in fp32 passes it, the adapter's updates
    are smaller than bf16 can add to their weights (a short run; the demo after 4 steps), and the fp32 model is
    written instead, with a warning. A merge that is killed
    (SIGKILL, power loss) leaves only its temporary directory (``<out>.tmp-<host>-<pid>-*``), never a partial
    output; the next merge into the same output removes it once that process is gone. The check never holds two
    models: the reference logits are computed and the adapter model freed before the merged model is loaded.
    It does need one full fp32 copy of the model (~6 bytes per parameter at the peak), so ``check="auto"`` (the
    default) skips it, with a warning, when that does not fit in 70% of the available memory; ``check=True``
    forces it, ``check=False`` turns it off (``sft merge --no-check``).

Rooms: :mod:`sft.models.base_meta` (which base), :mod:`sft.merging.plan` (the adapter and its LoRA plan),
:mod:`sft.merging.shards` (the shard-by-shard merge), :mod:`sft.merging.check` (models in memory, the self-check);
this module runs them in order and owns the temporary output directory.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sft.errors import MergeError, SftError
from sft.merging.check import reference_adapter_model, check_error, estimated_check_bytes, probe_logits, merged_diff
from sft.merging.check import probe_ids, adapter_tokenizer
from sft.merging.check import want_check, load_adapter_model
from sft.models.base_meta import BASE_META, base_configs, find_base_meta, recorded_base, write_base_meta
from sft.merging.plan import Adapter, Mismatch, mismatch_error, read_adapter, Unsupported
from sft.merging.shards import INDEX, merge_shards, shard_files, shard_plan, ShardPlan, write_side_files
from sft.merging.shards import base_weights_dir

log = logging.getLogger(__name__)

__all__ = ["BASE_META", "INDEX", "MergeReport", "base_weights_dir", "find_base_meta", "load_adapter_model",
           "merge_adapter", "recorded_base", "write_base_meta"]


@dataclass
class MergeReport:
    out: str
    max_abs_diff: float
    max_abs_logit: float
    dtype: str
    seconds: float
    method: str = "shards"  # "shards" | "model"
    quantized_base: bool = False
    checked: bool = True
    shards: int = 1
    base: str = ""


# --------------------------------------------------------------------------------------------- the output dir


def _temp_prefix(out_dir: Path) -> str:
    """``<name>.tmp-<host>-<pid>-``: the temporary directory names its writer, so a later merge can tell a
    leftover of a killed merge (same host, process gone) from a merge still running."""
    import socket

    return f"{out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _remove_stale_temps(out_dir: Path) -> None:
    """Delete temporary directories of earlier merges into ``out_dir`` whose process is gone (killed mid-write)."""
    import socket

    prefix, host = f"{out_dir.name}.tmp-", socket.gethostname()
    for p in out_dir.parent.glob(prefix + "*"):
        parts = p.name[len(prefix):].rsplit("-", 2)  # host (may hold '-'), pid, mkdtemp's suffix
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or not p.is_dir():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        log.warning("merge: removing %s, left by an interrupted merge", p)
        shutil.rmtree(p, ignore_errors=True)


def _make_temp(out_dir: Path) -> tuple[Path, list[Path]]:
    """A fresh temporary sibling of ``out_dir``, and the parent folders made for it (deepest first)."""
    created = [d for d in [out_dir.parent, *out_dir.parent.parents] if not d.exists()]  # removed again on failure
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    return Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=_temp_prefix(out_dir))), created


def _failure(e: BaseException, adapter_dir: Path, out_dir: Path, tmp: Path, created: list[Path],
             base: str) -> BaseException | None:
    """Remove what the failed merge made; the error to raise instead of ``e``, or None to re-raise ``e``."""
    from sft.preflight import is_disk_full, write_failure_reason

    full = isinstance(e, Exception) and is_disk_full(e)
    why = write_failure_reason(out_dir.parent, tmp) if full else ""  # while tmp still shows it
    shutil.rmtree(tmp, ignore_errors=True)
    for d in created:  # deepest first; only folders this call made, and only while empty
        try:
            d.rmdir()
        except OSError:
            break
    if isinstance(e, Mismatch):
        return mismatch_error(adapter_dir, base, str(e))
    if full:
        return MergeError(
            f"--out {out_dir}: writing the merged model failed: {(str(e).splitlines() or [type(e).__name__])[0]}; "
            f"likely cause: {why}. Nothing was written to {out_dir}. Free space (or raise the limit) and run "
            f"again, or choose another --out"
        )
    if isinstance(e, (SftError, KeyboardInterrupt, MemoryError)) or not isinstance(e, Exception):
        return None
    return MergeError(f"merging {adapter_dir} failed: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------------- merge steps


def _check_arguments(out_dir: Path, overwrite: bool, method: str, nf4_onto: str) -> None:
    if nf4_onto not in ("dequantized", "original"):
        raise MergeError(f"nf4_onto must be dequantized or original, not {nf4_onto!r}")
    if method not in ("auto", "shards", "model"):
        raise MergeError(f"method must be auto, shards or model, not {method!r}")
    if out_dir.exists() and not overwrite:
        raise MergeError(f"{out_dir} already exists; pass --overwrite to replace it")
    from sft.preflight import unwritable_reason

    reason = unwritable_reason(out_dir.parent)  # before minutes of work, not after
    if reason is not None:
        raise MergeError(f"--out {out_dir}: cannot write the merged model there: {reason}. Choose a writable --out")


def _save_dtype(model_cfg, quant_cfg) -> torch.dtype:
    if quant_cfg.mode == "nf4":
        return torch.float32 if quant_cfg.compute_dtype == "fp32" else torch.bfloat16
    return torch.float32 if model_cfg.dtype == "fp32" else torch.bfloat16


def _choose_path(adapter: Adapter, adapter_dir: Path, method: str, model_cfg, quant_cfg, seed: int):
    """``(base_dir, plan)``: the shard plan, or None for the whole-model path (an error if ``method="shards"``)."""
    try:
        base_dir = base_weights_dir(model_cfg, quant_cfg, seed) if method != "model" else None
    except SftError as e:
        raise MergeError(f"cannot find the base {model_cfg.name} of {adapter_dir}: {e}") from e
    plan = None
    reason = "no safetensors base on disk" if base_dir is None else ""
    if base_dir is not None:
        try:
            plan = shard_plan(adapter, base_dir, quant_cfg)
        except Unsupported as e:
            reason = str(e)
    if plan is None:
        if method == "shards":
            raise MergeError(f"cannot merge {adapter_dir} shard by shard: {reason}")
        log.warning("merge: using the whole-model path (%s)", reason)
    return base_dir, plan


@dataclass
class _Reference:
    """The adapter model (kept only for the whole-model path), the probe tokens and their reference logits."""

    model: Any = None
    probe: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def _reference(adapter_dir: Path, model_cfg, quant_cfg, seed: int, base_dir: Path | None, tokenizer,
               do_check: bool, keep_model: bool) -> _Reference:
    ref = _Reference()
    if do_check or keep_model:
        model = reference_adapter_model(model_cfg, quant_cfg, seed, base_dir, adapter_dir)
        ref.probe = probe_ids(tokenizer, model.get_input_embeddings().num_embeddings)
        if do_check:
            ref.logits = probe_logits(model, ref.probe)
        if keep_model:
            ref.model = model
        else:
            model = None  # PEFT models hold reference cycles: collect now, before the merge allocates
            gc.collect()
    return ref


def _merge_whole_model(ref: _Reference, tmp: Path, save_dtype: torch.dtype, tokenizer) -> int:
    """PEFT's merge_and_unload of the adapter model (taken out of ``ref``), saved into ``tmp``; the shard count."""
    merged = ref.model.merge_and_unload()
    ref.model = None
    merged.to(save_dtype)
    merged.config.use_cache = True
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    merged = None
    gc.collect()
    return len(shard_files(tmp) or [1])


def _write_merged(plan: ShardPlan | None, ref: _Reference, tmp: Path, model_cfg, quant_cfg,
                  save_dtype: torch.dtype, tokenizer, nf4_onto: str) -> int:
    if plan is None:
        return _merge_whole_model(ref, tmp, save_dtype, tokenizer)
    shards = merge_shards(plan, tmp, model_cfg, quant_cfg, save_dtype, onto=nf4_onto)
    write_side_files(plan.base_dir, tmp, save_dtype, tokenizer)
    return shards


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                  base_override: str | None = None, check: bool | str = "auto", method: str = "auto",
                  nf4_onto: str = "dequantized") -> MergeReport:
    """Merge ``adapter_dir`` (an adapter dir or a Trainer ``checkpoint-N``) into its base and write a standalone
    model to ``out_dir``, atomically.

    ``method``: "auto" (shard by shard when the base has safetensors on disk and the adapter is plain LoRA, else the
    whole model), "shards" (error if not possible) or "model". ``check``: see the module docstring.
    ``nf4_onto``: for a 4-bit base, "dequantized" (right) or "original": add the adapter to the original 16-bit
    weights, the common mistake; only there to measure the error it causes (use with check=False)."""
    t0 = time.perf_counter()
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    _check_arguments(out_dir, overwrite, method, nf4_onto)
    adapter = read_adapter(adapter_dir)
    model_cfg, quant_cfg, seed = base_configs(adapter_dir, base_override)
    save_dtype = _save_dtype(model_cfg, quant_cfg)
    base_dir, plan = _choose_path(adapter, adapter_dir, method, model_cfg, quant_cfg, seed)
    del adapter

    tokenizer = adapter_tokenizer(adapter_dir, model_cfg)
    do_check = want_check(check, estimated_check_bytes(plan.headers) if plan else None)
    ref = _reference(adapter_dir, model_cfg, quant_cfg, seed, base_dir, tokenizer, do_check, plan is None)
    tmp, created = _make_temp(out_dir)
    try:
        shards = _write_merged(plan, ref, tmp, model_cfg, quant_cfg, save_dtype, tokenizer, nf4_onto)
        max_diff = max_ref = 0.0
        if do_check:
            max_diff, max_ref, tol = merged_diff(tmp, ref.probe, ref.logits, save_dtype)
            if not max_diff <= tol and save_dtype != torch.float32:
                # The sum base + scale * B @ A is right, but bf16 cannot hold it: updates smaller than half a bf16
                # step of their weight round away (measured: the demo after 4 of its 70 steps, learning rate still
                # warming up, moved the logits by 1.32 of 32 in bf16 and by 7e-5 in fp32). Write fp32 then, if
                # that matches; if fp32 does not match either, the merge itself is wrong.
                shutil.rmtree(tmp)
                tmp.mkdir()
                if plan is None:
                    ref.model = _reference(adapter_dir, model_cfg, quant_cfg, seed, base_dir, tokenizer, False,
                                           True).model
                shards = _write_merged(plan, ref, tmp, model_cfg, quant_cfg, torch.float32, tokenizer, nf4_onto)
                diff32, ref32, tol32 = merged_diff(tmp, ref.probe, ref.logits, torch.float32)
                if diff32 <= tol32:
                    log.warning("merge: stored in %s, the merged model's logits moved by %.3g (tolerance %.3g); in "
                                "float32 they match the adapter model's (max |diff| %.2g): the adapter's updates are "
                                "below bf16 resolution for many weights (a short or low-learning-rate run). Wrote "
                                "the merged model in float32 (twice the size).",
                                str(save_dtype).replace("torch.", ""), max_diff, tol, diff32)
                    max_diff, max_ref, tol, save_dtype = diff32, ref32, tol32, torch.float32
            if not max_diff <= tol:
                raise check_error(max_diff, tol)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException as e:
        err = _failure(e, adapter_dir, out_dir, tmp, created, model_cfg.name)
        if err is None:
            raise
        raise err from e
    return MergeReport(
        out=str(out_dir), max_abs_diff=max_diff, max_abs_logit=max_ref, dtype=str(save_dtype).replace("torch.", ""),
        seconds=time.perf_counter() - t0, method="shards" if plan is not None else "model",
        quantized_base=quant_cfg.mode == "nf4", checked=do_check, shards=shards,
        base=str(base_dir) if base_dir else model_cfg.name,
    )
