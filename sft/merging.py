"""Merge a LoRA adapter into its base: a standalone model that ``AutoModelForCausalLM.from_pretrained`` loads.

Only rank 0 calls :func:`merge_adapter` (the trainer makes the other ranks wait at a barrier). The merge reads the
adapter from disk (``adapter_model.safetensors``), never from a live, possibly ZeRO-3-partitioned model, so nothing
has to be gathered here; an adapter saved from partitioned parameters (empty tensors) is refused.

Which base
    Training writes ``sft_base.json`` (the model and quantization sections of the run config and the seed) next to
    the adapter, and into every ``checkpoint-N`` when the trainer has :func:`base_meta_callback`. For a checkpoint
    without it, the run's ``adapter/sft_base.json``, ``sft_base.json`` or ``summary.json`` is used (see
    :func:`find_base_meta`); failing all of that, the adapter's own ``base_model_name_or_path``. That is what makes
    ``sft merge`` work for every model source, random-init architectures and GGUF files included.

Shard by shard (the normal path)
    The base's safetensors files are read one tensor at a time (``safe_open``, pread backend: no mapping of the
    file stays resident), every LoRA-targeted weight gets ``scale * B @ A`` added in fp32 and is cast once, and
    each output shard is streamed to disk tensor by tensor (:class:`_ShardWriter`), so peak memory is about the
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
    :class:`MergeError` and leaves neither the output nor the temporary directory. A merge that is killed
    (SIGKILL, power loss) leaves only its temporary directory (``<out>.tmp-<host>-<pid>-*``), never a partial
    output; the next merge into the same output removes it once that process is gone. The check never holds two
    models: the reference logits are computed and the adapter model freed before the merged model is loaded.
    It does need one full fp32 copy of the model (~6 bytes per parameter at the peak), so ``check="auto"`` (the
    default) skips it, with a warning, when that does not fit in 70% of the available memory; ``check=True``
    forces it, ``check=False`` turns it off (``sft merge --no-check``).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from sft.errors import MergeError, SftError

log = logging.getLogger(__name__)

BASE_META = "sft_base.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INDEX = "model.safetensors.index.json"
CHECK_MEMORY_FRACTION = 0.7

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _ST_NAMES[{"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}[_name]] = getattr(torch, _name)
        _ST_DTYPES[getattr(torch, _name)] = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}[_name]


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


class _Unsupported(Exception):
    """The shard-by-shard path cannot reproduce this adapter / base: use the whole-model path."""


# --------------------------------------------------------------------------------------------- base meta


def write_base_meta(adapter_dir: str | Path, model_cfg, quant_cfg, seed: int) -> None:
    meta = {"model": asdict(model_cfg), "quantization": asdict(quant_cfg), "seed": seed}
    Path(adapter_dir, BASE_META).write_text(json.dumps(meta, indent=2))


def base_meta_callback(model_cfg, quant_cfg, seed: int):
    """A Trainer callback that writes ``sft_base.json`` into every ``checkpoint-N`` it saves (world rank 0), so
    that ``sft merge --adapter .../checkpoint-N`` knows the base even when the run never finished."""
    from transformers import TrainerCallback

    class BaseMetaCallback(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    write_base_meta(ckpt, model_cfg, quant_cfg, seed)

    return BaseMetaCallback()


def _from_dict(cls, d: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in (d or {}).items() if k in names})


def find_base_meta(adapter_dir: str | Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The base description for an adapter dir: ``(meta, where_found)`` or ``(None, None)``.

    Looks at ``adapter_dir/sft_base.json``, then, for a Trainer checkpoint (``<run>/checkpoints/checkpoint-N``),
    the run's ``adapter/sft_base.json``, ``sft_base.json`` and ``summary.json`` (its ``config``), and finally the
    adapter dir's parent's ``sft_base.json``."""
    adapter_dir = Path(adapter_dir)
    candidates = [adapter_dir / BASE_META]
    runs = []
    if adapter_dir.name.startswith("checkpoint-"):
        parent = adapter_dir.parent
        runs.append(parent.parent if parent.name == "checkpoints" else parent)
    runs.append(adapter_dir.parent)
    for run in runs:
        candidates += [run / "adapter" / BASE_META, run / BASE_META, run / "summary.json"]
    for path in candidates:
        if not path.is_file() or path.resolve() == (adapter_dir / "adapter_config.json").resolve():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if path.name == "summary.json":
            cfg = data.get("config") or {}
            if "model" not in cfg:
                continue
            data = {"model": cfg["model"], "quantization": cfg.get("quantization", {}),
                    "seed": (cfg.get("training") or {}).get("seed", 42)}
        if isinstance(data, dict) and "model" in data:
            return data, path
    return None, None


