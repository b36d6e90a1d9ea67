"""The public entry points: compose data, models and pseudo-labelling; own the run folder."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from coft_fast.config import Config, ConfigError, apply_file, load_recipe, resolve_auto, set_value
from coft_fast.data import ImageSource, load_source
from coft_fast.data.sources import add_shots, require_labels
from coft_fast.inference import PredictionResult, RunModel, classifier_metadata, load_run, predict_to_folder
from coft_fast.models import load_clip
from coft_fast.models.prompts import check_dual_prompts_fit
from coft_fast.pseudo import class_prompts, prompt_names, templates_record
from coft_fast.stages.context import RunContext
from coft_fast.scoring import ZeroShotResult, class_text_embeddings, score_images
from coft_fast.pseudo.transductive import refine_labels
from coft_fast.runtime import distributed
from coft_fast.runtime.device import resolve_device, seed_everything
from coft_fast.run_outputs import finish_run, start_folder, write_partial_metrics, write_zeroshot_outputs
from coft_fast.runners import run_method
from coft_fast.runtime.io import remove_stale_temporaries
from coft_fast.runtime.logs import log_to_file
from coft_fast.runtime.metrics import classification_metrics

log = logging.getLogger("coft_fast")
PathLike = Union[str, os.PathLike]


def resolve_config(config: Union[None, Config, PathLike] = None, overrides: Iterable[str] = (),
                   recipe: Optional[PathLike] = None, command: str = "train", preset: Optional[dict] = None,
                   **fields) -> Config:
    """A validated Config, each layer over the one before: the defaults, ``recipe`` (a name or file),
    ``preset`` (dotted keys), ``config`` (a YAML file, or a Config that replaces the defaults and takes
    no recipe or preset), ``overrides`` ("a.b=v"), ``fields`` (``model__name=...``, None included);
    auto values resolved for ``command``."""
    if isinstance(config, Config):
        if recipe is not None:
            raise ConfigError("give a recipe or a Config object, not both (a recipe's Config is "
                              "coft_fast.config.load_recipe(name).config())")
        if preset:
            raise ConfigError("give a preset or a Config object, not both (set the Config's fields instead)")
        cfg = copy.deepcopy(config)
    else:
        cfg = load_recipe(recipe).config() if recipe is not None else Config()
        for key, value in (preset or {}).items():
            set_value(cfg, key, value)
        if config is not None:
            apply_file(cfg, config)
    cfg.override(list(overrides))
    for key, value in fields.items():
        set_value(cfg, key.replace("__", "."), value)
    return resolve_auto(cfg.validate(), command)


def given_fields(**arguments) -> dict:
    """The ``resolve_config`` fields of an entry point's arguments: None is dropped (the config's value
    stands); ``model__pretrained`` "none"/"" (random weights), ``run__out_dir=""`` and ``data__labeled=""``
    become None; other paths become strings."""
    fields = {}
    for key, value in arguments.items():
        if value is None:
            continue
        if key == "model__pretrained" and isinstance(value, str) and value.lower() in ("none", ""):
            value = None
        elif key in ("run__out_dir", "data__labeled"):
            value = str(value) if value != "" else None
        fields[key] = value
    return fields


def load_images(images: PathLike, classes=None, cfg: Optional[Config] = None, evaluation: bool = False) -> ImageSource:
    """An ImageSource with ``cfg``'s data settings (``data.eval_split`` for evaluation images)."""
    cfg = cfg or Config()
    split = cfg.data.eval_split if evaluation else cfg.data.split
    return load_source(images, classes, split=split, image_root=cfg.data.image_root)


