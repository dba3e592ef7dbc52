"""The demo's config section, ``demo:`` in a train YAML (``demo.generate=true`` on the command line): registered
with :func:`sft.config.register_section`, so that the library's :class:`sft.config.RunConfig` carries it without
declaring it. Loaded by ``import sft`` (a few dataclasses, no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass

from sft.config import RunConfig, field_doc, register_section
from sft.errors import ConfigError


@dataclass
class DemoConfig:
    """The built-in demo task (sft/demo): generated data, and held-out exact-match accuracy of greedy answers."""

    generate: bool = field_doc(
        False, "Generate the built-in demo task (sft/demo) into data.path / data.eval_path when they do not exist. "
        "`sft train` never generates into a path given on its command line, unless demo.generate=true is given "
        "there too."
    )
    train_rows: int = field_doc(4000, "Rows of the generated demo train split.", min=1)
    test_rows: int = field_doc(500, "Rows of the generated demo test split.", min=1)
    accuracy_samples: int = field_doc(
        0, "Held-out rows of data.eval_path scored by greedy generation + exact match before training, after it, "
        "and on the reloaded merged model (0: off).", min=0
    )
    max_new_tokens: int = field_doc(32, "Generation length for accuracy evaluation and the merged model's sample.",
                                    min=1)


def check(cfg: RunConfig) -> None:
    """What the demo section needs of the rest of the config."""
    if cfg.demo.generate and not cfg.data.path:
        raise ConfigError("data.path: the demo needs a path to generate its dataset into")


register_section("demo", DemoConfig, check)