def recorded_base(adapter_dir: str | Path) -> str | None:
    """The base model name recorded with an adapter (``sft_base.json`` & co., else ``base_model_name_or_path``), or
    None when nothing is recorded or the directory is unreadable."""
    meta, _ = find_base_meta(adapter_dir)
    if meta is not None:
        name = (meta.get("model") or {}).get("name")
        return name if isinstance(name, str) and name else None
    try:
        name = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


class _Mismatch(MergeError):
    """The adapter's tensors do not fit the base's (re-raised by merge_adapter with both names)."""


def _mismatch_error(adapter_dir: Path, base: str, detail: str) -> MergeError:
    trained = recorded_base(adapter_dir)
    on = f" (trained on {trained})" if trained else ""
    detail = detail.strip().rstrip(".")
    if len(detail) > 300:  # PEFT lists every missing module
        detail = detail[:300] + "..."
    fix = (f"Merge onto the base it was trained on: drop --base, or pass --base {trained}" if trained and trained != base
           else "Pass the base it was trained on (--base)")
    return MergeError(f"the adapter in {adapter_dir}{on} does not fit the base {base}: {detail}. {fix}")


def _check_adapter_files(adapter_dir: Path) -> None:
    """The adapter directory exists and holds adapter_config.json and safetensors weights (never a pickle)."""
    if not adapter_dir.exists():
        raise MergeError(
            f"--adapter {adapter_dir} does not exist; pass a run's adapter directory (OUTPUT_DIR/adapter) or one of "
            f"its checkpoints (OUTPUT_DIR/checkpoints/checkpoint-N)"
        )
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MergeError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        extra = " (adapter_model.bin is never unpickled; re-save it as safetensors)" if (
            adapter_dir / "adapter_model.bin").exists() else ""
        raise MergeError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}{extra}")


def _base_configs(adapter_dir: Path, base_override: str | None = None):
    from sft.config import ModelConfig, QuantizationConfig

    meta, _ = find_base_meta(adapter_dir)
    if meta is not None:
        model_cfg = _from_dict(ModelConfig, meta["model"])
        quant_cfg = _from_dict(QuantizationConfig, meta.get("quantization", {}))
        seed = int(meta.get("seed", 42))
    else:
        try:
            cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        except (OSError, ValueError) as e:
            raise MergeError(f"{adapter_dir}: cannot read adapter_config.json: {e}") from e
        name = cfg.get("base_model_name_or_path")
        if not name and not base_override:
            raise MergeError(
                f"{adapter_dir}: no {BASE_META} (here or in its run directory) and no base_model_name_or_path in "
                f"adapter_config.json; cannot tell which base this adapter belongs to. Pass --base"
            )
        model_cfg, quant_cfg, seed = ModelConfig(name=name or base_override), QuantizationConfig(), 42
    if base_override:
        model_cfg.name = base_override
        model_cfg.gguf_file = None
    if model_cfg.dtype == "auto":  # training records the resolved policy; this is for hand-written metadata
        from sft import models

        resolve = getattr(models, "resolve_dtype_policy", None)
        model_cfg.dtype = resolve("auto") if resolve else "bf16-mixed"
    return model_cfg, quant_cfg, seed


# --------------------------------------------------------------------------------------------- the adapter


@dataclass
class _Adapter:
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_FLAGS = ("use_dora", "use_qalora", "lora_bias", "use_bdlora")
_UNSUPPORTED_FIELDS = ("layer_replication", "target_parameters", "trainable_token_indices", "alora_invocation_tokens",
                       "megatron_config", "arrow_config", "kasa_config", "monteclora_config", "velora_config")


