"""The adapter as read from disk, and the LoRA plan: which base weight gets which ``scale * B @ A``.

The adapter is read from ``adapter_model.safetensors`` (never a pickle), never from a live, possibly
ZeRO-3-partitioned model; an adapter saved from partitioned parameters (empty tensors) is refused. PEFT features
the shard-by-shard merge does not reproduce (DoRA and other variants, convolution / embedding targets, tensors that
are not in the base) raise :class:`Unsupported`, which sends the merge down the whole-model path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sft.errors import MergeError
from sft.models.base_meta import recorded_base

ADAPTER_WEIGHTS = "adapter_model.safetensors"

LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_FLAGS = ("use_dora", "use_qalora", "lora_bias", "use_bdlora")
_UNSUPPORTED_FIELDS = ("layer_replication", "target_parameters", "trainable_token_indices", "alora_invocation_tokens",
                       "megatron_config", "arrow_config", "kasa_config", "monteclora_config", "velora_config")


class Unsupported(Exception):
    """The shard-by-shard path cannot reproduce this adapter / base: use the whole-model path."""


class Mismatch(MergeError):
    """The adapter's tensors do not fit the base's (re-raised by merge_adapter with both names)."""


def mismatch_error(adapter_dir: Path, base: str, detail: str) -> MergeError:
    trained = recorded_base(adapter_dir)
    on = f" (trained on {trained})" if trained else ""
    detail = detail.strip().rstrip(".")
    if len(detail) > 300:  # PEFT lists every missing module
        detail = detail[:300] + "..."
    fix = (f"Merge onto the base it was trained on: drop --base, or pass --base {trained}" if trained and trained != base
           else "Pass the base it was trained on (--base)")
    return MergeError(f"the adapter in {adapter_dir}{on} does not fit the base {base}: {detail}. {fix}")


def check_adapter_files(adapter_dir: Path) -> None:
    """The adapter directory exists and holds adapter_config.json and safetensors weights (never a pickle)."""
    if not adapter_dir.exists():
        raise MergeError(
            f"--adapter {adapter_dir} does not exist; pass a run's adapter directory (OUTPUT_DIR/adapter) or one of "
            f"its checkpoints (OUTPUT_DIR/checkpoints/checkpoint-N)"
        )
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MergeError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json); "
                         f"{_what_to_pass(adapter_dir)}")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        if (adapter_dir / "adapter_model.bin").exists():
            raise MergeError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (adapter_model.bin is never unpickled; re-save it "
                             f"as safetensors)")
        raise MergeError(f"{adapter_dir} holds an adapter config but no weights ({ADAPTER_WEIGHTS}: its writing was "
                         f"interrupted, or the files were copied without it); {_what_to_pass(adapter_dir)}")


def _what_to_pass(given: Path) -> str:
    """Which --adapter to pass instead of ``given``: a run's adapter or its newest complete checkpoint, found in
    ``given`` (a run's output_dir or its checkpoints/ folder) or in the run around it."""
    from sft.trainer.checkpoint_format import latest_complete

    found = []
    for run in (given, given.parent, given.parent.parent):
        if (run / "adapter" / ADAPTER_WEIGHTS).is_file():
            found.append(str(run / "adapter"))
        for ckpts in (run / "checkpoints", run):
            newest = latest_complete(ckpts, warn=False) if ckpts.is_dir() else None
            if newest is not None and (newest / ADAPTER_WEIGHTS).is_file():
                found.append(str(newest))
    found = [f for f in dict.fromkeys(found) if Path(f).resolve() != given.resolve()]
    if found:
        return "pass --adapter " + " or --adapter ".join(found)
    return "pass a run's adapter directory (OUTPUT_DIR/adapter) or one of its checkpoints " \
           "(OUTPUT_DIR/checkpoints/checkpoint-N)"


@dataclass
class Adapter:
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def read_adapter(adapter_dir: Path) -> Adapter:
    from safetensors import safe_open

    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / ADAPTER_WEIGHTS
    check_adapter_files(adapter_dir)
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
    return Adapter(config, tensors)


def _refuse_unsupported(cfg: dict[str, Any]) -> None:
    for flag in _UNSUPPORTED_FLAGS:
        if cfg.get(flag):
            raise Unsupported(f"adapter uses {flag}")
    for name in _UNSUPPORTED_FIELDS:
        if cfg.get(name) not in (None, {}, []):
            raise Unsupported(f"adapter sets {name}")


def _split_tensors(adapter: Adapter, base_keys: set[str]):
    """``({module: {"A": t, "B": t}}, {base tensor name: replacement})`` from the adapter's tensor names."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, t in adapter.tensors.items():
        m = LORA_KEY.match(key)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = t
            continue
        plain = key.removeprefix("base_model.model.")
        if plain in base_keys:  # a trained bias, or a module saved whole (modules_to_save)
            replacements[plain] = t
            continue
        raise Unsupported(f"adapter tensor {key} is neither a LoRA A/B weight nor a base tensor")
    return pairs, replacements


def lora_plan(adapter: Adapter, base_keys: set[str]):
    """{base weight name: (A, B, scale, fan_in_fan_out)} and {base tensor name: replacement} for the shard path."""
    cfg = adapter.config
    _refuse_unsupported(cfg)
    pairs, replacements = _split_tensors(adapter, base_keys)
    from peft.utils.other import get_pattern_key

    alpha_pattern = cfg.get("alpha_pattern") or {}
    deltas = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise MergeError(f"the adapter has lora_{'A' if 'B' in ab else 'B'} but not its pair for {module}")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2:
            raise Unsupported(f"{module}: LoRA weights of rank {a.ndim} (convolution or embedding targets)")
        if a.shape[0] != b.shape[1]:
            raise MergeError(f"{module}: lora_A is {tuple(a.shape)} but lora_B is {tuple(b.shape)}; the adapter is corrupted")
        target = f"{module}.weight"
        if target not in base_keys:
            raise Unsupported(f"the base checkpoint has no tensor {target}")
        r = a.shape[0]
        alpha = float(alpha_pattern[get_pattern_key(alpha_pattern.keys(), module)]) if alpha_pattern and \
            get_pattern_key(alpha_pattern.keys(), module) in alpha_pattern else float(cfg.get("lora_alpha", 8))
        scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
        deltas[target] = (a, b, scale, bool(cfg.get("fan_in_fan_out")))
    if not deltas and not replacements:
        raise MergeError("the adapter holds no LoRA weights")
    return deltas, replacements
