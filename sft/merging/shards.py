"""The base on disk and the shard-by-shard merge: safetensors in, safetensors out, one tensor at a time.

The base's safetensors files are read one tensor at a time (``safe_open``, pread backend: no mapping of the file
stays resident), every LoRA-targeted weight gets ``scale * B @ A`` added in fp32 and is cast once, and each output
shard is streamed to disk tensor by tensor (:class:`_ShardWriter`), so peak memory is about the largest tensor
(plus the adapter and the interpreter), not the model. The base's config is copied (only its ``dtype`` field
follows the written dtype), plus generation config and tokenizer, and a ``model.safetensors.index.json`` for
several shards. For a 4-bit base, the weights that loading stores in 4 bits are NF4-round-tripped first
(:func:`sft.models.nf4_roundtrip`; see :mod:`sft.merging` for why).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sft.errors import MergeError
from sft.merging.plan import Adapter, lora_plan, Mismatch, Unsupported

INDEX = "model.safetensors.index.json"

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


# --------------------------------------------------------------------------------------------- the base on disk


def shard_files(model_dir: Path) -> list[str] | None:
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
    if not (path / "config.json").is_file() or shard_files(path) is None:
        return None
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("quantization_config"):  # a pre-quantized checkpoint: its tensors are not plain weights
        return None
    return path


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


@dataclass
class ShardPlan:
    """What the shard-by-shard merge reads (``files`` of ``base_dir`` and their ``headers``) and adds."""

    base_dir: Path
    files: list[str]
    headers: dict[str, list[tuple[str, str, tuple[int, ...]]]]
    deltas: dict[str, tuple]
    replacements: dict[str, torch.Tensor]
    qnames: set[str] = field(default_factory=set)


def shard_plan(adapter: Adapter, base_dir: Path, quant_cfg) -> ShardPlan:
    """The plan for merging ``adapter`` onto the safetensors in ``base_dir``; :class:`Unsupported` when the
    shard path cannot reproduce it."""
    from transformers import AutoConfig

    from sft.models import quantized_weight_names

    files = shard_files(base_dir)
    headers = _shard_headers(base_dir, files)
    base_keys = {k for specs in headers.values() for k, _, _ in specs}
    deltas, replacements = lora_plan(adapter, base_keys)
    qnames: set[str] = set()
    if quant_cfg.mode == "nf4":
        qnames = quantized_weight_names(AutoConfig.from_pretrained(base_dir), quant_cfg)
        if not qnames <= base_keys:
            raise Unsupported("the checkpoint's tensor names differ from the model's module names")
    return ShardPlan(base_dir, files, headers, deltas, replacements, qnames)


# --------------------------------------------------------------------------------------------- writing


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


def _train_dtype(policy: str, ndim: int) -> torch.dtype:
    if policy == "fp32":
        return torch.float32
    if policy == "bf16-mixed" and ndim <= 1:
        return torch.float32
    return torch.bfloat16


def _fault_after_shard(n_written: int) -> None:
    """Fault injection for the kill tests: SFT_FAULT_KILL_MERGE=N SIGKILLs the merge after its N-th output shard."""
    spec = os.environ.get("SFT_FAULT_KILL_MERGE")
    if spec and int(spec) == n_written:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _TensorMerge:
    """How each base tensor becomes a merged one; ``done`` collects the adapter weights that found their tensor."""

    plan: ShardPlan
    model_cfg: Any
    quant_cfg: Any
    save_dtype: torch.dtype
    onto: str = "dequantized"
    done: set[str] = field(default_factory=set)

    def specs(self, src_name: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """The output shard's tensors: floating point ones in the save dtype, the others as they are."""
        specs = []
        for key, st_dtype, shape in self.plan.headers[src_name]:
            if st_dtype not in _ST_NAMES:
                raise Unsupported(f"{src_name}: tensor {key} has dtype {st_dtype}")
            dt = _ST_NAMES[st_dtype]
            specs.append((key, self.save_dtype if dt.is_floating_point else dt, shape))
        return specs

    def tensor(self, f, key: str) -> torch.Tensor:
        """The merged tensor ``key`` read from the open shard ``f`` (read here, so that only this frame holds it)."""
        from sft.models import nf4_roundtrip

        t = f.get_tensor(key)
        if not t.is_floating_point():
            return t
        if self.quant_cfg.mode == "nf4":
            dequantize = key in self.plan.qnames and self.onto == "dequantized"
            w = nf4_roundtrip(t, self.quant_cfg) if dequantize else t.to(self.save_dtype)
        else:
            w = t.to(_train_dtype(self.model_cfg.dtype, t.ndim))
        del t
        if key in self.plan.deltas:
            a, b, scale, fan_in_fan_out = self.plan.deltas[key]
            delta = b.float() @ a.float()
            if fan_in_fan_out:
                delta = delta.T
            if delta.shape != w.shape:
                raise Mismatch(f"{key} is {tuple(w.shape)} in the base but the adapter's B@A is {tuple(delta.shape)}")
            w = w.float().add_(delta, alpha=scale)
            del delta
            if not torch.isfinite(w).all():
                raise MergeError(f"merged weight {key} is not finite")
            self.done.add(key)
        elif key in self.plan.replacements:
            r = self.plan.replacements[key]
            if r.shape != w.shape:
                raise Mismatch(f"the adapter's {key} is {tuple(r.shape)}, the base's {tuple(w.shape)}")
            w = r
            self.done.add(key)
        return w.to(self.save_dtype)


def _write_shard(merge: _TensorMerge, src_name: str, dst: Path, weight_map: dict[str, str]) -> int:
    """Merge the base shard ``src_name`` into the file ``dst``; returns its size in bytes."""
    specs = merge.specs(src_name)
    writer = _ShardWriter(dst, specs)
    try:
        with _open_shard(merge.plan.base_dir / src_name) as f:
            for key, _, _ in specs:
                w = merge.tensor(f, key)
                writer.write(key, w)
                weight_map[key] = dst.name
                del w
    except BaseException:
        writer.f.close()
        raise
    writer.close()
    return writer.nbytes


def merge_shards(plan: ShardPlan, out_dir: Path, model_cfg, quant_cfg, save_dtype: torch.dtype,
                  onto: str = "dequantized") -> int:
    """Write the merged model's safetensors (and index) into ``out_dir``; returns the number of shards."""
    merge = _TensorMerge(plan, model_cfg, quant_cfg, save_dtype, onto)
    n = len(plan.files)
    out_names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    for src_name, dst_name in zip(plan.files, out_names):
        total += _write_shard(merge, src_name, out_dir / dst_name, weight_map)
        _fault_after_shard(out_names.index(dst_name) + 1)
    missing = (set(plan.deltas) | set(plan.replacements)) - merge.done
    if missing:
        raise Mismatch(f"the base has no tensors for adapter weights {sorted(missing)[:3]}")
    if n > 1:
        (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return n


def write_side_files(base_dir: Path | None, out_dir: Path, save_dtype: torch.dtype, tokenizer) -> None:
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