def _read_adapter(adapter_dir: Path) -> _Adapter:
    from safetensors import safe_open

    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / ADAPTER_WEIGHTS
    _check_adapter_files(adapter_dir)
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise MergeError(f"{cfg_path}: not valid JSON ({e})") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{adapter_dir}: a {config.get('peft_type')} adapter; only LoRA adapters are merged")
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / garbled files
        raise MergeError(f"{weights} is corrupted or unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not tensors:
        raise MergeError(f"{weights} holds no tensors")
    for k, t in tensors.items():
        if t.numel() == 0:
            raise MergeError(
                f"{weights}: tensor {k} is empty: the adapter was saved from ZeRO-3-partitioned parameters "
                f"without gathering them (save with trainer.save_model on every rank)"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise MergeError(f"{weights}: tensor {k} holds NaN or Inf values; the adapter is corrupted")
    return _Adapter(config, tensors)


def _lora_plan(adapter: _Adapter, base_keys: set[str]):
    """{base weight name: (A, B, scale, fan_in_fan_out)} and {base tensor name: replacement} for the shard path."""
    cfg = adapter.config
    for flag in _UNSUPPORTED_FLAGS:
        if cfg.get(flag):
            raise _Unsupported(f"adapter uses {flag}")
    for name in _UNSUPPORTED_FIELDS:
        if cfg.get(name) not in (None, {}, []):
            raise _Unsupported(f"adapter sets {name}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, t in adapter.tensors.items():
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = t
            continue
        plain = key.removeprefix("base_model.model.")
        if plain in base_keys:  # a trained bias, or a module saved whole (modules_to_save)
            replacements[plain] = t
            continue
        raise _Unsupported(f"adapter tensor {key} is neither a LoRA A/B weight nor a base tensor")
    from peft.utils.other import get_pattern_key

    alpha_pattern = cfg.get("alpha_pattern") or {}
    deltas = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise MergeError(f"the adapter has lora_{'A' if 'B' in ab else 'B'} but not its pair for {module}")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2:
            raise _Unsupported(f"{module}: LoRA weights of rank {a.ndim} (convolution or embedding targets)")
        if a.shape[0] != b.shape[1]:
            raise MergeError(f"{module}: lora_A is {tuple(a.shape)} but lora_B is {tuple(b.shape)}; the adapter is corrupted")
        target = f"{module}.weight"
        if target not in base_keys:
            raise _Unsupported(f"the base checkpoint has no tensor {target}")
        r = a.shape[0]
        alpha = float(alpha_pattern[get_pattern_key(alpha_pattern.keys(), module)]) if alpha_pattern and \
            get_pattern_key(alpha_pattern.keys(), module) in alpha_pattern else float(cfg.get("lora_alpha", 8))
        scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
        deltas[target] = (a, b, scale, bool(cfg.get("fan_in_fan_out")))
    if not deltas and not replacements:
        raise MergeError("the adapter holds no LoRA weights")
    return deltas, replacements


# --------------------------------------------------------------------------------------------- the base on disk


def _shard_files(model_dir: Path) -> list[str] | None:
    """The base's safetensors shard file names, or None when it has none (complete) on disk."""
    index = model_dir / INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError):
            return None
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    return files if all((model_dir / f).is_file() for f in files) else None


def base_weights_dir(model_cfg, quant_cfg, seed: int) -> Path | None:
    """A directory holding the base's config and safetensors weights (as the run trained against), or None.

    ``arch:`` models are materialised into the cache (fp32 for the fp32 policy without quantization, else bf16),
    GGUF files get their dense copy, hub ids are looked up in the local cache only."""
    from sft.models import dense_copy_of_gguf, materialize_arch, resolve_source

    source = resolve_source(model_cfg)
    if source.kind == "arch":
        dtype = torch.float32 if (model_cfg.dtype == "fp32" and quant_cfg.mode != "nf4") else torch.bfloat16
        path = materialize_arch(source.path, seed, dtype=dtype)
    elif source.kind == "gguf":
        path = dense_copy_of_gguf(source.path, source.gguf_file)
    elif source.kind == "local":
        path = Path(source.path)
    else:
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source.path, revision=model_cfg.revision, local_files_only=True))
        except Exception:  # not (completely) cached
            return None
    path = Path(path)
    if not (path / "config.json").is_file() or _shard_files(path) is None:
        return None
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("quantization_config"):  # a pre-quantized checkpoint: its tensors are not plain weights
        return None
    return path


