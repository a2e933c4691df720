"""Configuration: pydantic schema and the YAML layer loader."""

from weighted_mtp.config.loader import (
    ResolvedConfig,
    config_to_yaml,
    load_config,
    load_saved_config,
    public_dump,
    save_resolved_config,
)
from weighted_mtp.config.schema import Config

__all__ = [
    "Config",
    "ResolvedConfig",
    "config_to_yaml",
    "load_config",
    "load_saved_config",
    "public_dump",
    "save_resolved_config",
]
