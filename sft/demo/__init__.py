"""The built-in demo: the generated "ledger" date task (task.py), its data, and its exact-match evaluation
(evaluation.py), plugged into a run through the public API (plug.py)::

    import sft, sft.demo
    cfg = sft.load_config("demo")
    sft.train(cfg, callbacks=sft.demo.hooks(cfg))      # after sft.demo.prepare_data(cfg)

``sft train`` does exactly this when the config has ``demo.generate`` or ``demo.accuracy_samples``. Its config
section (config.py, ``demo:``) registers itself with sft.config, and its hook adds its fields to the run's summary
(``accuracy_before`` / ``accuracy_after`` / ``accuracy_merged``, ``sample_question`` / ``sample_answer``): the
library declares neither. Names are imported on first use: ``import sft`` loads config.py alone.
"""

from __future__ import annotations

import importlib

from sft.demo.config import DemoConfig

_NAMES = {
    "ExactMatch": "sft.demo.evaluation", "exact_match": "sft.demo.task", "generate_examples": "sft.demo.task",
    "ledger_format": "sft.demo.task", "hooks": "sft.demo.plug", "prepare_data": "sft.demo.plug",
}
__all__ = ["DemoConfig", *_NAMES]


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'sft.demo' has no attribute {name!r}")
