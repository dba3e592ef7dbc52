"""Typed run configuration: the schema (dataclasses with their documentation) and loading (YAML + overrides,
validation). Immutable in use: the recipe resolves ``auto`` values into a copy, which summary.json records."""

from sft.config.load import (CONFIG_DIR, DEFAULT_TRAIN_CONFIG, apply_overrides, describe_fields, from_dict,
                             load_config, parse_override, resolve_config_path)
from sft.config.schema import (CORE_SECTIONS, DataConfig, LoraSection, ModelConfig, QuantizationConfig, RunConfig,
                               TrainingConfig, field_doc, register_section, sections)

__all__ = [
    "CONFIG_DIR", "DEFAULT_TRAIN_CONFIG", "CORE_SECTIONS", "DataConfig", "LoraSection", "ModelConfig",
    "QuantizationConfig", "RunConfig", "TrainingConfig", "apply_overrides", "describe_fields", "field_doc",
    "from_dict", "load_config", "parse_override", "register_section", "resolve_config_path", "sections",
]
