"""Run configuration: dataclasses with documented defaults, YAML load/save and `key=value` overrides.

Sections are plain dataclasses nested under :class:`Config`. Overrides address fields by dotted
path (``data.batch_size=128``) or top-level name (``seed=3``); values are parsed as YAML scalars
and checked against the field's type, so a typo or a wrong type is an error naming the key.
The fields, their defaults and sources: ``sections.py``; :class:`Config` and its auto values:
``core.py``; allowed values: ``validation.py``; keys, YAML files, removed keys: ``files.py``;
named recipes: ``recipes.py``."""
from coft_fast.config.core import Config, pretrained_tags, resolve_auto, resolve_filter
from coft_fast.config.files import (REMOVED_KEYS, ConfigError, apply_file, check_removed, config_file_settings,
                                    read_yaml, set_value)
from coft_fast.config.recipes import RECIPE_KEYS, RECIPES_DIR, Recipe, list_recipes, load_recipe, recipe_names
from coft_fast.config.sections import (TESTBED_PRESET_HELP, TESTBED_PRESETS, ContrastiveConfig, DataConfig,
                                       FilterConfig, ModelConfig, Phase1Config, Phase2Config, PseudoConfig, RunConfig,
                                       TestbedConfig, ZeroShotConfig)
from coft_fast.config.validation import AUGMENTATIONS, METHODS, REFINE_CHOICES

__all__ = [
    "AUGMENTATIONS", "METHODS", "RECIPES_DIR", "RECIPE_KEYS", "REFINE_CHOICES", "REMOVED_KEYS",
    "TESTBED_PRESETS", "TESTBED_PRESET_HELP", "Config", "ConfigError", "ContrastiveConfig", "DataConfig",
    "FilterConfig", "ModelConfig", "Phase1Config", "Phase2Config", "PseudoConfig", "Recipe", "RunConfig",
    "TestbedConfig", "ZeroShotConfig", "apply_file", "check_removed", "config_file_settings", "list_recipes",
    "load_recipe", "pretrained_tags", "read_yaml", "recipe_names", "resolve_auto", "resolve_filter",
    "set_value",
]
