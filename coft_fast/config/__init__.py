"""Run configuration: dataclasses with documented defaults (``sections.py``), YAML files and `key=value`
overrides (dotted keys, values parsed as YAML and checked against the field's type; ``files.py``),
:class:`Config` and its auto values (``core.py``), allowed values (``validation.py``), recipes."""
from coft_fast.config.core import Config, resolve_auto, resolve_filter
from coft_fast.config.files import REMOVED_KEYS, ConfigError, apply_file, set_value
from coft_fast.config.recipes import RECIPES_DIR, list_recipes, load_recipe, recipe_names
from coft_fast.config.sections import (TESTBED_PRESET_HELP, TESTBED_PRESETS, ContrastiveConfig, DataConfig,
                                       FilterConfig, ModelConfig, Phase1Config, Phase2Config, PseudoConfig, RunConfig,
                                       TestbedConfig, ZeroShotConfig)

__all__ = [
    "RECIPES_DIR", "REMOVED_KEYS", "TESTBED_PRESETS", "TESTBED_PRESET_HELP", "Config", "ConfigError",
    "ContrastiveConfig", "DataConfig", "FilterConfig", "ModelConfig", "Phase1Config", "Phase2Config", "PseudoConfig",
    "RunConfig", "TestbedConfig", "ZeroShotConfig", "apply_file", "list_recipes", "load_recipe", "recipe_names",
    "resolve_auto", "resolve_filter", "set_value",
]
