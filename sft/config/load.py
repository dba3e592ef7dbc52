"""YAML files plus dotted ``key=value`` overrides -> a validated :class:`RunConfig`.

Validation happens before any work: an unknown key, a wrong type or an out-of-range value raises
:class:`sft.errors.ConfigError` with a message that names the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from sft.config.schema import CORE_SECTIONS, PLUGIN_CHECKS, RunConfig, sections
from sft.config.trackers import check_trackers
from sft.errors import ConfigError

# The configs shipped inside the package (sft/configs: train, accelerate and DeepSpeed files); `--config demo`
# style short names resolve here.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_TRAIN_CONFIG = CONFIG_DIR / "train" / "demo.yaml"


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
        owners = [f"{s}.{key}" for s, cls in sections().items() if key in typing.get_type_hints(cls)]
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
    classes = sections()
    built = {}
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
        built[name] = cls(**kwargs)
    cfg = RunConfig(**{k: v for k, v in built.items() if k in CORE_SECTIONS})
    cfg.plugins.update({k: v for k, v in built.items() if k not in CORE_SECTIONS})
    if check_consistency:
        _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: RunConfig) -> None:
    t = cfg.training
    if t.eval_strategy == "steps" and t.eval_steps <= 0:
        raise ConfigError("training.eval_steps: must be > 0 when training.eval_strategy is 'steps'")
    if t.save_strategy == "steps" and t.save_steps <= 0:
        raise ConfigError("training.save_steps: must be > 0 when training.save_strategy is 'steps'")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"training.max_steps: {t.max_steps} is neither a number of optimizer steps (> 0) nor -1 "
                          "(train training.num_epochs instead)")
    if t.max_steps <= 0 and t.num_epochs <= 0:
        raise ConfigError("training.num_epochs: must be > 0 unless training.max_steps is set")
    if not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules: give at least one module name (or all-linear)")
    problems = check_trackers(t.report_to)  # names known, and each tracker's package importable
    if problems:
        raise ConfigError("\n".join(problems))
    if t.export_gguf and not t.merge:
        raise ConfigError("training.export_gguf: needs training.merge: true (the GGUF is written from the merged model)")
    for check in PLUGIN_CHECKS:  # the registered sections' own checks (sft/demo/config.py)
        check(cfg)


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
            if len(parts) == 1 and parts[0] not in sections():
                # a bare key: find its unique section (`max_steps=5` -> training.max_steps)
                owners = [s for s, cls in sections().items() if parts[0] in typing.get_type_hints(cls)]
                if len(owners) == 1:
                    parts = [owners[0], parts[0]]
                else:
                    raise _unknown(key, [f.name for cls in sections().values() for f in dataclasses.fields(cls)])
            else:
                raise ConfigError(f"override key {key!r} must be section.key (e.g. training.max_steps)")
        raw.setdefault(parts[0], {})
        if raw[parts[0]] is None or not isinstance(raw[parts[0]], dict):
            raw[parts[0]] = {}
        raw[parts[0]][parts[1]] = value
    return raw


#: The dataset fields that make a run the user's own: naming either starts from the library's defaults, never the
#: demo's (its data, evaluation, accuracy task, output directory and hyperparameters for a 135M model at 128 tokens).
DATA_FIELDS = ("path", "eval_path")


def names_own_data(overrides: list[str] | None) -> bool:
    """True when ``overrides`` set ``data.path`` or ``data.eval_path``: a run on the user's own data."""
    data = apply_overrides({}, overrides or []).get("data", {})
    return any(k in data for k in DATA_FIELDS)


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
    """Read a train YAML, apply overrides, validate.

    ``path=None``: the embedded demo (configs/train/demo.yaml), unless ``overrides`` name the user's own data
    (``data.path`` / ``data.eval_path``): then the library's documented defaults (``sft train --help-config``), so
    that nothing of the demo (its evaluation task, output directory, 128-token blocks) leaks into a real run."""
    if path is None and names_own_data(overrides):
        return from_dict(apply_overrides({}, overrides or []))
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
    for name, cls in sections().items():
        lines.append(f"{name}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {f.name} ({_type_name(hints[f.name])}, default {default!r})")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)
