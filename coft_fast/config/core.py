""":class:`Config`, the whole run configuration, and the values resolved from others (:func:`resolve_auto`)."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Union

import yaml

from coft_fast.config.files import ConfigError, _parse_scalar, _update, apply_file, set_value
from coft_fast.config.sections import (ContrastiveConfig, DataConfig, FilterConfig, ModelConfig, Phase1Config,
                                       Phase2Config, PseudoConfig, RunConfig, TestbedConfig, ZeroShotConfig)
from coft_fast.config.validation import validate_config


@dataclass
class Config:
    # "coft" (default), "coft+" (iterative rounds + momentum-contrastive phase II), or
    # "self-train" (top-K zero-shot pseudo-labels straight into phase II; the usual baseline).
    method: str = "coft"
    # Global random seed.
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    phase1: Phase1Config = field(default_factory=Phase1Config)
    filter: FilterConfig = field(default_factory=FilterConfig)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Union[str, os.PathLike]) -> None:
        from coft_fast.runtime.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Config":
        cfg = cls()
        _update(cfg, data, prefix="")
        return cfg

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Config":
        return apply_file(cls(), path)

    def validate(self) -> "Config":
        """Check values that types alone cannot (validation.py); returns self."""
        validate_config(self)
        return self

    def override(self, assignments: Iterable[str]) -> "Config":
        """Apply ``key=value`` strings in order (dotted keys for nested fields); returns self."""
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"override {assignment!r} must look like key=value (e.g. data.batch_size=128)")
            set_value(self, key, _parse_scalar(raw))
        return self


def resolve_filter(cfg: Config) -> Config:
    """``filter.detector`` and ``filter.rule`` at auto resolved in place (the pipeline calls it too)."""
    if cfg.filter.detector == "auto":
        probe = cfg.pseudo.source == "given" and cfg.method == "coft"
        cfg.filter.detector = "probe" if probe else "prompts"
    if cfg.filter.rule == "auto":
        cfg.filter.rule = "mixture" if cfg.filter.detector == "probe" else "paper"
    return cfg


def resolve_auto(cfg: Config, command: str = "train") -> Config:
    """Resolve the auto values and an unset ``phase2.pretrained`` in place, so a saved config shows what runs."""
    if cfg.zeroshot.templates == "auto":
        if command != "zeroshot" and cfg.method == "coft+":
            logging.getLogger("coft_fast").warning(
                "method coft+: no --templates file given, so zero-shot pseudo-labels use CLIP's 80-template ensemble; "
                "the paper's CoFT+ averages LLM-written templates (see `coft-fast templates`)")
        cfg.zeroshot.templates = "ensemble" if command == "zeroshot" or cfg.method == "coft+" else "single"
    resolve_filter(cfg)
    # phase II inherits model.pretrained (model.pretrained=null: random weights asked for, kept for both)
    phase2, inherited = cfg.phase2, cfg.model.pretrained
    if (phase2.model and not phase2.model.startswith("local-dir:") and phase2.pretrained is None
            and inherited is not None):
        tags = pretrained_tags(phase2.model)
        if inherited not in tags:
            raise ConfigError(
                f"config key 'phase2.pretrained' is not set and phase2.model={phase2.model!r} has no pre-trained "
                f"tag {inherited!r} (model.pretrained) to inherit: set phase2.pretrained to one of its tags "
                f"({', '.join(tags) or 'none known'}) or to a checkpoint file")
        phase2.pretrained = inherited
    return cfg


def pretrained_tags(model_name: str) -> List[str]:
    """open_clip's pre-trained tags of ``model_name`` (empty for a name it does not know)."""
    import open_clip

    try:
        return list(open_clip.list_pretrained_tags_by_model(model_name))
    except Exception:
        return []
