"""The test bed: a small CLIP-like model, pre-trained here in minutes, for offline tests and demos
(docs/testbed.md; ../shared/docs/testbed-calibration.md has the measurements behind it). Like real
CLIP it has strong image features and a text side biased like web captions: stage 1 trains an
open_clip ViT as a cosine classifier on labelled images (the classifier is then thrown away); stage
2 aligns a fresh text tower to the FROZEN image tower on long-tailed captions (``longtail_ratio``), a
share of which (``lookalike_share``) names the class's look-alike (its nearest other class by the
stage-1 weights), written from CLIP's 80 templates. The result is an open_clip ``local-dir`` folder,
loaded back only through :func:`coft_fast.models.load_clip`; everything is deterministic for a seed."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP

from coft_fast.config import TESTBED_PRESETS, ConfigError, TestbedConfig
from coft_fast.data import ImageSource, decode_rgb
from coft_fast.runtime.device import cpu_name
from coft_fast.runtime.io import atomic_write, atomic_write_json, atomic_write_text
from coft_fast.runtime.progress import progress_bar
from coft_fast.testbed_training import image_features, native_bf16, train_image_tower, train_teacher, train_text_tower

VOCAB_SIZE = 49408  # open_clip's BPE tokenizer


def preset_fields(name: str) -> Dict:
    """The ``testbed.*`` fields a preset sets; a ConfigError lists the presets for an unknown name."""
    if name not in TESTBED_PRESETS:
        raise ConfigError(f"unknown test-bed preset {name!r}; the presets are: {', '.join(TESTBED_PRESETS)}")
    return dict(TESTBED_PRESETS[name])


def preset_config(name: str, **overrides) -> TestbedConfig:
    """A TestbedConfig of the preset ``name`` with ``overrides`` on top."""
    return TestbedConfig(**{**preset_fields(name), **overrides})


def model_config(cfg: TestbedConfig) -> Dict:
    """The open_clip ``model_cfg`` of a test bed."""
    if cfg.context_length < 32:
        raise ValueError(f"testbed.context_length must be at least 32 (phase I prompts need it), got {cfg.context_length}")
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.vision_width,
                       "layers": cfg.vision_layers, "head_width": cfg.vision_head_width},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": VOCAB_SIZE, "width": cfg.text_width,
                     "heads": cfg.text_heads, "layers": cfg.text_layers},
    }


def decode_labelled_images(source: ImageSource, image_size: int, progress: bool = True):
    """Decode a labelled source into a uint8 (N, 3, S, S) tensor and int64 labels; broken files are skipped."""
    from PIL import Image

    images, labels = [], []
    for path, label in progress_bar(list(zip(source.paths, source.labels)), desc="reading images", disable=not progress, leave=False):
        try:
            image = decode_rgb(path)
        except Exception as exc:
            source.skipped.append({"path": path, "reason": f"{type(exc).__name__}: {exc}"})
            continue
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        labels.append(label)
    if not images:
        raise ValueError(f"{source.origin}: no decodable images to build a test bed from")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def lookalike_classes(classifier: torch.Tensor) -> List[int]:
    """Each class's nearest other class by cosine similarity of the stage-1 classifier weights."""
    similarity = classifier @ classifier.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.argmax(dim=1).tolist()


def biased_caption_classes(labels: torch.Tensor, num_classes: int, lookalike: Sequence[int], cfg: TestbedConfig,
                           generator: torch.Generator):
    """Which images get a caption and which class each caption names (long tail + look-alike names):
    (indices of captioned images, the class each caption names, per-class caption counts)."""
    rank = torch.randperm(num_classes, generator=generator)  # rank[c]: position of class c in the tail
    largest = int(torch.bincount(labels, minlength=num_classes).max())
    keep_indices, named, per_class = [], [], []
    for c in range(num_classes):
        fraction = cfg.longtail_ratio ** (-int(rank[c]) / max(num_classes - 1, 1))
        members = (labels == c).nonzero().flatten()
        take = min(len(members), max(1, round(largest * fraction))) if len(members) else 0
        chosen = members[torch.randperm(len(members), generator=generator)[:take]]
        swap = torch.rand(take, generator=generator) < cfg.lookalike_share
        keep_indices.append(chosen)
        named.append(torch.where(swap, torch.tensor(lookalike[c]), torch.tensor(c)))
        per_class.append(int(take))
    return torch.cat(keep_indices), torch.cat(named), per_class


# Fields of stage 2 only: a rebuild that changes just these reuses the finished image tower.
TEXT_TOWER_FIELDS = ("text_width", "text_heads", "text_layers", "context_length", "text_steps", "text_batch_size",
                     "text_lr", "longtail_ratio", "lookalike_share", "caption_attributes", "attribute_directions")


def build_fingerprint(source: ImageSource, cfg: TestbedConfig, seed: int) -> str:
    """What a resumed image tower must share with the saved one: the image-side config, the seed
    and the images (the text tower's fields are left out: stage 2 is rebuilt every time)."""
    image_side = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in TEXT_TOWER_FIELDS}
    digest = hashlib.sha256(json.dumps({"config": image_side, "seed": seed,
                                        "classes": list(source.class_names)}, sort_keys=True).encode())
    for path, label in zip(source.paths, source.labels):
        digest.update(f"{path}\t{label}\n".encode())
    return digest.hexdigest()


# Written last by a build, so a folder whose build was killed never loads as a model.
MODEL_CONFIG_FILE = "open_clip_config.json"


