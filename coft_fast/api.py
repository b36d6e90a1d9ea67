"""The public entry points: compose data, models and pseudo-labelling; own the run folder."""
from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from coft_fast.config import Config, ConfigError
from coft_fast.data import ImageSource, load_source
from coft_fast.models import load_clip
from coft_fast.pseudo import ZeroShotResult, class_prompts, class_text_embeddings, encode_images, logit_scale_of, zeroshot_probabilities
from coft_fast.runtime.device import resolve_device, seed_everything
from coft_fast.runtime.io import atomic_write_csv, atomic_write_json
from coft_fast.runtime.logs import log_to_file
from coft_fast.runtime.metrics import classification_metrics

log = logging.getLogger("coft_fast")
PathLike = Union[str, os.PathLike]
UNSET = object()


def resolve_config(config: Union[None, Config, PathLike] = None, overrides: Iterable[str] = (), **fields) -> Config:
    """A validated Config: a copy of ``config`` (object or YAML path), then ``overrides`` ("a.b=v"),
    then the explicit ``fields`` given as dotted keys with ``__`` for the dots (``model__name=...``)."""
    if config is None:
        cfg = Config()
    elif isinstance(config, Config):
        cfg = copy.deepcopy(config)
    else:
        cfg = Config.load(config)
    cfg.override(list(overrides))
    from coft_fast.config import set_value

    for key, value in fields.items():
        if value is not UNSET:
            set_value(cfg, key.replace("__", "."), value)
    return cfg.validate()


def _pretrained_value(pretrained):
    if isinstance(pretrained, str) and pretrained.lower() in ("none", ""):
        return None
    return pretrained


def load_images(images: PathLike, classes=None, cfg: Optional[Config] = None) -> ImageSource:
    """An ImageSource from a folder, CSV or CoOp split JSON, with the data settings of ``cfg``."""
    cfg = cfg or Config()
    return load_source(images, classes, split=cfg.data.split, image_root=cfg.data.image_root)


def zeroshot(
    images: PathLike,
    classes: Union[None, PathLike, Sequence[str]] = None,
    model=UNSET,
    pretrained=UNSET,
    templates=UNSET,
    out: Optional[PathLike] = UNSET,
    config: Union[None, Config, PathLike] = None,
    overrides: Iterable[str] = (),
) -> ZeroShotResult:
    """Zero-shot CLIP classification of ``images`` into ``classes``.

    ``images`` is a class-folder tree, a flat folder, a CSV (``path[,label]``) or a CoOp split JSON;
    ``classes`` a list of names or a text file (one per line; optional for class folders).
    With ``out``, writes ``predictions.csv``, ``metrics.json`` (when labels exist) and ``config.yaml``.
    """
    cfg = resolve_config(
        config, overrides, model__name=model, model__pretrained=_pretrained_value(pretrained),
        zeroshot__templates=templates, run__out_dir=UNSET if out is UNSET else (out and str(out)),
    )
    out_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else None
    handler = log_to_file(out_dir / "run.log") if out_dir else None
    try:
        return _zeroshot(images, classes, cfg, out_dir)
    finally:
        if handler:
            handler.close()
            logging.getLogger("coft_fast").removeHandler(handler)


