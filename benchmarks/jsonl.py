"""The results file: one strict-JSON object per line (NaN and inf written as null), named by day and host."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _clean(o: Any) -> Any:
    """NaN / inf -> None, so that the JSONL is strict JSON."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_clean(record), default=_json_default, sort_keys=False)
    with open(path, "a") as f:  # one write per line: concurrent runs on the same host do not interleave lines
        f.write(line + "\n")


def results_stem(facts: dict, when: float | None = None) -> str:
    day = time.strftime("%Y-%m-%d", time.localtime(when or time.time()))
    host = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in facts.get("hostname", "host"))
    return f"{day}-{host}"
