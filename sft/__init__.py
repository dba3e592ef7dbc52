"""sft: LoRA / QLoRA supervised fine-tuning on Xeon CPUs and NVIDIA GPUs.

The public API (``import sft``)::

    cfg = sft.load_config("demo", ["training.max_steps=20"])   # or sft.RunConfig(...) / sft.from_dict({...})
    summary = sft.train(cfg, model=None, dataset=None, callbacks=(), training_args=None)
    sft.ingest(["data.jsonl"], "ds")                          # files -> a Deep Lake dataset
    sft.merge("outputs/run/adapter", "outputs/run/merged")     # adapter + base -> a standalone model
    sft.generate("outputs/run/merged", ["Write 2024-03-15 in ledger format."])

``sft.merge`` is the function (the merge package is ``sft.merging``: a subpackage named ``merge`` would replace the
function as an attribute of ``sft`` once imported). Names are imported on first use, so ``import sft`` stays cheap (and the CLI can decide whether the Hugging Face
libraries may go online before they are imported).
"""

from __future__ import annotations

import importlib

import sft.demo.config  # noqa: F401  the built-in demo registers its config section (demo:) with sft.config

__version__ = "0.1.0"

_API = {
    "RunConfig": "sft.config", "load_config": "sft.config", "from_dict": "sft.config",
    "RunSummary": "sft.summary", "RunHooks": "sft.hooks",
    "train": "sft.recipe", "ingest": "sft.data.ingest", "generate": "sft.generation",
}
__all__ = [*_API, "merge"]


def __getattr__(name: str):
    if name == "merge":
        return importlib.import_module("sft.merging").merge_adapter
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'sft' has no attribute {name!r}")