class _ShardWriter:
    """Writes one safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets) is known up front,
    so no shard is ever held in memory."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self.expected = []
        for name, dtype, shape in specs:
            n = 1
            for d in shape:
                n *= d
            nbytes = n * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.nbytes = offset
        self.f = open(path, "wb")
        self.f.write(len(raw).to_bytes(8, "little"))
        self.f.write(raw)
        self.i = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        exp_name, dtype, shape, nbytes = self.expected[self.i]
        if name != exp_name or t.dtype != dtype or tuple(t.shape) != shape:
            raise MergeError(f"internal: shard writer expected {exp_name} {dtype} {shape}, got {name} {t.dtype} {tuple(t.shape)}")
        if nbytes:
            buf = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            self.f.write(memoryview(buf))
        self.i += 1

    def close(self) -> None:
        self.f.close()
        if self.i != len(self.expected):
            raise MergeError(f"internal: shard writer got {self.i} of {len(self.expected)} tensors")


def _open_shard(path: Path):
    from safetensors import safe_open

    try:  # pread: tensors are read into their own buffers; no mapping of the file stays resident
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.8
        return safe_open(str(path), framework="pt")


def _shard_headers(base_dir: Path, files: list[str]) -> dict[str, list[tuple[str, str, tuple[int, ...]]]]:
    out = {}
    for name in files:
        with _open_shard(base_dir / name) as f:
            specs = []
            for k in f.keys():
                s = f.get_slice(k)
                specs.append((k, s.get_dtype(), tuple(s.get_shape())))
            out[name] = specs
    return out


def _train_dtype(policy: str, ndim: int) -> torch.dtype:
    if policy == "fp32":
        return torch.float32
    if policy == "bf16-mixed" and ndim <= 1:
        return torch.float32
    return torch.bfloat16


def _merge_shards(base_dir: Path, files: list[str], headers, out_dir: Path, deltas, replacements, model_cfg, quant_cfg,
                  save_dtype: torch.dtype, quantized_names: set[str], onto: str = "dequantized") -> int:
    """Write the merged model's safetensors (and index) into ``out_dir``; returns the number of shards."""
    from sft.models import nf4_roundtrip

    quantized = quant_cfg.mode == "nf4"
    n = len(files)
    out_names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    done: set[str] = set()
    for src_name, dst_name in zip(files, out_names):
        specs = []
        for key, st_dtype, shape in headers[src_name]:
            if st_dtype not in _ST_NAMES:
                raise _Unsupported(f"{src_name}: tensor {key} has dtype {st_dtype}")
            dt = _ST_NAMES[st_dtype]
            specs.append((key, save_dtype if dt.is_floating_point else dt, shape))
        writer = _ShardWriter(out_dir / dst_name, specs)
        try:
            with _open_shard(base_dir / src_name) as f:
                for key, _, _ in specs:
                    t = f.get_tensor(key)
                    if t.is_floating_point():
                        if quantized:
                            dequantize = key in quantized_names and onto == "dequantized"
                            w = nf4_roundtrip(t, quant_cfg) if dequantize else t.to(save_dtype)
                        else:
                            w = t.to(_train_dtype(model_cfg.dtype, t.ndim))
                        del t
                        if key in deltas:
                            a, b, scale, fan_in_fan_out = deltas[key]
                            delta = b.float() @ a.float()
                            if fan_in_fan_out:
                                delta = delta.T
                            if delta.shape != w.shape:
                                raise _Mismatch(
                                    f"{key} is {tuple(w.shape)} in the base but the adapter's B@A is "
                                    f"{tuple(delta.shape)}"
                                )
                            w = w.float().add_(delta, alpha=scale)
                            del delta
                            if not torch.isfinite(w).all():
                                raise MergeError(f"merged weight {key} is not finite")
                            done.add(key)
                        elif key in replacements:
                            r = replacements[key]
                            if r.shape != w.shape:
                                raise _Mismatch(f"the adapter's {key} is {tuple(r.shape)}, the base's {tuple(w.shape)}")
                            w = r
                            done.add(key)
                        w = w.to(save_dtype)
                    else:
                        w = t
                    writer.write(key, w)
                    weight_map[key] = dst_name
                    del w
        except BaseException:
            writer.f.close()
            raise
        writer.close()
        total += writer.nbytes
        _fault_after_shard(out_names.index(dst_name) + 1)
    missing = (set(deltas) | set(replacements)) - done
    if missing:
        raise _Mismatch(f"the base has no tensors for adapter weights {sorted(missing)[:3]}")
    if n > 1:
        (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return n


def _write_side_files(base_dir: Path | None, out_dir: Path, save_dtype: torch.dtype, tokenizer) -> None:
    """config.json as the base's (its ``dtype`` set to what was written), generation config, tokenizer."""
    cfg = json.loads((base_dir / "config.json").read_text())
    name = str(save_dtype).replace("torch.", "")
    for key in ("dtype", "torch_dtype"):
        if key in cfg or key == "dtype":
            cfg[key] = name
    cfg.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out_dir / "generation_config.json")
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------- models in memory