def zeroshot(images: PathLike, classes: Union[None, PathLike, Sequence[str]] = None, model: Optional[str] = None,
             pretrained: Optional[str] = None, templates: Optional[PathLike] = None, out: Optional[PathLike] = None,
             config: Union[None, Config, PathLike] = None, overrides: Iterable[str] = (),
             recipe: Optional[PathLike] = None) -> ZeroShotResult:
    """Zero-shot CLIP classification of ``images`` (a class-folder tree, a flat folder, a CSV of
    ``path[,label]`` or a CoOp split JSON) into ``classes`` (a list of names or a text file with one
    per line; optional for class folders). With ``out``, writes ``predictions.csv``, ``metrics.json``
    (when labels exist), ``class_names.json`` and ``config.yaml``. ``recipe``: a named recipe under
    ``config``. ``model``, ``pretrained``, ``templates`` and ``out`` left at None take the config's
    value (after ``recipe``, ``config`` and ``overrides``); an explicit value sets that key over them:

    - ``model``: ``model.name`` (default ``"ViT-B-16"``), or ``"local-dir:PATH"``.
    - ``pretrained``: ``model.pretrained`` (default ``"openai"``); ``"none"``: random weights.
    - ``templates``: ``zeroshot.templates`` (default ``"auto"``, here CLIP's 80-template ensemble),
      ``"single"``, ``"ensemble"`` or a JSON file.
    - ``out``: ``run.out_dir`` (default none: nothing written); ``""``: none even where the config names one."""
    cfg = resolve_config(config, overrides, recipe=recipe, command="zeroshot", **given_fields(
        model__name=model, model__pretrained=pretrained, zeroshot__templates=templates, run__out_dir=out))
    out_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else None
    with log_to_file(out_dir / "run.log" if out_dir else None):
        return _zeroshot(images, classes, cfg, out_dir)


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
        start_folder(out_dir, cfg, source.class_names)
    text = class_text_embeddings(clip, prompts, source.class_names, device, cfg.model.precision)
    features, positions, probabilities = score_images(clip, source, text, device, cfg.model.precision,
                                                      cfg.data.batch_size, cfg.data.num_workers, progress=cfg.run.progress)
    result = ZeroShotResult(source, positions, probabilities, text.cpu(), features)
    if not len(positions):
        raise RuntimeError(f"{source.origin}: none of the {len(source)} images could be decoded")
    metrics = {"num_images": int(len(positions)), "num_skipped": len(source.skipped),
               "templates": templates_record(cfg.zeroshot.templates)}
    if source.has_labels:
        metrics.update(classification_metrics(probabilities, result.labels))
    if cfg.pseudo.refine != "none":  # transductive: the scored images are their own pool
        refined = refine_labels(cfg.pseudo.refine, probabilities, features.to(device), cfg.pseudo.knn_k)
        result.refined_probabilities = refined.probabilities
        metrics["refine"] = cfg.pseudo.refine
        if source.has_labels:
            refined_metrics = classification_metrics(refined.probabilities, result.labels)
            metrics.update({f"refined_{key}": value for key, value in refined_metrics.items()})
    metrics["seconds"] = time.perf_counter() - started
    result.metrics = metrics
    log.info("zero-shot done: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    if out_dir:
        write_zeroshot_outputs(result, out_dir)
    return result


class TrainResult:
    """What `train()` returns: metrics, the filtered sets, and `predict()` with the fine-tuned model."""

    def __init__(self, metrics, pool, positions, train_sets, model: RunModel, label_issues=None):
        self.metrics = metrics
        self.class_names = pool.class_names
        self.pool = pool
        self.out_dir = model.run_dir
        self.model = model  # the fine-tuned classifier(s), as load_run(out_dir) would return them
        self.label_issues = label_issues  # clean_labels: a LabelIssue per pool image, most likely wrong first
        self.clean_sets = {
            name: [(pool.paths[int(positions[r])], pool.class_names[int(l)]) for r, l in zip(data["rows"], data["labels"])]
            for name, data in train_sets.items()
        }

    @property
    def config(self) -> Config:
        """The resolved config of the run."""
        return self.model.config

    def predict(self, images) -> PredictionResult:
        """Classify new images: a folder, CSV or CoOp JSON path, or a list of image file paths
        (with ``phase2.train_on=both``, the logit ensemble of the two classifiers)."""
        return self.model.predict(images)


def train(images: PathLike, classes: Union[None, PathLike, Sequence[str]] = None, model: Optional[str] = None,
          pretrained: Optional[str] = None, method: Optional[str] = None, out: Optional[PathLike] = None,
          eval_images: Optional[PathLike] = None, config: Union[None, Config, PathLike] = None,
          overrides: Iterable[str] = (), resume: bool = False, recipe: Optional[PathLike] = None,
          labeled: Optional[PathLike] = None, labeled_split: Optional[str] = None) -> TrainResult:
    """Adapt CLIP to ``classes`` on the unlabelled ``images`` (CoFT by default; see ``method``).

    Labels the images carry (class sub-folders) serve only diagnostics, unless ``pseudo.source=given``
    (see ``clean_labels``). ``labeled``: a few labelled images per class (a folder, CSV or CoOp JSON)
    that go first into S* with their labels and are never filtered out. With ``eval_images``
    (labelled), zero-shot and final accuracy are measured there. With ``out``, the run folder gets
    metrics.json, pseudo_labels.csv, config.yaml, checkpoints, TensorBoard logs and plots, and a
    killed run continues with ``resume=True``. ``recipe``: a named recipe (`coft-fast recipes`) under
    ``config`` and ``overrides``; the defaults are the paper's (``paper-coft``). The arguments below
    left at None take the config's value; an explicit value sets that key over it:

    - ``model``: ``model.name`` (default ``"ViT-B-16"``), or ``"local-dir:PATH"``.
    - ``pretrained``: ``model.pretrained`` (default ``"openai"``); ``"none"``: random weights.
    - ``method``: ``method`` (default ``"coft"``; ``"coft+"``, ``"self-train"``).
    - ``out``: ``run.out_dir`` (default none: nothing written); ``""``: none even where the config names one.
    - ``labeled``: ``data.labeled`` (default none: no shots); ``""``: none even where the config names some.
    - ``labeled_split``: ``data.labeled_split`` (default none), the split of a CoOp JSON ``labeled``."""
    cfg = resolve_config(config, overrides, recipe=recipe, **given_fields(
        model__name=model, model__pretrained=pretrained, method=method, run__out_dir=out, data__labeled=labeled,
        data__labeled_split=labeled_split))
    out_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else None
    device = distributed.init_from_env(cfg.model.device)  # joins torchrun's process group, if any
    _claim_run_folder(out_dir, cfg, resume)
    pool, shots = _load_pool(images, classes, cfg)
    eval_source = load_images(eval_images, pool.class_names, cfg, evaluation=True) if eval_images is not None else None
    main = distributed.is_main()  # only rank 0 writes into the run folder
    if out_dir and main:
        start_folder(out_dir, cfg, pool.class_names)
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(log_to_file(out_dir / "run.log" if out_dir and main else None))
        writer = None
        if out_dir and main:
            from torch.utils.tensorboard import SummaryWriter

            writer = cleanup.enter_context(SummaryWriter(str(out_dir / "tensorboard")))
        seed_everything(cfg.seed)
        log.info("train (%s): %d pool images, %d classes, model %s on %s%s", cfg.method, len(pool), pool.num_classes,
                 cfg.model.name, device, f", rank {distributed.rank()} of {distributed.world_size()}"
                 if distributed.world_size() > 1 else "")
        clip = load_clip(cfg.model.name, cfg.model.pretrained, device, cfg.model.quick_gelu, cfg.model.cache_dir)
        if cfg.method in ("coft", "coft+"):  # fail before any image is scored (zero-shot templates are checked first thing)
            check_dual_prompts_fit(clip.tokenizer, prompt_names(pool.class_names), cfg.phase1.n_ctx, clip.context_length)
        run = RunContext(cfg, pool, eval_source, clip, device, out_dir, writer, shots)
        try:
            sets, clip2 = run_method(run)
        except Exception as exc:
            if out_dir and main:
                write_partial_metrics(run, out_dir, exc)
            raise
        issues = run.label_issues()
        metrics = finish_run(run, out_dir, issues)
        model = RunModel(out_dir, run.state.classifiers, clip2.preprocess_eval, pool.class_names, cfg, metrics, device,
                         classifier_metadata(clip2, pool.class_names, next(iter(sets))))
        return TrainResult(metrics, pool, run.state.positions, sets, model, issues)


def _claim_run_folder(out_dir: Optional[Path], cfg: Config, resume: bool) -> None:
    """Rank 0 checks ``out_dir`` holds no other run (resuming: the same config); every rank stops if it refuses."""
    refused = None
    if out_dir and distributed.is_main():
        checkpoints, saved = out_dir / "checkpoints", out_dir / "config.yaml"
        started = checkpoints.is_dir() and any(checkpoints.glob("*.pt"))
        try:
            if started and not resume:
                raise ConfigError(f"{out_dir} already holds a run: pass --resume (resume=True) to continue it, "
                                  "or choose another output folder")
            if started and saved.is_file():
                previous, current = Config.load(saved).to_dict(), cfg.to_dict()
                changed = [k for k in current if k != "run" and current[k] != previous.get(k)]  # run.* may change
                if changed:
                    raise ConfigError(f"cannot resume {out_dir}: the config differs from the saved one in "
                                      f"{', '.join(changed)}")
        except ConfigError as exc:
            refused = str(exc)
        if not refused and resume and out_dir.is_dir() and remove_stale_temporaries(out_dir):
            log.info("removed temporary files left by an interrupted write in %s", out_dir)
    refused = distributed.broadcast_object(refused)
    if refused:
        raise ConfigError(refused)


def _load_pool(images: PathLike, classes, cfg: Config):
    """(the pool, with data.labeled's shots joined, per position the shot's class or None)."""
    pool = load_images(images, classes, cfg)
    if cfg.pseudo.source == "given":
        require_labels(pool, "pseudo.source=given (clean-labels)")
    shots = None
    if cfg.data.labeled:
        labelled = load_source(cfg.data.labeled, pool.class_names, split=cfg.data.labeled_split,
                               image_root=cfg.data.image_root)
        pool_size = len(pool)
        pool, shots = add_shots(pool, labelled)
        log.info("%d labelled shots from %s (%d of them not in the pool, added to it)", len(labelled),
                 labelled.origin, len(pool) - pool_size)
    if pool.num_classes < 2:
        raise ConfigError(f"{pool.origin}: CoFT needs at least 2 classes, got {pool.num_classes}")
    _check_world(cfg, pool)
    return pool, shots


def clean_labels(images: PathLike, classes: Union[None, PathLike, Sequence[str]] = None, model: Optional[str] = None,
                 pretrained: Optional[str] = None, out: Optional[PathLike] = None,
                 eval_images: Optional[PathLike] = None, config: Union[None, Config, PathLike] = None,
                 overrides: Iterable[str] = (), resume: bool = False, recipe: Optional[PathLike] = None,
                 labeled: Optional[PathLike] = None, labeled_split: Optional[str] = None) -> TrainResult:
    """Find the wrong labels of a labelled pool, then fine-tune on the rest: CoFT with the labels the
    ``images`` came with (class sub-folders, a CSV of path,label or a CoOp JSON) in place of zero-shot
    pseudo-labels (``pseudo.source=given``). Two models judge each given label (by default two K-fold
    ensembles of linear probes on the frozen image features, out of fold: ``filter.detector=probe``);
    it is an issue iff either puts it in the low component of a per-class two-component mixture on its
    probability (``filter.rule=mixture``; docs/noisy-labels.md). The result's ``label_issues`` (with
    ``out``, also label_issues.csv, label_issue_scores.png and metrics.json's ``label_issues``) list
    them, most likely wrong first. Other arguments as ``train``: ``model``, ``pretrained``, ``out``,
    ``labeled`` and ``labeled_split`` left at None take the config's value."""
    return train(images, classes, model=model, pretrained=pretrained, out=out, eval_images=eval_images, config=config,
                 overrides=[*overrides, "pseudo.source=given"], resume=resume, recipe=recipe, labeled=labeled,
                 labeled_split=labeled_split)


def predict(run: PathLike, images, out: Optional[PathLike] = None, classifier: Optional[str] = None,
            device: str = "auto", batch_size: Optional[int] = None, num_workers: Optional[int] = None,
            split: Optional[str] = None, top5: bool = False, progress: bool = True, transductive: bool = False) -> dict:
    """Classify ``images`` with a finished run's model, streaming ``predictions.csv`` (``metrics.json``
    for labelled images, ``skipped.csv``) into ``out``; returns the metrics. ``transductive``: the
    images are labelled together by TransCLIP, the run's classifier as its prior."""
    model = load_run(run, classifier=classifier, device=device)
    out_dir = Path(out) if out else None
    with log_to_file(out_dir / "predict.log" if out_dir else None):
        log.info("predict: run %s (classifier %s) on %s%s", run, ", ".join(model.classifiers), model.device,
                 ", transductive (TransCLIP over the whole set)" if transductive else "")
        return predict_to_folder(model, images, out_dir, batch_size, num_workers, top5, progress, split, transductive)


def export(run: PathLike, fmt: str, out: PathLike, classifier: Optional[str] = None) -> Path:
    """Export a finished run's model into ``out``: ``fmt`` "open_clip" (a folder) or "onnx"; ``classifier`` s1 or s2."""
    from coft_fast.exporters import export_run

    return export_run(load_run(run, classifier=classifier, device="cpu"), out, fmt, classifier)


def report(run: PathLike) -> Path:
    """Rebuild ``run``/report.html from the run folder's files."""
    from coft_fast.run_report import build_report

    return build_report(run)


def _check_world(cfg: Config, pool: ImageSource) -> None:
    """A distributed run splits every global batch across the ranks: each batch needs a row per rank."""
    size = distributed.world_size()
    if size == 1:
        return
    for key, value in (("phase1.batch_size", cfg.phase1.batch_size), ("phase2.batch_size", cfg.phase2.batch_size)):
        if value < size:
            raise ConfigError(f"config key {key!r} is {value}, less than the {size} processes of this distributed run: "
                              f"batch sizes are global (split across the processes), so raise it to at least {size}")
    if len(pool) < size:
        raise ConfigError(f"{pool.origin}: {len(pool)} images are fewer than the {size} processes of this run")


