"""Benchmark matrices: YAML -> a list of cells.

A matrix file::

    name: cpu                       # used in report file names
    description: ...
    steps: 5                        # measured optimizer steps per cell
    warmup: 2                       # steps run before measuring (the first includes start-up / compilation)
    dataset_rows: 2000              # rows of the synthetic Deep Lake dataset
    defaults:                       # axes shared by every block below
      model: opt-125m               # an sft architecture name (-> arch:opt-125m) or any model.name value
      quantization: none            # none | nf4
      seq_length: 512
      micro_batch: 8
      gradient_checkpointing: true  # true | false | auto (framework cells: sft's model.gradient_checkpointing)
      dtype: bf16-mixed             # auto | bf16-mixed | bf16 | fp32 (sft's model.dtype; auto is resolved on load)
      lora_r: 16
      lora_targets: [q_proj, v_proj]
      variant: [baseline, framework]
      ranks: 1                      # processes; threads per rank default to physical cores / ranks
    variants:                       # optional: more variants, or redefinitions of the built-in ones
      bigger-read: {overrides: {data.read_batch: 1024}}
    cells:                          # blocks; each is a cross product of its axes (a list value sweeps)
      - {}
      - {model: llama-1b, seq_length: 256, micro_batch: 2}
      - {quantization: [none, nf4], variant: framework}

A list value sweeps an axis; ``lora_targets`` is a list itself, so a sweep of it is a list of lists. A block may
also carry ``overrides`` (RunConfig ``section.key: value`` applied to its framework cells).

Variants name a code path. ``baseline`` is the seed recipe (benchmarks/baseline.py); every other variant runs
``sft.recipe.train`` with RunConfig overrides on top of the cell's axes, so a variant is one line of YAML
(``compile: {overrides: {training.torch_compile: true}}``) and is validated against sft.config before anything
runs.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sft.errors import ConfigError

MATRIX_DIR = Path(__file__).resolve().parent / "matrices"

AXES = ("model", "quantization", "seq_length", "micro_batch", "gradient_checkpointing", "dtype", "variant", "ranks",
        "threads", "lora_r", "lora_targets", "grad_accum")
AXIS_DEFAULTS: dict[str, Any] = {
    "model": "opt-125m",
    "quantization": "none",
    "seq_length": 512,
    "micro_batch": 8,
    "gradient_checkpointing": True,
    "dtype": "bf16-mixed",
    "variant": "framework",
    "ranks": 1,
    "threads": None,
    "lora_r": 16,
    "lora_targets": ["q_proj", "v_proj"],
    "grad_accum": 1,
}
TOP_KEYS = ("name", "description", "steps", "warmup", "dataset_rows", "defaults", "variants", "cells")


@dataclass
class Variant:
    """A code path: ``runner`` baseline (the seed recipe) or framework (sft.recipe.train), plus RunConfig overrides."""

    runner: str = "framework"
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the variant's cells


BUILTIN_VARIANTS: dict[str, Variant] = {
    "baseline": Variant("baseline", {}, "the seed recipe: Trainer + PEFT, naive packing (benchmarks/baseline.py)"),
    "framework": Variant("framework", {}, "sft's default training path (sft.recipe.train with a RunConfig)"),
    "compile": Variant("framework", {"training.torch_compile": True}, "framework + torch.compile"),
    "lora-dropout-0": Variant("framework", {"lora.dropout": 0.0}, "framework with LoRA dropout 0"),
    "no-position-ids": Variant("framework", {"data.position_ids": False},
                               "framework without per-document position ids (documents attend across boundaries)"),
    "eager-attention": Variant("framework", {"model.attn_implementation": "eager"}, "framework, eager attention"),
    # ablations of the #7 speed-ups: each turns one of them off
    "plain-loss": Variant("framework", {"model.chunked_loss": False},
                          "framework with the model's own loss (full fp32 logits; auto then checkpoints every layer)"),
    "base-dropout": Variant("framework", {"model.dropout": None},
                            "framework keeping the architecture's dropout (OPT: 0.1) in the frozen base"),
    "all-ckpt": Variant("framework", {"model.gradient_checkpointing": True},
                        "framework recomputing every layer's activations"),
    "no-ckpt": Variant("framework", {"model.gradient_checkpointing": False},
                       "framework keeping every layer's activations (more memory)"),
    "system-malloc": Variant("framework", {"training.allocator": "system"},
                             "framework on glibc malloc (no jemalloc / tcmalloc preloaded)"),
    "tcmalloc": Variant("framework", {"training.allocator": "tcmalloc"}, "framework on tcmalloc"),
    "mimalloc": Variant("framework", {"training.allocator": "mimalloc"},
                        "framework on mimalloc (the cmeel-mimalloc wheel sft installs; sft's MIMALLOC_PURGE_DELAY)"),
    "nn-dropout": Variant("framework", {"lora.fast_dropout": False},
                          "framework with PEFT's nn.Dropout on the LoRA input (one bernoulli draw per element)"),
    "flash-backward": Variant("framework", {"model.fast_attention_backward": False},
                              "framework with PyTorch's CPU flash backward for the per-document attention"),
    "peft-lora": Variant("framework", {"lora.fused": False},
                         "framework with PEFT's LoRA forward (fp32 copy of the input, separate scaling and add)"),
    "eager-norm": Variant("framework", {"model.fused_norm": False},
                          "framework with transformers' RMSNorm (no compiled kernel; Llama family)"),
    "eager-mlp": Variant("framework", {"model.fused_mlp": False},
                         "framework with transformers' SwiGLU product (silu(gate) stored; Llama family)"),
    "eager-rope": Variant("framework", {"model.fused_rope": False},
                          "framework with transformers' rotary embedding (eager bf16 ops; Llama family)"),
}


@dataclass
class CellSpec:
    model: str
    quantization: str
    seq_length: int
    micro_batch: int
    gradient_checkpointing: bool | str  # True, False or "auto" (framework only: sft decides per machine)
    dtype: str
    variant: str
    ranks: int
    threads: int | None
    lora_r: int
    lora_targets: list[str]
    grad_accum: int = 1
    runner: str = "framework"
    overrides: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # the variant's extra environment (e.g. MALLOC_CONF)

    @property
    def model_name(self) -> str:
        """The sft ``model.name``: bare architecture names get the ``arch:`` prefix."""
        from sft.models import ARCHITECTURES

        return f"arch:{self.model}" if self.model in ARCHITECTURES else self.model

    @property
    def short_model(self) -> str:
        m = self.model
        for prefix in ("arch:", "embedded:"):
            if m.startswith(prefix):
                m = m[len(prefix):]
        return Path(m).name if "/" in m else m

    def workload_key(self) -> tuple:
        """What a ratio to the baseline compares: the same model, shapes, LoRA and ranks."""
        return (self.model_name, self.quantization, self.seq_length, self.micro_batch, self.grad_accum, self.lora_r,
                tuple(self.lora_targets), self.ranks, self.threads)

    def config_label(self) -> str:
        targets = ",".join(t.replace("_proj", "") for t in self.lora_targets)
        parts = [self.short_model, f"{self.micro_batch}x{self.seq_length}", f"r{self.lora_r} {targets}"]
        if self.grad_accum > 1:
            parts.append(f"ga{self.grad_accum}")
        parts.append("nf4" if self.quantization == "nf4" else self.dtype)
        parts.append({True: "ckpt", False: "no-ckpt"}.get(self.gradient_checkpointing, "ckpt-auto"))
        if self.ranks > 1 or self.threads:
            parts.append(f"{self.ranks}r" + (f"x{self.threads}t" if self.threads else ""))
        return " ".join(parts)

    def label(self) -> str:
        return f"{self.config_label()} [{self.variant}]"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_name"] = self.model_name
        d["label"] = self.label()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CellSpec":
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in keys})


@dataclass
class Matrix:
    name: str
    description: str
    steps: int
    warmup: int
    dataset_rows: int
    cells: list[CellSpec]
    variants: dict[str, Variant]
    path: str | None = None


def _unknown(key: str, known, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}; known: {', '.join(known)}")


def resolve_matrix_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = MATRIX_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    available = ", ".join(sorted(x.stem for x in MATRIX_DIR.glob("*.yaml")))
    raise ConfigError(f"benchmark matrix {name_or_path} not found; pass a YAML path or one of: {available}")


def _sweep(axis: str, value: Any) -> list[Any]:
    if axis == "lora_targets":
        if isinstance(value, str):
            return [[value]]
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return value
        return [value]
    return value if isinstance(value, list) else [value]


def _check_value(axis: str, v: Any, where: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {axis} must be {expected}, got {v!r}")

    if axis == "quantization" and v not in ("none", "nf4"):
        raise bad("none or nf4")
    if axis == "dtype" and v not in ("auto", "bf16-mixed", "bf16", "fp32"):
        raise bad("auto, bf16-mixed, bf16 or fp32")
    if axis in ("seq_length", "micro_batch", "ranks", "lora_r", "grad_accum"):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad("an integer >= 1")
    if axis == "threads" and v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise bad("null or an integer >= 1")
    if axis == "gradient_checkpointing" and not (isinstance(v, bool) or v == "auto"):
        raise bad("true, false or auto")
    if axis in ("model", "variant") and (not isinstance(v, str) or not v):
        raise bad("a non-empty string")
    if axis == "lora_targets" and (not isinstance(v, list) or not v or not all(isinstance(t, str) for t in v)):
        raise bad("a list of module names")
    return v


def framework_overrides(spec: CellSpec, dataset: str, output_dir: str, max_steps: int) -> dict[str, dict[str, Any]]:
    """The RunConfig (as a nested dict) a framework cell trains with: the cell's axes, bench housekeeping (no eval,
    no checkpoints, no merge, no progress bars), then the variant's overrides. Everything else is sft's default."""
    from sft.config import apply_overrides

    raw: dict[str, dict[str, Any]] = {
        "model": {"name": spec.model_name, "dtype": spec.dtype, "gradient_checkpointing": spec.gradient_checkpointing},
        "lora": {"r": spec.lora_r, "target_modules": list(spec.lora_targets)},
        "quantization": {"mode": spec.quantization},
        "data": {"path": dataset, "seq_length": spec.seq_length},
        "training": {
            "output_dir": output_dir,
            "max_steps": max_steps,
            "per_device_train_batch_size": spec.micro_batch,
            "gradient_accumulation_steps": spec.grad_accum,
            "eval_strategy": "no",
            "save_strategy": "no",
            "merge": False,
            "report_to": ["none"],
            "progress": False,
        },
    }
    return apply_overrides(raw, [f"{k}={_yaml_scalar(v)}" for k, v in spec.overrides.items()])


def resolve_dtype(dtype: str) -> str:
    """``auto`` -> the policy sft would pick on this machine (bf16-mixed with CUDA or native CPU bf16, else fp32),
    resolved when the matrix is loaded so that labels and the baseline name the real precision."""
    if dtype != "auto":
        return dtype
    try:
        from sft.models import resolve_dtype_policy
    except ImportError:  # an sft without `auto`: the same rule here
        import torch

        from launch.topology import detect_topology

        flags = set(detect_topology().flags)
        return "bf16-mixed" if torch.cuda.is_available() or flags & {"amx_bf16", "avx512_bf16"} else "fp32"
    return resolve_dtype_policy("auto")


def _yaml_scalar(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def run_config_for(spec: CellSpec, dataset: str = "/nonexistent", output_dir: str = "outputs/bench", max_steps: int = 1):
    from sft.config import from_dict

    return from_dict(framework_overrides(spec, dataset, output_dir, max_steps))


def load_matrix(name_or_path: str, steps: int | None = None, warmup: int | None = None,
                axis_overrides: dict[str, Any] | None = None) -> Matrix:
    """Read and validate a matrix (every framework cell's RunConfig is built once, so a bad override fails here).

    ``axis_overrides`` force an axis in every cell (``sft bench --set dtype=fp32``)."""
    path = resolve_matrix_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a matrix must be a mapping with a `cells` list")
    for k in raw:
        if k not in TOP_KEYS:
            raise _unknown(k, TOP_KEYS, str(path))
    variants = dict(BUILTIN_VARIANTS)
    for vname, vdef in (raw.get("variants") or {}).items():
        vdef = vdef or {}
        if not isinstance(vdef, dict) or set(vdef) - {"runner", "overrides", "description", "env"}:
            raise ConfigError(f"{path}: variant {vname}: expected {{runner, overrides, description, env}}, "
                              f"got {vdef!r}")
        env = vdef.get("env") or {}
        if not isinstance(env, dict):
            raise ConfigError(f"{path}: variant {vname}: env must be a mapping of NAME: value, got {env!r}")
        runner = vdef.get("runner", "framework")
        if runner not in ("baseline", "framework"):
            raise ConfigError(f"{path}: variant {vname}: runner must be baseline or framework, got {runner!r}")
        variants[vname] = Variant(runner, dict(vdef.get("overrides") or {}), vdef.get("description", ""),
                                  {str(k): str(v) for k, v in env.items()})

    defaults = dict(AXIS_DEFAULTS)
    for k in axis_overrides or {}:
        if k not in AXES:
            raise _unknown(k, AXES, "--set")
    for k, v in (raw.get("defaults") or {}).items():
        if k not in AXES:
            raise _unknown(k, AXES, f"{path}: defaults")
        defaults[k] = v
    blocks = raw.get("cells") or [{}]
    if not isinstance(blocks, list):
        raise ConfigError(f"{path}: cells must be a list of blocks")

    cells: list[CellSpec] = []
    seen: set[str] = set()
    for i, block in enumerate(blocks):
        where = f"{path}: cells[{i}]"
        block = dict(block or {})
        extra_overrides = block.pop("overrides", None) or {}
        for k in block:
            if k not in AXES:
                raise _unknown(k, AXES + ("overrides",), where)
        axes = {**defaults, **block, **(axis_overrides or {})}
        sweeps = {a: _sweep(a, axes[a]) for a in AXES}
        for combo in itertools.product(*(sweeps[a] for a in AXES)):
            values = {a: _check_value(a, v, where) for a, v in zip(AXES, combo)}
            values["dtype"] = resolve_dtype(values["dtype"])
            vname = values["variant"]
            if vname not in variants:
                raise _unknown(vname, list(variants), f"{where}: variant")
            var = variants[vname]
            overrides = {**extra_overrides, **var.overrides} if var.runner == "framework" else {}
            spec = CellSpec(**values, runner=var.runner, overrides=overrides, env=dict(var.env))
            if spec.runner == "framework":
                run_config_for(spec)  # validates the overrides against sft.config (raises ConfigError)
                from sft.allocator import resolve

                resolve(str(spec.overrides.get("training.allocator", "auto")))  # a missing library fails here
            if spec.label() in seen:
                continue
            seen.add(spec.label())
            cells.append(spec)

    # Baselines first within each workload, so that every other cell's ratio is known when its line is written.
    order = {c.label(): i for i, c in enumerate(cells)}
    first = {c.label(): _first_index(cells, c, order) for c in cells}
    cells = sorted(cells, key=lambda c: (first[c.label()], c.runner != "baseline", order[c.label()]))
    steps = steps if steps is not None else int(raw.get("steps", 5))
    warmup = warmup if warmup is not None else int(raw.get("warmup", 2))
    if steps < 1 or warmup < 1:
        raise ConfigError(f"{path}: steps and warmup must be >= 1 (the first step includes start-up and is never measured)")
    return Matrix(
        name=str(raw.get("name", path.stem)),
        description=str(raw.get("description", "")).strip(),
        steps=steps,
        warmup=warmup,
        dataset_rows=int(raw.get("dataset_rows", 2000)),
        cells=cells,
        variants=variants,
        path=str(path),
    )


def _first_index(cells: list[CellSpec], cell: CellSpec, order: dict[str, int]) -> int:
    key = cell.workload_key()
    return min(order[c.label()] for c in cells if c.workload_key() == key)


def baseline_for(cell: CellSpec, baselines: list[CellSpec]) -> CellSpec | None:
    """The baseline a cell is compared with: same workload; one with the cell's own dtype and checkpointing first
    (the ratio then isolates the code path), then the seed recipe's settings (bf16-mixed, checkpointing), then any."""
    same = [b for b in baselines if b.workload_key() == cell.workload_key()]
    if not same:
        return None
    for pred in (lambda b: b.dtype == cell.dtype and b.gradient_checkpointing == cell.gradient_checkpointing,
                 lambda b: b.dtype == cell.dtype and b.gradient_checkpointing is True,
                 lambda b: b.dtype == "bf16-mixed" and b.gradient_checkpointing,
                 lambda b: True):
        for b in same:
            if pred(b):
                return b
    return None