def _reference_base(model_cfg, quant_cfg, seed: int, base_dir: Path | None, dtype: torch.dtype):
    """The base as the adapter was trained against, dense, in ``dtype``: the dtype policy's weights, and for a 4-bit
    base the loaded model's own dequantized weights (transformers' ``dequantize``, bitsandbytes underneath)."""
    from sft.config import ModelConfig
    from sft.models import load_base_model, resolve_source

    cfg = model_cfg
    if base_dir is not None:  # the same weights, from the files the merge reads (a cached arch / GGUF copy)
        cfg = ModelConfig(**{**asdict(model_cfg), "name": str(base_dir), "gguf_file": None})
    cfg = ModelConfig(**{**asdict(cfg), "attn_implementation": "sdpa"})
    base = load_base_model(cfg, quant_cfg, seed=seed, source=resolve_source(cfg))
    if quant_cfg.mode == "nf4":
        base = base.dequantize()
        base.hf_quantizer = None
        base.is_quantized = False
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config
    return base.to(dtype)


def load_adapter_model(adapter_dir: str | Path, dtype: torch.dtype = torch.float32, base_override: str | None = None,
                       keep_4bit: bool = False):
    """The base (rebuilt as trained) with the adapter attached, unmerged; and the tokenizer.

    A 4-bit base is dequantized (its own NF4 weights, dense, in ``dtype``) unless ``keep_4bit``: then it stays a
    bitsandbytes model computing in its compute dtype, as in training."""
    from peft import PeftModel

    from sft.models import load_base_model, resolve_source

    adapter_dir = Path(adapter_dir)
    _check_adapter_files(adapter_dir)  # PEFT would unpickle an adapter_model.bin: refuse it here
    model_cfg, quant_cfg, seed = _base_configs(adapter_dir, base_override)
    if quant_cfg.mode == "nf4" and keep_4bit:
        base = load_base_model(model_cfg, quant_cfg, seed=seed, source=resolve_source(model_cfg))
    else:
        base = _reference_base(model_cfg, quant_cfg, seed, None, dtype)
    model = _attach(base, adapter_dir, model_cfg)
    model.eval()
    return model, _tokenizer(adapter_dir, model_cfg)


def _attach(base, adapter_dir: Path, model_cfg):
    from peft import PeftModel

    import warnings

    try:
        with warnings.catch_warnings():
            # checked below, with a message naming both models (PEFT only warns, and merges nothing)
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except Exception as e:  # shape mismatches (RuntimeError), unknown target modules (ValueError), bad files
        raise _mismatch_error(adapter_dir, model_cfg.name, (str(e).splitlines() or [type(e).__name__])[0]) from e
    # Target modules given by short names (q_proj) also match in another architecture, where PEFT creates fresh
    # LoRA layers under other paths, ignores the adapter's weights (a warning, not an error) and the "merge" would
    # silently be the bare base. Every LoRA module of the file must land on a LoRA layer of the model, and back.
    from safetensors import safe_open

    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        in_file = {m["module"] for k in f.keys() if (m := _LORA_KEY.match(k))}
    in_model = {name.removeprefix("base_model.model.") for name, mod in model.named_modules()
                if isinstance(getattr(mod, "lora_A", None), torch.nn.ModuleDict) and len(mod.lora_A)}
    unplaced, unfilled = sorted(in_file - in_model), sorted(in_model - in_file)
    if unplaced or unfilled:
        detail = (f"the base has no module {unplaced[0]}" + (f" (nor {len(unplaced) - 1} more)" if len(unplaced) > 1 else "")
                  + " for the adapter's LoRA weights") if unplaced else (
                  f"the adapter has no LoRA weights for the base's {unfilled[0]}"
                  + (f" (nor {len(unfilled) - 1} more)" if len(unfilled) > 1 else ""))
        raise _mismatch_error(adapter_dir, model_cfg.name, detail)
    return model


