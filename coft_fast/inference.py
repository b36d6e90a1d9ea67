"""A finished run as a model, rebuilt from its ``finetuned_<set>.safetensors`` files (weights and metadata)."""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from coft_fast.config import Config, ConfigError
from coft_fast.data import ImageSource, load_source
from coft_fast.data.streaming import eval_batches
from coft_fast.phases.phase2 import FineTunedClassifier, ScaledLinearHead
from coft_fast.pseudo.transductive import refine_labels
from coft_fast.runtime.device import autocast, resolve_device
from coft_fast.runtime.io import PathLike, atomic_csv_writer, atomic_write_csv, atomic_write_json
from coft_fast.runtime.metrics import RunningClassificationMetrics
from coft_fast.runtime.progress import progress_bar

log = logging.getLogger(__name__)
FORMAT = "coft_fast.finetuned.v1"
CLASSIFIER_FILE = "finetuned_{}.safetensors"
TRAINING_SETS = ("s1", "s2", "s_star")  # phase II's clean sets (s_star: self-training's top-K)


def classifier_metadata(clip, class_names: Sequence[str], tag: str) -> Dict[str, str]:
    """What :func:`load_run` needs beside the weights."""
    config = json.dumps({"model_cfg": clip.model_cfg, "preprocess_cfg": clip.preprocess_cfg})
    return {"format": FORMAT, "training_set": tag, "class_names": "\n".join(class_names), "model": clip.name,
            "pretrained": clip.pretrained or "", "open_clip_config": config}


def ensemble_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of several heads' logits (``phase2.train_on=both``)."""
    return torch.stack(list(logits)).mean(0)


class PredictionResult:
    """Predictions of a fine-tuned model: one row per decodable image."""

    def __init__(self, paths, probabilities, class_names):
        self.paths = paths
        self.probabilities = probabilities
        self.class_names = list(class_names)

    @property
    def labels(self):
        return self.probabilities.argmax(1)

    @property
    def predictions(self):
        return [self.class_names[i] for i in self.labels.tolist()]

    @property
    def confidence(self):
        return self.probabilities.max(1).values


def _missing_stage(run_dir: Path, config: Config, tag: str) -> str:
    """The first stage of the run, in run order, without a finished checkpoint."""
    stages = ["zero_shot"]
    if config.method in ("coft", "coft+"):
        stages += ["phase1_model1", "phase1_model2"]
        for round_ in range(2, (config.phase1.rounds if config.method == "coft+" else 1) + 1):
            stages += [f"round{round_}_labels", f"round{round_}_phase1_model1", f"round{round_}_phase1_model2"]
        stages.append("filter")
    stages.append(f"phase2_{tag}")
    return next((stage for stage in stages if not (run_dir / "checkpoints" / f"{stage}.pt").is_file()), stages[-1])


def _load_classifier(path: Path):
    """(the file's FineTunedClassifier, its evaluation transform, metadata)."""
    import open_clip
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if "open_clip_config" not in metadata:
        raise ConfigError(f"{path} holds no open_clip config (it was written by an older coft_fast): run "
                          f"`coft-fast train ... --resume` on this run folder once to rewrite it")
    config = json.loads(metadata["open_clip_config"])
    previous = logging.getLogger().level
    with tempfile.TemporaryDirectory(prefix="coft_model_") as folder:
        Path(folder, "open_clip_config.json").write_text(json.dumps(config), encoding="utf-8")
        logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that the folder holds no weights
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", pretrained_text=False)
        finally:
            logging.getLogger().setLevel(previous)
    weight = tensors.get("head.weight")
    if weight is None:
        raise ConfigError(f"{path} has no tensor 'head.weight': not a coft_fast fine-tuned classifier")
    classifier = FineTunedClassifier(model.visual, ScaledLinearHead(torch.zeros_like(weight), 1.0))
    try:
        classifier.load_state_dict(tensors)
    except RuntimeError as exc:
        raise ConfigError(f"{path}: its weights do not fit the architecture in its own metadata ({exc})") from None
    return classifier.eval().requires_grad_(False), preprocess, metadata


