"""Which base an adapter belongs to: ``sft_base.json`` next to the adapter, and where else to look for it.

Training writes ``sft_base.json`` (the model and quantization sections of the run config and the seed) next to
the adapter and into every ``checkpoint-N``. For a checkpoint without it, the run's ``adapter/sft_base.json``,
``sft_base.json`` or ``summary.json`` is used (see :func:`find_base_meta`); failing all of that, the adapter's own
``base_model_name_or_path``. That is what makes ``sft merge`` work for every model source, random-init
architectures and GGUF files included.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from sft.errors import MergeError
from sft.io import atomic_write_json

BASE_META = "sft_base.json"


def write_base_meta(adapter_dir: str | Path, model_cfg, quant_cfg, seed: int) -> None:
    meta = {"model": asdict(model_cfg), "quantization": asdict(quant_cfg), "seed": seed}
    atomic_write_json(Path(adapter_dir, BASE_META), meta, indent=2)


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


def base_configs(adapter_dir: Path, base_override: str | None = None):
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
        from sft.models.precision import resolve_dtype_policy

        model_cfg.dtype = resolve_dtype_policy("auto")
    return model_cfg, quant_cfg, seed