def _zeroshot(images, classes, cfg: Config, out_dir: Optional[Path]) -> ZeroShotResult:
    started = time.perf_counter()
    seed_everything(cfg.seed)
    source = load_images(images, classes, cfg)
    prompts = class_prompts(cfg.zeroshot.templates, source.class_names)
    device = resolve_device(cfg.model.device)
    log.info("zero-shot: %d images, %d classes, model %s on %s", len(source), source.num_classes,
             cfg.model.name if cfg.model.name.startswith("local-dir:") else f"{cfg.model.name} ({cfg.model.pretrained})",
             device)
    clip = load_clip(cfg.model.name, cfg.model.pretrained, device, cfg.model.quick_gelu, cfg.model.cache_dir)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")
    text = class_text_embeddings(clip, prompts, source.class_names, device, cfg.model.precision)
    features, positions = encode_images(
        clip, source, device, cfg.model.precision, cfg.data.batch_size, cfg.data.num_workers,
        progress=cfg.run.progress, description="zero-shot scoring",
    )
    probabilities = zeroshot_probabilities(features, text.cpu(), logit_scale_of(clip))
    result = ZeroShotResult(source, positions, probabilities, text.cpu(), features)
    if not len(positions):
        raise RuntimeError(f"{source.origin}: none of the {len(source)} images could be decoded")
    metrics = {"num_images": int(len(positions)), "num_skipped": len(source.skipped)}
    if source.has_labels:
        metrics.update(classification_metrics(probabilities, result.labels))
    metrics["seconds"] = time.perf_counter() - started
    result.metrics = metrics
    log.info("zero-shot done: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    if out_dir:
        write_zeroshot_outputs(result, out_dir)
    return result


def write_zeroshot_outputs(result: ZeroShotResult, out_dir: Path) -> None:
    names = result.source.class_names
    rows = (
        (path, names[int(p)], f"{float(c):.6f}")
        for path, p, c in zip(result.paths, result.predictions, result.confidence)
    )
    atomic_write_csv(out_dir / "predictions.csv", ["path", "prediction", "confidence"], rows)
    if result.source.skipped:
        atomic_write_csv(out_dir / "skipped.csv", ["path", "reason"],
                         ((s["path"], s["reason"]) for s in result.source.skipped))
    if result.source.has_labels or result.source.skipped:
        atomic_write_json(out_dir / "metrics.json", result.metrics)


def testbed(
    images: PathLike,
    out: PathLike,
    classes: Union[None, PathLike, Sequence[str]] = None,
    per_class: Optional[int] = UNSET,
    seed: int = UNSET,
    config: Union[None, Config, PathLike] = None,
    overrides: Iterable[str] = (),
) -> dict:
    """Build the offline test-bed model from labelled images into ``out`` (an open_clip local-dir folder).

    With ``per_class``, only the first N images of each class (sorted by file name) are used.
    """
    from coft_fast.testbed import build_testbed

    cfg = resolve_config(config, overrides, testbed__per_class=per_class, seed=seed, run__out_dir=str(out))
    source = load_images(images, classes, cfg)
    if cfg.testbed.per_class is not None:
        source = first_per_class(source, cfg.testbed.per_class)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.yaml")
    log.info("building the test bed from %d images of %s into %s", len(source), source.origin, out_dir)
    report = build_testbed(source, out_dir, cfg.testbed, seed=cfg.seed, progress=cfg.run.progress)
    log.info("test bed built in %.1f s", report["build_seconds"])
    return report


def first_per_class(source: ImageSource, per_class: int) -> ImageSource:
    """The first ``per_class`` images of each class, in file-name order."""
    if per_class < 1:
        raise ConfigError(f"per_class must be at least 1, got {per_class}")
    taken = {}
    keep = []
    for index in sorted(range(len(source)), key=lambda i: (source.labels[i], Path(source.paths[i]).name)):
        label = source.labels[index]
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(index)
    return source.subset(keep)


def demo(out: PathLike = "coft_demo", seed: int = 0, progress: bool = True) -> dict:
    """The offline demo: digits from scikit-learn, a test bed built on half of them, and zero-shot
    classification of the other half with it. Returns the zero-shot metrics."""
    from coft_fast.data.demo import digit_class_names, write_digits
    from coft_fast.testbed import digits_config

    out_dir = Path(out)
    folders = write_digits(out_dir / "data", image_size=digits_config().image_size, seed=seed)
    base = Config(seed=seed)
    base.testbed = digits_config()
    base.run.progress = progress
    testbed(folders["pretrain"], out_dir / "testbed", classes=digit_class_names(), config=base)
    base.data.num_workers = 0
    result = zeroshot(
        folders["test"], digit_class_names(), model=f"local-dir:{out_dir / 'testbed'}", templates="ensemble",
        out=out_dir / "zeroshot", config=base,
    )
    return result.metrics