class RunModel:
    """A finished run's fine-tuned classifier(s): ``predict``, ``logits``, export (coft_fast.exporters)."""

    def __init__(self, run_dir: Optional[Path], classifiers: Dict[str, FineTunedClassifier], preprocess, class_names,
                 config: Config, metrics: Dict, device: torch.device, metadata: Optional[Dict[str, str]] = None):
        self.run_dir = run_dir
        self.classifiers = classifiers
        self.preprocess = preprocess
        self.class_names = list(class_names)
        self.config = config
        self.metrics = metrics
        self.metadata = metadata  # the last classifier file's: model source, open_clip config (None in memory)
        self.to(device)

    @property
    def image_size(self) -> int:
        size = next(iter(self.classifiers.values())).visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def to(self, device) -> "RunModel":
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        for classifier in self.classifiers.values():
            classifier.to(self.device)
        return self

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, C) of preprocessed images (B, 3, S, S), as ``preprocess`` makes them."""
        return self.encode(images, with_features=False)[0]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, with_features: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Float32 (logits (B, C), features (B, d) or None): the classifiers' normalised features, concatenated."""
        images = images.to(self.device, non_blocking=True)
        logits, features = [], []
        with autocast(self.config.model.precision, self.device):
            for classifier in self.classifiers.values():
                feature = F.normalize(classifier.visual(images).float(), dim=-1)
                features.append(feature)
                logits.append(classifier.head(feature).float())
        return ensemble_logits(logits), F.normalize(torch.cat(features, dim=1), dim=1) if with_features else None

    def batches(self, source: ImageSource, batch_size: Optional[int] = None, num_workers: Optional[int] = None,
                progress: bool = False, transductive: bool = False
                ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(positions, probabilities, the classifier's own) per batch; ``transductive``: one, TransCLIP's."""
        batch_size = batch_size or self.config.data.batch_size
        num_workers = self.config.data.num_workers if num_workers is None else num_workers
        rows, probabilities, features = [], [], []
        with progress_bar(total=len(source), desc="predicting", unit="img", disable=not progress, leave=False) as bar:
            for batch in eval_batches(source, None, self.preprocess, batch_size, num_workers, device=self.device):
                logits, feature = self.encode(batch.images, with_features=transductive)
                batch_probabilities = logits.softmax(1).cpu()
                if transductive:
                    rows.append(batch.indices)
                    probabilities.append(batch_probabilities)
                    features.append(feature.cpu())
                else:
                    yield batch.indices, batch_probabilities, batch_probabilities
                bar.update(len(batch.indices) + len(batch.failed))
        if transductive and rows:
            inductive = torch.cat(probabilities)
            log.info("transductive predictions: TransCLIP over %d images, the run's classifier as the prior", len(inductive))
            refined = refine_labels("transclip", inductive, torch.cat(features).to(self.device))
            yield torch.cat(rows), refined.probabilities, inductive

    def source(self, images, split: Optional[str] = None) -> ImageSource:
        """An ImageSource of a path (``split`` default: the run's ``data.eval_split``) or a list of files."""
        if isinstance(images, (list, tuple)):
            return ImageSource([str(p) for p in images], [-1] * len(images), self.class_names, "image list")
        return load_source(images, self.class_names, split=split or self.config.data.eval_split,
                           image_root=self.config.data.image_root)

    def predict(self, images, batch_size: Optional[int] = None, num_workers: Optional[int] = None,
                progress: bool = False, transductive: bool = False) -> PredictionResult:
        """Classify images (a folder, CSV or CoOp JSON path, or a list of files), all rows in memory
        (:func:`predict_to_folder` streams to a CSV). ``transductive``: see :meth:`batches`."""
        source = self.source(images)
        batches = [(rows, p) for rows, p, _ in self.batches(source, batch_size, num_workers, progress, transductive)]
        paths = [source.paths[i] for rows, _ in batches for i in rows.tolist()]
        probabilities = torch.cat([p for _, p in batches]) if batches else torch.empty(0, len(self.class_names))
        return PredictionResult(paths, probabilities, self.class_names)


def load_run(run_dir: PathLike, classifier: Optional[str] = None, device: str = "auto") -> RunModel:
    """The fine-tuned model of a finished run folder (``coft_fast.train(..., out=DIR)``). ``classifier``:
    ``"s1"``, ``"s2"`` or ``"s_star"`` (self-training) picks one; None takes what the run trained (with
    ``phase2.train_on=both``, the logit ensemble of both)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a coft_fast run folder (no config.yaml)")
    config = Config.load(run_dir / "config.yaml")
    expected = (["s_star"] if config.method == "self-train"
                else {"s1": ["s1"], "s2": ["s2"], "both": ["s1", "s2"]}[config.phase2.train_on])
    if classifier is not None:
        if classifier not in TRAINING_SETS:
            raise ConfigError(f"classifier must be one of {', '.join(TRAINING_SETS)}, got {classifier!r}")
        if classifier not in expected:
            raise ConfigError(f"run {run_dir} trained {', '.join(expected)} in phase II (phase2.train_on="
                              f"{config.phase2.train_on}, method {config.method}), not {classifier!r}")
        expected = [classifier]
    for tag in expected:
        if not (run_dir / CLASSIFIER_FILE.format(tag)).is_file():
            raise ConfigError(f"run {run_dir} has not finished phase II: stage {_missing_stage(run_dir, config, tag)} "
                              f"is missing (no {CLASSIFIER_FILE.format(tag)}); continue it with `coft-fast train ... "
                              "--resume`")
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    classifiers, preprocess, metadata = {}, None, {}
    for tag in expected:
        classifiers[tag], preprocess, metadata = _load_classifier(run_dir / CLASSIFIER_FILE.format(tag))
    device = resolve_device(device if device != "auto" else config.model.device)
    return RunModel(run_dir, classifiers, preprocess, metadata["class_names"].split("\n"), config, metrics, device,
                    metadata)


def predict_to_folder(model: RunModel, images, out: Optional[PathLike], batch_size: Optional[int] = None,
                      num_workers: Optional[int] = None, top5: bool = False, progress: bool = True,
                      split: Optional[str] = None, transductive: bool = False) -> Dict:
    """Stream predictions into ``out``/predictions.csv (``path,prediction,confidence[,top5,top5_confidence]``),
    skipped.csv and, for labelled images, metrics.json; returns the metrics. ``transductive`` adds the
    classifier's own ``inductive_*`` columns and metrics and always writes metrics.json."""
    started = time.perf_counter()
    source = model.source(images, split)
    out_dir = Path(out) if out else None
    names = model.class_names
    header = (["path", "prediction", "confidence"] + (["top5", "top5_confidence"] if top5 else [])
              + (["inductive_prediction", "inductive_confidence"] if transductive else []))
    running, running_inductive = RunningClassificationMetrics(len(names)), RunningClassificationMetrics(len(names))
    labels = torch.tensor(source.labels, dtype=torch.long) if source.has_labels else None
    count = 0
    with atomic_csv_writer(out_dir / "predictions.csv" if out_dir else None, header) as writer:
        for rows, probabilities, inductive in model.batches(source, batch_size, num_workers, progress, transductive):
            top = probabilities.topk(min(5, len(names)), dim=1)
            own_confidence, own_label = inductive.max(1) if transductive else (None, None)
            count += len(rows)
            if labels is not None:
                running.update(probabilities, labels[rows])
                if transductive:
                    running_inductive.update(inductive, labels[rows])
            for index, (row, indices, values) in enumerate(zip(rows.tolist(), top.indices.tolist(), top.values.tolist())):
                line = [source.paths[row], names[indices[0]], f"{values[0]:.6f}"]
                if top5:
                    line += ["|".join(names[i] for i in indices), "|".join(f"{v:.6f}" for v in values)]
                if transductive:
                    line += [names[int(own_label[index])], f"{float(own_confidence[index]):.6f}"]
                writer.writerow(line)
    if not count and len(source):
        raise RuntimeError(f"{source.origin}: none of the {len(source)} images could be decoded")
    metrics = {"num_images": count, "num_skipped": len(source.skipped)}
    if transductive:
        metrics["predictions"] = "transductive"
    if labels is not None:
        metrics.update(running.result())
        if transductive:
            metrics["inductive"] = running_inductive.result()
    metrics["seconds"] = time.perf_counter() - started
    if out_dir:
        if source.skipped:
            atomic_write_csv(out_dir / "skipped.csv", ["path", "reason"],
                             ((s["path"], s["reason"]) for s in source.skipped))
        if labels is not None or source.skipped or transductive:
            atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics
