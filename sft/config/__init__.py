"""Typed run configuration: the schema (dataclasses with their documentation) and loading (YAML + overrides,
validation). Immutable in use: the recipe resolves ``auto`` values into a copy, which summary.json records."""

from sft.config.load import (CONFIG_DIR, DEFAULT_TRAIN_CONFIG, apply_overrides, describe_fields, from_dict,
                             load_config, parse_override, resolve_config_path)
from sft.config.schema import (SECTIONS, DataConfig, DemoConfig, LoraSection, ModelConfig, QuantizationConfig,
                               RunConfig, TrainingConfig)

__all__ = [
    "CONFIG_DIR", "DEFAULT_TRAIN_CONFIG", "SECTIONS", "DataConfig", "DemoConfig", "LoraSection", "ModelConfig",
    "QuantizationConfig", "RunConfig", "TrainingConfig", "apply_overrides", "describe_fields", "from_dict",
    "load_config", "parse_override", "resolve_config_path",
]
