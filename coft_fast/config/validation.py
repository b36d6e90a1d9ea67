"""What types alone cannot check (:meth:`Config.validate`): allowed values, bounds and combinations of keys."""
from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

from coft_fast.config.files import ConfigError

METHODS = ("coft", "coft+", "self-train")
AUGMENTATIONS = ("deft", "random_resized_crop")
REFINE_CHOICES = ("none", "knn", "transclip")
SPLITS = ("train", "val", "test")
# Every key with a fixed set of values, and those values.
CHOICES: Dict[str, Tuple[str, ...]] = {
    "method": METHODS,
    "model.precision": ("auto", "fp32", "bf16"),
    "data.decoder": ("auto", "pil", "dali"),
    "data.resident": ("auto", "always", "never"),
    "data.split": SPLITS,
    "data.eval_split": SPLITS,
    "pseudo.source": ("zeroshot", "given"),
    "pseudo.refine": REFINE_CHOICES,
    "phase1.round_ranking": ("own", "peer"),
    "phase1.text_encoding": ("joint", "separate"),
    "phase1.augment": AUGMENTATIONS,
    "filter.rule": ("auto", "paper", "mixture"),
    "filter.detector": ("auto", "prompts", "probe"),
    "phase2.train_on": ("s1", "s2", "both"),
    "phase2.head_init": ("zeroshot", "random", "probe"),
    "phase2.loss": ("ce", "gce"),
    "phase2.augment": AUGMENTATIONS,
    "run.op_backend": ("auto", "reference", "triton", "eager"),
}
# Keys of CHOICES that may also be None (the split of a CoOp split JSON: None when none is given).
MAY_BE_NONE = ("data.split", "data.eval_split")
# Keys with a lower bound only: each must be at least this (NaN is refused too).
MINIMUMS: Dict[str, float] = {
    "data.batch_size": 1, "data.num_workers": 0, "data.resident_max_gb": 0,
    "pseudo.top_k": 1, "pseudo.knn_k": 1,
    "phase1.batch_size": 1, "phase1.steps": 1, "phase1.rounds": 1, "phase1.vpt_lr_scale": 0,
    "filter.probe_folds": 2, "filter.probe_rounds": 1,
    "phase2.batch_size": 1, "phase2.epochs": 1, "phase2.logit_adjust": 0,
    "contrastive.gamma": 0, "contrastive.queue_size": 1, "contrastive.projection_dim": 0,
    "testbed.image_epochs": 1, "testbed.text_steps": 1, "testbed.context_length": 1, "testbed.teacher_width": 0,
    "testbed.teacher_epochs": 1, "testbed.teacher_batch_size": 1, "testbed.longtail_ratio": 1,
}
# Keys bounded on both sides, as intervals: "[" and "]" include the bound, "(" and ")" exclude it.
INTERVALS: Dict[str, str] = {
    "phase1.crop_scale_min": "(0, 1]",
    "filter.threshold": "(0, 1)",
    "phase2.crop_scale_min": "(0, 1]",
    "phase2.gce_q": "(0, 1]",
    "contrastive.momentum": "[0, 1)",
    "contrastive.queue_pool_fraction": "(0, 1]",
    "contrastive.temperature": "(0, inf)",
    "testbed.distill_weight": "[0, 1]",
    "testbed.lookalike_share": "[0, 1)",
}
BOOLEANS = ("run.tf32", "run.deterministic")


def value_of(cfg, key: str) -> Any:
    """The value of a dotted key (``phase1.lr``) or a top-level one (``method``)."""
    return functools.reduce(getattr, key.split("."), cfg)


def validate_config(cfg) -> None:
    """Raise a ConfigError naming the first key whose value cannot run."""
    for key, allowed in CHOICES.items():
        value = value_of(cfg, key)
        if value not in allowed and not (value is None and key in MAY_BE_NONE):
            raise ConfigError(f"config key {key!r} must be one of {', '.join(allowed)}, got {value!r}")
    for key, minimum in MINIMUMS.items():
        value = value_of(cfg, key)
        if not value >= minimum:  # written so that NaN is refused too
            raise ConfigError(f"config key {key!r} must be at least {minimum}, got {value}")
    for key, interval in INTERVALS.items():
        value = value_of(cfg, key)
        low, high = (float(bound) for bound in interval[1:-1].split(","))
        above = value >= low if interval[0] == "[" else value > low
        if not (above and (value <= high if interval[-1] == "]" else value < high)):  # false for NaN
            raise ConfigError(f"config key {key!r} must be in {interval}, got {value}")
    for key in BOOLEANS:
        value = value_of(cfg, key)
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    # the rules that involve more than one key (or, for the seeds, more than one value)
    if cfg.phase2.head_init == "probe" and cfg.phase2.model:
        raise ConfigError("config key 'phase2.head_init' is probe, which fits the head on the phase I model's "
                          f"features, but phase2.model is {cfg.phase2.model}: use zeroshot or random")
    if len(cfg.phase1.seeds) != 2 or cfg.phase1.seeds[0] == cfg.phase1.seeds[1]:
        raise ConfigError(f"config key 'phase1.seeds' must hold two different seeds, got {cfg.phase1.seeds}")
    given = cfg.pseudo.source == "given"
    if given and cfg.pseudo.refine != "none":
        raise ConfigError(f"config key 'pseudo.refine' is {cfg.pseudo.refine}, which relabels zero-shot "
                          "pseudo-labels; it cannot be combined with pseudo.source=given (the pool's own labels)")
    if cfg.filter.detector == "probe" and (not given or cfg.method != "coft"):
        raise ConfigError("config key 'filter.detector' is probe, which judges given labels in place of phase I: "
                          f"it needs pseudo.source=given and method=coft (got {cfg.pseudo.source} and "
                          f"{cfg.method}); use prompts")
    if given and cfg.phase2.train_on == "both":
        raise ConfigError("config key 'phase2.train_on' is both, but with pseudo.source=given the two clean sets are "
                          "one (the given labels both models keep): use s1")
