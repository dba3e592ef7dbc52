"""docs/configuration.md, rendered from the schema's field docs (sft/config/schema.py) and the shipped configs' header
comments (sft/configs/train/*.yaml, sft/configs/accelerate/*.yaml).

    python -m sft.config.docs > docs/configuration.md

tests/test_docs.py fails when the committed page differs from :func:`render`. The terminal form of the same field
docs is ``sft train --help-config`` (:func:`sft.config.describe_fields`); this one writes Markdown tables.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from sft.config.load import CONFIG_DIR
from sft.config.schema import sections

COMMAND = "python -m sft.config.docs > docs/configuration.md"

_INTRO = f"""\
# Configuration

<!-- Generated from sft/config/schema.py by `{COMMAND}`; do not edit by hand (tests/test_docs.py checks it). -->

Two kinds of configuration, kept apart: **hyperparameters** in a train config (`configs/train/*.yaml`) and
**launch topology** in an accelerate config (`configs/accelerate/*.yaml`, see [launching](launching.md)). Any train
config runs under any launch config. `configs/` links to `sft/configs/`, which ships inside the package.

A train config has the sections below, typed dataclasses in
[`sft/config/schema.py`](../sft/config/schema.py) with one documentation string per field; this page and
`sft train --help-config` are both printed from them. Override any key from the command line:

```bash
sft train --config demo training.max_steps=50 lora.r=8 model=arch:tiny-llama
```

Unknown keys and bad values fail before any work, naming the key:
`unknown config key 'training.lerning_rate' (did you mean 'training.learning_rate'?)`. `sft train` with no
`--config` runs the demo; a run that names its own data (`data.path` / `data.eval_path`) or its own `--config`
starts from the defaults listed here. How the speed-related keys behave, and what they change:
[training](training.md).
"""


def _type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type(a) for a in args) + (" or `null`" if type(None) in typing.get_args(tp) else "")
    if origin is list:
        return f"list of {_type(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(tp, str(tp))


def _value(v: Any) -> str:
    if v is None:
        return "`null`"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, list):
        return "`[" + ", ".join(str(x) for x in v) + "]`"
    return f"`{v}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _section(name: str, cls: type) -> list[str]:
    lines = [f"## `{name}`", ""]
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):  # a written docstring, not the generated one
        lines += [_cell(cls.__doc__), ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        bounds = [f"≥ {f.metadata['min']}"] if "min" in f.metadata else []
        bounds += [f"≤ {f.metadata['max']}"] if "max" in f.metadata else []
        meaning = _cell(f.metadata["help"]) + (f" ({', '.join(bounds)})" if bounds else "")
        lines.append(f"| `{name}.{f.name}` | {_type(hints[f.name])} | {_value(default)} | {meaning} |")
    return lines + [""]


def _header_comment(path: Path) -> str:
    """The prose a shipped config starts with: its comment lines up to a blank or indented one (a command)."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or not line.strip("# ") or line.startswith("#  "):
            break
        out.append(line.lstrip("#").strip())
    return _cell(" ".join(out))


def _shipped(kind: str, title: str, usage: str) -> list[str]:
    rows = [f"## {title}", "", f"Used as {usage}.", "", "| file | what it is for (its header comment) |", "|---|---|"]
    for p in sorted((CONFIG_DIR / kind).glob("*.yaml")):
        rel = p.relative_to(CONFIG_DIR.parent.parent).as_posix()
        rows.append(f"| [`{p.stem}`](../{rel}) | {_header_comment(p)} |")
    return rows + [""]


def render() -> str:
    """The whole of docs/configuration.md."""
    lines = [_INTRO]
    for name, cls in sections().items():  # the library's sections, then the registered ones (the demo's)
        lines += _section(name, cls)
    lines += _shipped("train", "Shipped train configs", "`sft train --config NAME` (or a path to your own YAML)")
    lines += _shipped("accelerate", "Shipped launch configs",
                      "`accelerate launch --config_file configs/accelerate/NAME.yaml -m sft.cli train ...`; "
                      "`sft launch` picks one for you ([launching](launching.md))")
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
