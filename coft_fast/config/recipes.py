"""Named, versioned configs shipped with the package (coft_fast/recipes/NAME.yaml; `coft-fast recipes`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Union

from coft_fast.config.core import Config
from coft_fast.config.files import ConfigError, _update, read_yaml

# coft_fast/recipes/, beside this package (package data: pyproject.toml's tool.setuptools.package-data)
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
RECIPE_KEYS = ("recipe", "version", "summary", "config")


@dataclass
class Recipe:
    """A recipe: ``settings``, the fields it sets over the defaults (each file comments their sources)."""

    name: str
    version: int
    summary: str
    settings: Dict[str, Any]
    path: Path

    def config(self) -> Config:
        """The defaults with this recipe's settings applied (validated)."""
        cfg = Config()
        try:
            _update(cfg, self.settings, prefix="")
            return cfg.validate()
        except ConfigError as exc:
            raise ConfigError(f"recipe {self.name} ({self.path}): {exc}") from None


def recipe_names() -> List[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name: Union[str, os.PathLike]) -> Recipe:
    """A shipped recipe by name (``paper-coft``), or a recipe file by path (``my-recipe.yaml``)."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPES_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown recipe {str(name)!r}: the recipes are {', '.join(recipe_names())} "
                              f"(`coft-fast recipes` lists them), or give a recipe file ending in .yaml")
    data = read_yaml(path, "recipe file")
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file {path} must hold a mapping with keys {', '.join(RECIPE_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(RECIPE_KEYS))
    missing = [key for key in RECIPE_KEYS if key not in data]
    if unknown or missing:
        raise ConfigError(f"recipe file {path}: " + "; ".join(
            ([f"unknown keys {', '.join(unknown)}"] if unknown else []) + ([f"missing keys {', '.join(missing)}"] if missing else [])))
    settings = data["config"] or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"recipe file {path}: 'config' must be a mapping of config keys")
    if not isinstance(data["version"], int) or isinstance(data["version"], bool):
        raise ConfigError(f"recipe file {path}: 'version' must be an integer, got {data['version']!r}")
    recipe = Recipe(str(data["recipe"]), data["version"], str(data["summary"]), settings, path)
    recipe.config()  # fail here, naming the file and key, on a bad field
    return recipe


def list_recipes() -> List[Recipe]:
    return [load_recipe(name) for name in recipe_names()]
