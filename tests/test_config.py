"""Configs: every shipped YAML validates; bad keys and values fail with messages naming the key."""

import dataclasses
import typing
from pathlib import Path

import pytest

from sft.config import CONFIG_DIR, RunConfig, apply_overrides, describe_fields, from_dict, load_config
from sft.errors import ConfigError

TRAIN_CONFIGS = sorted((CONFIG_DIR / "train").glob("*.yaml"))


def test_there_are_train_configs():
    names = {p.stem for p in TRAIN_CONFIGS}
    assert {"demo", "opt-1.3b-lima"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_every_train_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.seq_length >= 8


def test_seed_recipe_matches_the_seed():
    cfg = load_config("opt-1.3b-lima")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32.0, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.seq_length == 1024 and cfg.training.per_device_train_batch_size == 8
    assert cfg.training.learning_rate == 1e-4 and cfg.training.lr_scheduler == "cosine"
    assert cfg.training.warmup_steps == 10 and cfg.training.weight_decay == 0.05
    assert cfg.training.num_epochs == 10 and cfg.model.dtype == "bf16-mixed"
    assert cfg.training.eval_strategy == cfg.training.save_strategy == "epoch"
    # the seed evaluated every epoch on a test split and kept OPT's own dropout in the frozen base
    assert cfg.data.eval_path and cfg.data.eval_path != cfg.data.path
    from sft.models import arch_config

    assert cfg.model.dropout is None and arch_config("opt-1.3b").dropout == 0.1


def test_every_field_is_documented():
    for name, cls in typing.get_type_hints(RunConfig).items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no documentation"
    assert "learning_rate" in describe_fields()


def test_overrides_types():
    cfg = load_config("demo", ["training.learning_rate=2e-4", "training.max_steps=7", "lora.target_modules=[q_proj,k_proj]",
                               "model=arch:tiny-llama", "data.answer_only=true", "training.save_total_limit=null"])
    assert cfg.training.learning_rate == 2e-4
    assert cfg.training.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.model.name == "arch:tiny-llama"
    assert cfg.data.answer_only is True
    assert cfg.training.save_total_limit is None


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("training.lerning_rate=1e-4", "unknown config key 'training.lerning_rate' (did you mean 'training.learning_rate'?)"),
        ("trainig.max_steps=3", "unknown config key 'trainig'"),
        ("training.max_steps=three", "training.max_steps: expected an integer, got 'three'"),
        ("training.max_steps=2.5", "training.max_steps: expected an integer, got 2.5"),
        ("model.dtype=fp16", "model.dtype: 'fp16' is not allowed; choose one of 'auto', 'bf16-mixed', 'bf16', 'fp32'"),
        ("lora.r=0", "lora.r: 0 is below the minimum 1"),
        ("lora.dropout=1.5", "lora.dropout: 1.5 is above the maximum 1"),
        ("data.answer_only=maybe", "data.answer_only: expected true/false, got 'maybe'"),
        ("training.eval_strategy=steps", "training.eval_steps: must be > 0 when training.eval_strategy is 'steps'"),
        ("training.report_to=[comet]", "training.report_to: unknown tracker 'comet'"),
        ("maxsteps", "override 'maxsteps' must look like section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert fragment in str(e.value)


def test_unknown_section_in_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("model:\n  name: arch:tiny-llama\noptimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'"):
        load_config(p)


def test_missing_config_file_lists_shipped_ones():
    with pytest.raises(ConfigError, match="not found; pass a YAML path or one of: .*demo"):
        load_config("no-such-config")


def test_from_dict_defaults_are_valid():
    assert from_dict({}).model.name.startswith("embedded:")
    assert apply_overrides({}, ["max_steps=3"]) == {"training": {"max_steps": 3}}