def _tokenizer(adapter_dir: Path, model_cfg):
    from sft.models import load_tokenizer

    if (adapter_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(adapter_dir)
    else:
        tok = load_tokenizer(model_cfg)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _probe_ids(tokenizer, vocab: int) -> torch.Tensor:
    """Two rows of 16 tokens: a templated question, and seeded random ids over the whole vocabulary."""
    ids = tokenizer("Question: What is the capital of France?\n\nAnswer: Paris is the capital",
                    return_tensors="pt")["input_ids"][:, :16]
    ids = ids.clamp(max=vocab - 1)
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0, vocab, (1, ids.shape[1]), generator=g)
    return torch.cat([ids, rand])


@torch.no_grad()
def _logits(model, probe: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device  # a 4-bit base lands on the GPU when there is one
    return model(input_ids=probe.to(device)).logits.float().cpu()


def _tolerance(save_dtype: torch.dtype, max_ref: float) -> float:
    # fp32: the merged weights equal base + scale*B@A up to float rounding (~1e-6 of the logit scale).
    # bf16: each merged weight is rounded to bf16 once (2^-9 relative), which moves logits by well under 1% of
    # their scale; wrong merges (the wrong base, a 4-bit base merged onto its original weights) move them by more.
    return (1e-4 if save_dtype == torch.float32 else 3e-2) * max(1.0, max_ref)


def _estimated_check_bytes(headers) -> int:
    n = 0
    for specs in headers.values():
        for _, _, shape in specs:
            k = 1
            for d in shape:
                k *= d
            n += k
    return 6 * n  # fp32 copy + a bf16 copy while loading


def _want_check(check: bool | str, need_bytes: int | None) -> bool:
    if check is True or check is False:
        return check
    if check != "auto":
        raise MergeError(f"check must be True, False or 'auto', not {check!r}")
    if need_bytes is None:
        return True
    import psutil

    avail = psutil.virtual_memory().available
    if need_bytes > CHECK_MEMORY_FRACTION * avail:
        log.warning("merge: skipping the logits self-check: it needs ~%.1f GiB, %.1f GiB are available "
                    "(force it with check=True)", need_bytes / 2**30, avail / 2**30)
        return False
    return True


# --------------------------------------------------------------------------------------------- merge


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


def _fault_after_shard(n_written: int) -> None:
    """Fault injection for the kill tests: SFT_FAULT_KILL_MERGE=N SIGKILLs the merge after its N-th output shard."""
    spec = os.environ.get("SFT_FAULT_KILL_MERGE")
    if spec and int(spec) == n_written:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                  base_override: str | None = None, check: bool | str = "auto", method: str = "auto",
                  nf4_onto: str = "dequantized") -> MergeReport:
    """Merge ``adapter_dir`` (an adapter dir or a Trainer ``checkpoint-N``) into its base and write a standalone
    model to ``out_dir``, atomically.

    ``method``: "auto" (shard by shard when the base has safetensors on disk and the adapter is plain LoRA, else the
    whole model), "shards" (error if not possible) or "model". ``check``: see the module docstring.
    ``nf4_onto``: for a 4-bit base, "dequantized" (right) or "original": add the adapter to the original 16-bit
    weights, the common mistake; only there to measure the error it causes (use with check=False)."""
    from sft.models import quantized_weight_names

    t0 = time.perf_counter()
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
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
    adapter = _read_adapter(adapter_dir)
    model_cfg, quant_cfg, seed = _base_configs(adapter_dir, base_override)
    quantized = quant_cfg.mode == "nf4"
    if quantized:
        save_dtype = torch.float32 if quant_cfg.compute_dtype == "fp32" else torch.bfloat16
    else:
        save_dtype = torch.float32 if model_cfg.dtype == "fp32" else torch.bfloat16

    try:
        base_dir = base_weights_dir(model_cfg, quant_cfg, seed) if method != "model" else None
    except SftError as e:
        raise MergeError(f"cannot find the base {model_cfg.name} of {adapter_dir}: {e}") from e
    plan = None
    reason = "no safetensors base on disk" if base_dir is None else ""
    if base_dir is not None:
        from transformers import AutoConfig

        files = _shard_files(base_dir)
        headers = _shard_headers(base_dir, files)
        base_keys = {k for specs in headers.values() for k, _, _ in specs}
        try:
            deltas, replacements = _lora_plan(adapter, base_keys)
            qnames: set[str] = set()
            if quantized:
                qnames = quantized_weight_names(AutoConfig.from_pretrained(base_dir), quant_cfg)
                if not qnames <= base_keys:
                    raise _Unsupported("the checkpoint's tensor names differ from the model's module names")
            plan = (files, headers, deltas, replacements, qnames)
        except _Unsupported as e:
            reason = str(e)
    if plan is None:
        if method == "shards":
            raise MergeError(f"cannot merge {adapter_dir} shard by shard: {reason}")
        log.warning("merge: using the whole-model path (%s)", reason)
    del adapter

    tokenizer = _tokenizer(adapter_dir, model_cfg)
    do_check = _want_check(check, _estimated_check_bytes(plan[1]) if plan else None)
    reference = probe = None
    if do_check or plan is None:
        # the adapter model, as trained (fp32 arithmetic): the reference logits, and for the whole-model path the
        # model that is merged
        model = _attach(_reference_base(model_cfg, quant_cfg, seed, base_dir, torch.float32), adapter_dir, model_cfg)
        model.eval()
        probe = _probe_ids(tokenizer, model.get_input_embeddings().num_embeddings)
        if do_check:
            reference = _logits(model, probe)
        if plan is not None:
            model = None  # PEFT models hold reference cycles: collect now, before the merge allocates
            gc.collect()

    created = [d for d in [out_dir.parent, *out_dir.parent.parents] if not d.exists()]  # removed again on failure
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=_temp_prefix(out_dir)))
    try:
        if plan is not None:
            files, headers, deltas, replacements, qnames = plan
            shards = _merge_shards(base_dir, files, headers, tmp, deltas, replacements, model_cfg, quant_cfg,
                                   save_dtype, qnames, onto=nf4_onto)
            _write_side_files(base_dir, tmp, save_dtype, tokenizer)
        else:
            merged = model.merge_and_unload()
            model = None
            merged.to(save_dtype)
            merged.config.use_cache = True
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            merged = None
            gc.collect()
            shards = len(_shard_files(tmp) or [1])
        max_diff = max_ref = 0.0
        if do_check:
            from transformers import AutoModelForCausalLM

            try:
                reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa",
                                                                use_safetensors=True)
            except Exception as e:
                raise MergeError(f"the merged model does not load: {e}") from e
            got = _logits(reloaded, probe)
            reloaded = None
            gc.collect()
            max_diff = (got - reference).abs().max().item()
            max_ref = reference.abs().max().item()
            tol = _tolerance(save_dtype, max_ref)
            if not max_diff <= tol:
                raise MergeError(
                    f"merged model's logits differ from the adapter model's by {max_diff:.3g} (tolerance {tol:.3g}); "
                    f"the merge is wrong and was not written"
                )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException as e:
        from sft.preflight import is_disk_full, write_failure_reason

        full = isinstance(e, Exception) and is_disk_full(e)
        why = write_failure_reason(out_dir.parent, tmp) if full else ""  # while tmp still shows it
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # deepest first; only folders this call made, and only while empty
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(e, _Mismatch):
            raise _mismatch_error(adapter_dir, model_cfg.name, str(e)) from e
        if full:
            raise MergeError(
                f"--out {out_dir}: writing the merged model failed: {(str(e).splitlines() or [type(e).__name__])[0]}; "
                f"likely cause: {why}. Nothing was written to {out_dir}. Free space (or raise the limit) and run "
                f"again, or choose another --out"
            ) from e
        if isinstance(e, (SftError, KeyboardInterrupt, MemoryError)) or not isinstance(e, Exception):
            raise
        raise MergeError(f"merging {adapter_dir} failed: {type(e).__name__}: {e}") from e
    return MergeReport(
        out=str(out_dir), max_abs_diff=max_diff, max_abs_logit=max_ref, dtype=str(save_dtype).replace("torch.", ""),
        seconds=time.perf_counter() - t0, method="shards" if plan is not None else "model", quantized_base=quantized,
        checked=do_check, shards=shards, base=str(base_dir) if base_dir else model_cfg.name,
    )
