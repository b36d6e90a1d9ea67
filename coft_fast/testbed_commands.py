"""``testbed`` (an offline stand-in for CLIP built from labelled images) and ``demo`` (CoFT on digits)."""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from coft_fast.api import PathLike, given_fields, load_images, resolve_config, train
from coft_fast.config import Config, ConfigError, load_recipe
from coft_fast.data import ImageSource

log = logging.getLogger("coft_fast")


def testbed(images: Union[PathLike, Sequence[PathLike]], out: PathLike,
            classes: Union[None, PathLike, Sequence[str]] = None, per_class: Optional[int] = None,
            seed: Optional[int] = None, config: Union[None, Config, PathLike] = None, overrides: Iterable[str] = (),
            recipe: Optional[PathLike] = None, preset: Optional[str] = None) -> dict:
    """Build the offline test-bed model from labelled images into ``out`` (an open_clip local-dir folder).

    ``images``: one labelled source (class folders, CSV or CoOp JSON) or a list of them, pooled.
    ``preset``: a named test bed (``TESTBED_PRESETS``: default, strong, digits, tiny); its ``testbed.*``
    fields sit over the recipe, under ``config`` and ``overrides``. ``per_class``: only the first N
    images of each class (by file name). A killed build resumes when called again. ``per_class`` and
    ``seed`` left at None take the config's value (``testbed.per_class``, ``seed``)."""
    from coft_fast.data import combine_sources
    from coft_fast.testbed_builder import build_testbed, preset_fields

    fields = {f"testbed.{key}": value for key, value in preset_fields(preset).items()} if preset else {}
    cfg = resolve_config(config, overrides, recipe=recipe, preset=fields, run__out_dir=str(out),
                         **given_fields(testbed__per_class=per_class, seed=seed))
    sources = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    source = combine_sources([load_images(path, classes, cfg) for path in sources], classes_given=classes is not None)
    if cfg.testbed.per_class is not None:
        source = first_per_class(source, cfg.testbed.per_class)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.yaml")
    log.info("building the test bed%s from %d images of %s into %s", f" (preset {preset})" if preset else "",
             len(source), source.origin, out_dir)
    report = build_testbed(source, out_dir, cfg.testbed, seed=cfg.seed, progress=cfg.run.progress, preset=preset)
    log.info("test bed built in %.1f s", report["build_seconds"])
    return report


def first_per_class(source: ImageSource, per_class: int) -> ImageSource:
    """The first ``per_class`` images of each class, in file-name order."""
    if per_class < 1:
        raise ConfigError(f"per_class must be at least 1, got {per_class}")
    taken, keep = Counter(), []
    for index in sorted(range(len(source)), key=lambda i: (source.labels[i], Path(source.paths[i]).name)):
        label = source.labels[index]
        if taken[label] < per_class:
            taken[label] += 1
            keep.append(index)
    return source.subset(keep)


def demo(out: PathLike = "coft_demo", seed: int = 0, progress: bool = True, overrides: Iterable[str] = (),
         recipe: Optional[PathLike] = "testbed") -> dict:
    """The offline demo: a test bed pre-trained on 40 % of scikit-learn's digits, then CoFT on a 30 % pool,
    evaluated on the last 30 %; returns the metrics. ``recipe``: ``testbed`` by default (None: the paper's)."""
    import shutil

    from coft_fast.data.demo import digit_class_names, write_digits
    from coft_fast.testbed_builder import preset_config

    out_dir = Path(out)
    folders = write_digits(out_dir / "data", image_size=preset_config("digits").image_size, seed=seed)
    base = load_recipe(recipe).config() if recipe is not None else Config()
    base.seed = seed
    base.testbed = preset_config("digits")  # built on scikit-learn's digits in under a minute on 2 cores
    base.run.progress = progress
    base.data.num_workers = 0
    testbed(folders["pretrain"], out_dir / "testbed", classes=digit_class_names(), config=base)
    run_dir = out_dir / "coft"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo always starts afresh
    result = train(folders["pool"], digit_class_names(), model=f"local-dir:{out_dir / 'testbed'}",
                   eval_images=folders["test"], out=run_dir, config=base, overrides=overrides)
    return result.metrics