def build_testbed(source: ImageSource, out_dir, cfg: Optional[TestbedConfig] = None, seed: int = 0,
                  progress: bool = True, preset: Optional[str] = None) -> Dict:
    """Train the test bed and write it as an open_clip local-dir folder; returns the build report. Epochs are
    checkpointed under ``out_dir/build_state/`` (a killed build resumes to the same weights; a rebuild that
    changes only ``TEXT_TOWER_FIELDS`` reuses the image tower); the model config is written last."""
    import open_clip

    cfg = cfg or TestbedConfig()
    if not source.has_labels or any(label < 0 for label in source.labels):
        raise ValueError(f"{source.origin}: every image needs a label (class sub-folders) to build a test bed")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_CONFIG_FILE).unlink(missing_ok=True)  # the folder loads again only once rebuilt
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = CLIP(**model_config(cfg))
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)
    images, labels = decode_labelled_images(source, cfg.image_size, progress)
    state_dir, fingerprint = out_dir / "build_state", build_fingerprint(source, cfg, seed)
    seconds, teacher, teacher_summary = {"teacher": 0.0}, None, {}  # the wall seconds of each stage in this call
    if cfg.teacher_width > 0:
        t0 = time.perf_counter()
        teacher, teacher_summary = train_teacher(images, labels, source.num_classes, cfg,
                                                 torch.Generator().manual_seed(seed + 2_000_000), state_dir,
                                                 fingerprint, progress)
        seconds["teacher"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stage1 = train_image_tower(model, images, labels, source.num_classes, cfg, torch.Generator().manual_seed(seed),
                               progress, teacher=teacher, state_dir=state_dir, fingerprint=fingerprint)
    seconds["stage1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # stage 2 draws from its own stream, so its biases do not depend on how long stage 1 ran
    generator = torch.Generator().manual_seed(seed + 1_000_000)
    lookalike = lookalike_classes(stage1["classifier"])
    captioned, caption_classes, caption_counts = biased_caption_classes(labels, source.num_classes, lookalike, cfg,
                                                                        generator)
    stage2 = train_text_tower(model, tokenizer, image_features(model, images)[captioned], caption_classes,
                              source.class_names, cfg, generator, progress, true_classes=labels[captioned])
    seconds["stage2"] = time.perf_counter() - t0
    stage2 = {**stage2, "lookalike": lookalike, "caption_counts": caption_counts}
    report = _build_report(source, cfg, seed, preset, len(images), teacher_summary, stage1, stage2, seconds, started)
    _write_model_folder(out_dir, model, cfg, source.class_names, report)
    return report


def _build_report(source: ImageSource, cfg: TestbedConfig, seed: int, preset: Optional[str], num_images: int,
                  teacher: Dict, stage1: Dict, stage2: Dict, seconds: Dict, started: float) -> Dict:
    """What ``testbed_report.json`` holds: the stages' summaries and ``seconds`` (wall seconds of this call)."""
    names = source.class_names
    report = {
        "source": source.origin, "num_images": int(num_images), "num_skipped": len(source.skipped),
        "seed": seed, "preset": preset, "config": dataclasses.asdict(cfg),
        "lookalike": {names[c]: names[other] for c, other in enumerate(stage2["lookalike"])},
        "captions_per_class": dict(zip(names, stage2["caption_counts"])),
        "teacher_train_accuracy": teacher.get("train_accuracy"), "teacher_seconds": seconds["teacher"],
        # epochs taken from build_state/ (a resumed or text-only rebuild); the seconds count only the rest
        "resumed_epochs": {"teacher": teacher.get("resumed_epochs", 0), "image_tower": stage1["resumed_epochs"]},
        "stage1_train_accuracy": stage1["train_accuracy_last_epoch"], "stage1_seconds": seconds["stage1"],
        "stage2_final_loss": stage2["final_loss"], "logit_scale": stage2["logit_scale"],
        "stage2_seconds": seconds["stage2"], "build_seconds": time.perf_counter() - started,
        # builds with the bf16 teacher match bit for bit only on the same kind of CPU
        "machine": {"cpu": cpu_name(), "native_bf16": native_bf16(), "torch": torch.__version__},
    }
    # the training time of every epoch, earlier (killed or text-only) builds' included: the whole build's
    # cost, where build_seconds counts only this call (None: a state saved before it was recorded)
    trained = {"teacher": teacher.get("seconds", 0.0), "image_tower": stage1.get("seconds")}
    untrained = report["build_seconds"] - seconds["stage1"] - seconds["teacher"]
    report["training_seconds_all_builds"] = trained
    report["build_seconds_all_builds"] = None if None in trained.values() else untrained + sum(trained.values())
    return report


def _write_model_folder(out_dir: Path, model: CLIP, cfg: TestbedConfig, class_names: Sequence[str],
                        report: Dict) -> None:
    """Weights, class names and report, then the model config last (the folder loads only once it is there)."""
    from safetensors.torch import save_file

    preprocess = {"size": cfg.image_size, "mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(out_dir / "open_clip_model.safetensors", lambda tmp: save_file(state, tmp))
    atomic_write_text(out_dir / "classes.txt", "\n".join(class_names) + "\n")
    atomic_write_json(out_dir / "testbed_report.json", report)
    atomic_write_json(out_dir / MODEL_CONFIG_FILE, {"model_cfg": model_config(cfg), "preprocess_cfg": preprocess})
