"""Run configuration: dataclasses with documented defaults, YAML load/save and `key=value` overrides.

Sections are plain dataclasses nested under :class:`Config`. Overrides address fields by dotted
path (``data.batch_size=128``) or top-level name (``seed=3``); values are parsed as YAML scalars
and checked against the field's type, so a typo or a wrong type is an error naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration key, value or file is invalid; the message names it."""


@dataclass
class ModelConfig:
    # open_clip model name ("ViT-B-16"), or "local-dir:/path" for open_clip's folder format.
    name: str = "ViT-B-16"
    # open_clip pre-trained tag ("openai", "laion2b_s34b_b88k") or a local checkpoint path;
    # ignored for "local-dir:" models. None means random initialisation.
    pretrained: Optional[str] = "openai"
    # QuickGELU activation: None decides from the weights (OpenAI weights need it).
    quick_gelu: Optional[bool] = None
    # "auto" picks CUDA when available, else CPU.
    device: str = "auto"
    # "auto": bf16 autocast on CUDA, fp32 on CPU. Or "fp32" / "bf16".
    precision: str = "auto"
    # open_clip download cache folder (None: open_clip's default).
    cache_dir: Optional[str] = None


@dataclass
class DataConfig:
    # Images per inference batch.
    batch_size: int = 256
    # DataLoader worker processes for decoding (0 decodes in the main process).
    num_workers: int = 2
    # For CoOp split JSON files: which split to read ("train", "val" or "test").
    split: Optional[str] = None
    # For CoOp split JSON files given as evaluation images (train --eval-images): their split.
    eval_split: str = "test"
    # For CoOp split JSON files: the folder the JSON paths are relative to (None: found next to it).
    image_root: Optional[str] = None
    # Decoding after the first pass over the images: "pil" (DataLoader workers), "dali" (nvJPEG on a
    # GPU, DALI's CPU operators otherwise), "auto" (DALI on a GPU when installed, else PIL). The
    # first pass (zero-shot scoring) always uses PIL, which skips and records broken files.
    decoder: str = "auto"
    # Training images kept decoded in memory (on the GPU when there is one) instead of decoded every
    # epoch: "auto" (when they fit in resident_max_gb), "always", "never".
    resident: str = "auto"
    resident_max_gb: float = 8.0
    # A few labelled images per class (a folder of class sub-folders, a CSV of path,label, or a CoOp
    # split JSON; `train --labeled`): each class's shots take its first places in S* with their own
    # labels, are never filtered out, and always join phase II's training set. An image also in the
    # pool is used once, with the shot's label. None: the fully unlabelled setting.
    labeled: Optional[str] = None
    # For a CoOp split JSON given as `labeled`: its split.
    labeled_split: Optional[str] = None


@dataclass
class ZeroShotConfig:
    # "single" ("a photo of a {}."), "ensemble" (CLIP's 80 ImageNet templates), a JSON file (a list
    # of templates with "{}" for the class name, or a mapping class -> list of sentences), or "auto",
    # resolved before the config is printed or saved: the paper's hand template ("single") for coft
    # and self-train; for coft+ (which averages LLM-written templates) the 80-template ensemble when no
    # file is given, with a warning; "ensemble" for `coft-fast zeroshot` (CLIP's own practice).
    templates: str = "auto"


@dataclass
class PseudoConfig:
    # Class-balanced top-K: the K most confident zero-shot samples of each class form S*.
    top_k: int = 16
    # Beyond the paper, "none" by default: before selection, the pool's zero-shot labels are refined
    # on its frozen features. "knn": a confidence-weighted vote of each image's knn_k nearest
    # neighbours; "transclip": TransCLIP's transductive solver (Zanella et al., NeurIPS 2024; class
    # Gaussians, a 3-neighbour graph, a KL tie to the zero-shot softmax). S* is ranked by the refined
    # labels' confidence, and every later stage trains on the refined labels.
    refine: str = "none"
    knn_k: int = 10
    # Where the labels come from: "zeroshot" (CLIP's zero-shot pseudo-labels; CoFT) or "given" (the
    # labels the pool came with, which may be wrong; `coft-fast clean-labels`): the filter judges the
    # given labels (filter.detector: out-of-fold linear probes by default, or the phase-I prompt
    # models trained on S*, the class-balanced top-K ranked by the zero-shot probability of the given
    # label), phase II trains on the kept ones, and the run writes label_issues.csv.
    source: str = "zeroshot"


@dataclass
class Phase1Config:
    """Prompt tuning of the two models on S* (defaults: the paper's, else DeFT's; the schedule counted in steps)."""

    # Context vectors per prompt (M), shared by all classes, initialised N(0, init_std).
    n_ctx: int = 16
    ctx_init_std: float = 0.02
    # Deep visual prompt tokens per ViT block (N); 0 turns visual prompts off.
    vpt_tokens: int = 20
    # Weight of L2 (the negative-prompt loss) in L1 + lam * L2.
    lam: float = 1.0
    # DEFT's gradients: both on. The paper's reading (L2 also trains the visual prompts): both off.
    detach_image_in_neg: bool = False
    detach_pos_in_l2: bool = False
    # Optimiser steps: at least `steps`, and at least `min_epochs` passes over S*.
    steps: int = 1000
    min_epochs: int = 10
    # DeFT's batch (the method doc); the `testbed` recipe uses 32.
    batch_size: int = 64
    lr: float = 0.03
    # The visual prompts learn at lr * vpt_lr_scale (the text contexts at lr). 1: one learning rate,
    # as DeFT. The `testbed` recipe uses 0.1: at 1.0 the deep prompts overfit S* on the test bed
    # (bench/results/phase1_variants.md: a phase I model scores 43.2 % on cifar10/test at 1.0, 47.4 %
    # at 0.1, zero-shot 42.3 %).
    vpt_lr_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 50
    # Training augmentation: "deft" (DeFT's transform for both phases: Resize(256) -> RandomCrop(224)
    # -> horizontal flip for 224-px models, the same ratios for other input sizes) or
    # "random_resized_crop" (area in [crop_scale_min, 1], aspect 3/4..4/3, flip; the `testbed` recipe).
    augment: str = "deft"
    # Random-resized-crop scale range lower bound (augment=random_resized_crop only; 1.0 = no crop).
    crop_scale_min: float = 0.5
    # "joint": positive and negative prompts in one text-encoder call, cut after the last end-of-text
    # token (exact); "separate": two calls over the full context, as the research code does.
    text_encoding: str = "joint"
    # L2's complement label: 0 draws it uniformly from the other classes (the paper's); w in (0, 1]
    # draws it from (1 - w) * uniform + w * the model's own detached softmax over the other classes
    # (hard complements: its confusions, e.g. cat for dog), per batch.
    complement_hard_weight: float = 0.0
    # What the two models train on: "s_star" (the paper's: both on S*, the class-balanced top-K);
    # "s_star_then_pool" (DeFT-style: after S*, each continues on every pool label with DeFT's
    # warm-up and self-selection); "pool_halves" (each model on one seeded, class-stratified half of
    # the pool's labels from the start, DeFT-style, so each label is also judged by a model that never
    # trained on it); "s_star_halves" (diversity: each model on one class-stratified half of S*, so
    # raise pseudo.top_k to keep K per model); "auto": s_star, for zero-shot and for given labels
    # alike (pool_halves ranked given labels worse on the test bed: docs/noisy-labels.md).
    train_on: str = "auto"
    # CoFT+ only: how each round ranks a model's pool labels for its next top-K: "own" (its own
    # softmax confidence, the paper's) or "peer" (that times the other model's p_clean of the label).
    round_ranking: str = "own"
    # DeFT's self-selection on a whole labelled set: after this many epochs on every label, L1 counts
    # only samples whose p_clean > 0.5, and L2's positive target is the prediction where it is not.
    selection_warmup_epochs: int = 1
    # Seeds of the two models (they differ only in initialisation and data order).
    seeds: List[int] = field(default_factory=lambda: [1, 2])
    # CoFT+ only: rounds of phase I (the method doc's R, default 3). In round r > 1 each model of
    # round r - 1 labels the pool, takes its own class-balanced top-K, and is re-initialised and
    # trained on it. CoFT runs one round.
    rounds: int = 3


@dataclass
class FilterConfig:
    # A label is kept when the validating model's p_clean exceeds this (the method: 0.5, s+ > s-).
    threshold: float = 0.5
    # The decision over the two models' labels and clean probabilities: "paper" (the method's:
    # each set by the other model's p_clean > threshold), "agreement" (kept only where both models
    # give the same label and each validates it), or "mixture" (per class, a two-component Gaussian
    # mixture on logit p_clean, as DivideMix fits one to the loss). See pseudo/filter.py: decide.
    # "auto": mixture with the probe detector, else paper.
    rule: str = "auto"
    # Who judges the labels: "prompts" (the phase-I models' p_clean, the paper's filter) or, for
    # given labels only, "probe" (no phase I: two K-fold ensembles of linear probes on the frozen
    # image features, each label judged out of fold; pseudo/probe_detector.py). "auto": probe for
    # given labels with method coft and phase1.train_on left at auto, else prompts.
    detector: str = "auto"
    # The probe detector: folds per model, and rounds (round r > 1 trains only on the labels the
    # previous round's out-of-fold prediction agrees with: DeFT's self-selection).
    probe_folds: int = 5
    probe_rounds: int = 2


@dataclass
class Phase2Config:
    """Full fine-tuning of a fresh visual encoder plus a linear head on the clean set."""

    # The classification loss: "ce" (cross-entropy, the paper's) or "gce" (generalized
    # cross-entropy, (1 - p_y^q) / q, robust to label noise; Zhang & Sabuncu 2018).
    loss: str = "ce"
    gce_q: float = 0.7
    # Given labels (clean-labels) only: also train on the flagged images whose label both phase-I
    # models agree on and validate, with that label (false: the kept images only, DeFT's choice).
    relabel_issues: bool = False
    # Per-sample weights of the loss: "none" (the paper's) or "clean_probability" (each kept sample
    # weighted by the validating model's p_clean of its label; labelled shots weigh 1).
    sample_weight: str = "none"
    # Which clean set to train on: "s1" (model 1's labels validated by model 2), "s2", or "both"
    # (two runs, reported separately and as a logit ensemble: the mean of the two heads' logits).
    train_on: str = "s1"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    # The head learns this many times faster than the backbone.
    head_lr_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    # Training augmentation of the labelled images, as phase1.augment (CoFT+'s contrastive views are
    # always random resized crops with crop_scale_min, as MoCo's).
    augment: str = "deft"
    crop_scale_min: float = 0.5
    # Logit-adjusted cross-entropy (beyond the paper; Menon et al. 2021): tau * log(prior of the
    # training labels) is added to the logits inside the loss, so classes that the pseudo-labels
    # under-represent (a biased text side starves tail classes) are not learnt as rare. 0: plain
    # cross-entropy (the paper's Eq. 7, the default); 1.0 targets balanced accuracy (the `testbed`
    # recipe, bench/results/e2e_cifar10_logit_adjust.md).
    logit_adjust: float = 0.0
    # "zeroshot": the head starts as the zero-shot classifier (training starts at zero-shot
    # accuracy); "random": a freshly initialised head; "probe": LP-FT (Kumar et al., ICLR 2022), the
    # head first trained alone as a linear probe on the frozen tower's features of the training set,
    # then the whole tower with it (beyond the paper).
    head_init: str = "zeroshot"
    # Leave-one-out kNN accuracy of the encoder's features on the labelled evaluation images,
    # measured after every epoch (MoCo's monitor; never uses pool labels). One extra pass per epoch.
    knn_monitor: bool = False
    knn_k: int = 20
    # Distillation: another open_clip backbone for phase II (None: the phase I model).
    model: Optional[str] = None
    # Its pre-trained tag or checkpoint. None: model.pretrained when phase2.model has that tag (the
    # resolved config shows it); otherwise the run stops with an error naming phase2.pretrained.
    pretrained: Optional[str] = None


@dataclass
class ContrastiveConfig:
    """CoFT+ phase II: InfoNCE of the fine-tuned encoder against a momentum encoder's key queue.

    Not given by the paper; defaults from MoCo (momentum, queue, temperature) and the method doc.
    """

    # Weight of the contrastive loss: L_FFT + gamma * L_cont (0 turns it off).
    gamma: float = 1.0
    # EMA momentum mu of the key encoder.
    momentum: float = 0.999
    # InfoNCE temperature tau'.
    temperature: float = 0.07
    # FIFO queue length, capped at queue_pool_fraction of the pool (so that a sample's own stale
    # key is rarely a negative), and never below one batch.
    queue_size: int = 65536
    queue_pool_fraction: float = 0.25
    # Output size of a projection MLP on queries and keys; 0: none (as in the paper).
    projection_dim: int = 0


@dataclass
class TestbedConfig:
    """The offline stand-in for a pre-trained CLIP (see coft_fast/testbed_builder.py and its README section)."""

    # Architecture (open_clip CLIP config).
    image_size: int = 32
    patch_size: int = 4
    vision_width: int = 128
    vision_layers: int = 4
    vision_head_width: int = 32
    embed_dim: int = 128
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 2
    context_length: int = 32
    # Stage 1: image tower trained as a cosine classifier on the labelled images.
    image_epochs: int = 10
    image_batch_size: int = 128
    image_lr: float = 1e-3
    image_weight_decay: float = 0.05
    classifier_scale: float = 16.0
    # DeiT-style hard distillation in stage 1: a small convolutional teacher is trained first on the
    # same images (then thrown away, like the classifier weights) and the tower's loss is
    # (1 - distill_weight) * CE(label) + distill_weight * CE(teacher's label of the augmented view).
    # teacher_width 0: no teacher (the default test bed); else the teacher's first layer's channels.
    teacher_width: int = 0
    teacher_epochs: int = 10
    teacher_batch_size: int = 256
    teacher_lr: float = 0.1
    distill_weight: float = 0.5
    # Stage 2: fresh text tower aligned to the frozen image tower on biased captions.
    text_steps: int = 600
    text_batch_size: int = 256
    text_lr: float = 1e-3
    # Captioned images per class fall from the most to the least frequent class by this ratio
    # (classes ranked by a seeded permutation); 1 means balanced.
    longtail_ratio: float = 50.0
    # Share of captions naming the class's look-alike (its nearest class by stage-1 weights).
    lookalike_share: float = 0.3
    # Images per class used from the input folder (None: all).
    per_class: Optional[int] = None


# Named test-bed presets: each is a set of ``testbed.*`` fields over the defaults (`coft-fast testbed
# --preset NAME`); none of them is specific to one dataset. "default" is the CIFAR-10 test bed of the
# benchmark tables; "strong" trades build time (about 42 minutes on 2 cores for 40,000 32-px images)
# for image features with CLIP-like few-shot headroom, keeping the same biased text tower with a larger
# look-alike share (0.4: at 0.3 its zero-shot on CIFAR-10 was 56 %; bench/results/testbed_strong.md).
TESTBED_PRESETS: Dict[str, Dict] = {
    "default": {},
    "strong": dict(image_epochs=18, teacher_width=16, teacher_epochs=10, distill_weight=0.5, lookalike_share=0.4),
    # the demo's test bed, built on scikit-learn's digits (under a minute on 2 cores)
    "digits": dict(
        image_size=16, patch_size=4, vision_width=64, vision_layers=2, vision_head_width=32, embed_dim=64,
        text_width=64, text_heads=2, text_layers=1, image_epochs=30, image_batch_size=64, text_steps=300,
        text_batch_size=128,
    ),
    # a much smaller, faster one for unit tests (seconds on 2 cores)
    "tiny": dict(
        image_size=16, patch_size=4, vision_width=32, vision_layers=2, vision_head_width=16, embed_dim=32,
        text_width=32, text_heads=2, text_layers=1, image_epochs=4, image_batch_size=64, text_steps=80,
        text_batch_size=128,
    ),
}
# One line each for `coft-fast testbed --help`.
TESTBED_PRESET_HELP: Dict[str, str] = {
    "default": "the test bed of the CIFAR-10 tables (ViT 128x4, 10 epochs; about 6 min for 10k images)",
    "strong": "stronger image features for the same kind of biased text tower (18 epochs, distilled from a "
              "convolutional teacher; look-alike share 0.4; about 42 min for 40k 32-px images on 2 cores)",
    "digits": "the demo's test bed (16 px, small)",
    "tiny": "the unit tests' test bed (seconds)",
}


@dataclass
class RunConfig:
    # Output folder of a run (None: nothing is written).
    out_dir: Optional[str] = None
    # Show tqdm progress bars.
    progress: bool = True
    # Training checkpoints are written at epoch ends, at most this often (and at the end of a stage).
    checkpoint_seconds: float = 60.0
    # torch.compile of the phase II model and the zero-shot image encoder: null (auto: on for CUDA,
    # off on CPU, where it did not pay for its compile time), true or false.
    compile: Optional[bool] = None
    # Loss ops: "auto" (fused Triton kernels on CUDA, the chunked references elsewhere),
    # "reference", "triton", or "eager" (the research code's unfused formulations).
    op_backend: str = "auto"
    # Reuse work across phases: decode each image once for both phase-I models, encode the zero-shot
    # prompts once. False recomputes them where they are used (the naive baseline).
    reuse: bool = True
    # TF32 for float32 matmuls (torch's and the Triton kernels' float32 dots): faster, about 3 decimal
    # digits; false keeps float32 accuracy (the kernels then use tf32x3). Under autocast (bf16, the
    # default on CUDA) it only affects the float32 parts.
    tf32: bool = False
    # Deterministic algorithms (torch.use_deterministic_algorithms, which also switches it on): the
    # kernels use one fixed config and no atomic adds, so a resumed run repeats bitwise on one GPU model.
    deterministic: bool = False


METHODS = ("coft", "coft+", "self-train")
AUGMENTATIONS = ("deft", "random_resized_crop")
REFINE_CHOICES = ("none", "knn", "transclip")
# Keys that no longer exist: (the value that meant "off", which a saved run config may still carry and
# is ignored; what to use instead). Any other value, and any --set of the key, is an error.
REMOVED_KEYS = {
    "pseudo.knn_refine": (False, "use pseudo.refine=knn (or none, or transclip)"),
}


def check_removed(key: str, value: Any, explicit: bool) -> bool:
    """True when ``key`` was removed and ``value`` may be ignored (a saved config's old default);
    a ConfigError naming the key and its replacement when the key was set otherwise."""
    if key not in REMOVED_KEYS:
        return False
    off, instead = REMOVED_KEYS[key]
    if not explicit and value == off:
        return True
    raise ConfigError(f"config key {key!r} was removed: {instead}")


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
        """Check values that types alone cannot; returns self."""
        if self.method not in METHODS:
            raise ConfigError(f"config key 'method' must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.phase2.train_on not in ("s1", "s2", "both"):
            raise ConfigError(f"config key 'phase2.train_on' must be s1, s2 or both, got {self.phase2.train_on!r}")
        if self.phase2.head_init not in ("zeroshot", "random", "probe"):
            raise ConfigError("config key 'phase2.head_init' must be zeroshot, random or probe, got "
                              f"{self.phase2.head_init!r}")
        if self.phase2.head_init == "probe" and self.phase2.model:
            raise ConfigError("config key 'phase2.head_init' is probe, which fits the head on the phase I model's "
                              f"features, but phase2.model is {self.phase2.model}: use zeroshot or random")
        if len(self.phase1.seeds) != 2 or self.phase1.seeds[0] == self.phase1.seeds[1]:
            raise ConfigError(f"config key 'phase1.seeds' must hold two different seeds, got {self.phase1.seeds}")
        if not 0.0 < self.filter.threshold < 1.0:
            raise ConfigError(f"config key 'filter.threshold' must be in (0, 1), got {self.filter.threshold}")
        for key in ("phase1.crop_scale_min", "phase2.crop_scale_min"):
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"config key {key!r} must be in (0, 1], got {value}")
        if self.pseudo.source == "given" and self.pseudo.refine != "none":
            raise ConfigError(f"config key 'pseudo.refine' is {self.pseudo.refine}, which relabels zero-shot "
                              "pseudo-labels; it cannot be combined with pseudo.source=given (the pool's own labels)")
        if self.pseudo.source == "given" and self.filter.rule == "agreement":
            raise ConfigError("config key 'filter.rule' is agreement, but with pseudo.source=given there are no two "
                              "generated labels to agree on: use paper or mixture")
        if self.filter.detector == "probe":
            if self.pseudo.source != "given" or self.method != "coft":
                raise ConfigError("config key 'filter.detector' is probe, which judges given labels in place of phase I: "
                                  f"it needs pseudo.source=given and method=coft (got {self.pseudo.source} and "
                                  f"{self.method}); use prompts")
            if self.phase1.train_on not in ("auto", "s_star"):
                raise ConfigError(f"config key 'phase1.train_on' is {self.phase1.train_on}, but filter.detector=probe "
                                  "trains no phase-I models: use filter.detector=prompts")
        if self.filter.probe_folds < 2 or self.filter.probe_rounds < 1:
            raise ConfigError("config keys 'filter.probe_folds' and 'filter.probe_rounds' must be >= 2 and >= 1, got "
                              f"{self.filter.probe_folds} and {self.filter.probe_rounds}")
        if self.method == "coft+" and self.phase1.train_on not in ("auto", "s_star"):
            raise ConfigError(f"config key 'phase1.train_on' is {self.phase1.train_on}, but CoFT+ rounds train on "
                              "each round's top-K subsets: use s_star (or auto) with method=coft+")
        if self.phase1.selection_warmup_epochs < 0:
            raise ConfigError("config key 'phase1.selection_warmup_epochs' must be >= 0, got "
                              f"{self.phase1.selection_warmup_epochs}")
        if self.phase2.relabel_issues is not False and (self.pseudo.source != "given" or self.phase2.relabel_issues is not True):
            raise ConfigError("config key 'phase2.relabel_issues' must be true or false, and true only with given labels "
                              f"(pseudo.source=given, clean-labels); got {self.phase2.relabel_issues!r} with pseudo.source="
                              f"{self.pseudo.source}")
        if self.method == "self-train" and self.phase2.sample_weight != "none":
            raise ConfigError("config key 'phase2.sample_weight' weights the filter's clean sets; self-training has none "
                              "(use none)")
        if not self.phase2.gce_q > 0 or self.phase2.gce_q > 1:
            raise ConfigError(f"config key 'phase2.gce_q' must be in (0, 1], got {self.phase2.gce_q}")
        if self.pseudo.source == "given" and self.phase2.train_on == "both":
            raise ConfigError("config key 'phase2.train_on' is both, but with pseudo.source=given the two clean sets are "
                              "one (the given labels both models keep): use s1")
        choices = {"data.decoder": ("auto", "pil", "dali"), "data.resident": ("auto", "always", "never"),
                   "pseudo.source": ("zeroshot", "given"), "pseudo.refine": REFINE_CHOICES,
                   "filter.rule": ("auto", "paper", "agreement", "mixture"),
                   "filter.detector": ("auto", "prompts", "probe"),
                   "phase1.train_on": ("auto", "s_star", "s_star_then_pool", "pool_halves", "s_star_halves"),
                   "phase1.round_ranking": ("own", "peer"),
                   "phase2.loss": ("ce", "gce"), "phase2.sample_weight": ("none", "clean_probability"),
                   "phase1.text_encoding": ("joint", "separate"),
                   "phase1.augment": AUGMENTATIONS, "phase2.augment": AUGMENTATIONS,
                   "run.op_backend": ("auto", "reference", "triton", "eager")}
        for key, allowed in choices.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if value not in allowed:
                raise ConfigError(f"config key {key!r} must be one of {', '.join(allowed)}, got {value!r}")
        for key in ("run.tf32", "run.deterministic"):
            value = getattr(self.run, key.split(".")[1])
            if not isinstance(value, bool):
                raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        if self.model.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"config key 'model.precision' must be auto, fp32 or bf16, got {self.model.precision!r}")
        positive = {
            "data.batch_size": self.data.batch_size,
            "pseudo.top_k": self.pseudo.top_k,
            "pseudo.knn_k": self.pseudo.knn_k,
            "phase2.knn_k": self.phase2.knn_k,
            "phase1.batch_size": self.phase1.batch_size,
            "phase1.steps": self.phase1.steps,
            "phase2.batch_size": self.phase2.batch_size,
            "phase2.epochs": self.phase2.epochs,
            "phase1.rounds": self.phase1.rounds,
            "contrastive.queue_size": self.contrastive.queue_size,
            "testbed.image_epochs": self.testbed.image_epochs,
            "testbed.text_steps": self.testbed.text_steps,
            "testbed.context_length": self.testbed.context_length,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"config key {key!r} must be at least 1, got {value}")
        non_negative = {
            "data.resident_max_gb": self.data.resident_max_gb,
            "data.num_workers": self.data.num_workers,
            "phase1.vpt_lr_scale": self.phase1.vpt_lr_scale,
            "phase2.logit_adjust": self.phase2.logit_adjust,
            "contrastive.gamma": self.contrastive.gamma,
            "contrastive.projection_dim": self.contrastive.projection_dim,
        }
        for key, value in non_negative.items():
            if not value >= 0:  # written so that NaN is refused too
                raise ConfigError(f"config key {key!r} must be >= 0, got {value}")
        contrastive = self.contrastive
        if not 0.0 <= contrastive.momentum < 1.0:
            raise ConfigError(f"config key 'contrastive.momentum' must be in [0, 1), got {contrastive.momentum}")
        if not 0.0 < contrastive.queue_pool_fraction <= 1.0:
            raise ConfigError(f"config key 'contrastive.queue_pool_fraction' must be in (0, 1], got {contrastive.queue_pool_fraction}")
        if not contrastive.temperature > 0:
            raise ConfigError(f"config key 'contrastive.temperature' must be > 0, got {contrastive.temperature}")
        for key in ("teacher_width", "teacher_epochs", "teacher_batch_size"):
            if getattr(self.testbed, key) < (0 if key == "teacher_width" else 1):
                raise ConfigError(f"config key 'testbed.{key}' must be at least "
                                  f"{0 if key == 'teacher_width' else 1}, got {getattr(self.testbed, key)}")
        if not 0.0 <= self.phase1.complement_hard_weight <= 1.0:
            raise ConfigError("config key 'phase1.complement_hard_weight' must be in [0, 1] (0: uniform complements, "
                              f"the paper's), got {self.phase1.complement_hard_weight}")
        if not 0.0 <= self.testbed.distill_weight <= 1.0:
            raise ConfigError(f"config key 'testbed.distill_weight' must be in [0, 1], got {self.testbed.distill_weight}")
        if not 0.0 <= self.testbed.lookalike_share < 1.0:
            raise ConfigError(f"config key 'testbed.lookalike_share' must be in [0, 1), got {self.testbed.lookalike_share}")
        if self.testbed.longtail_ratio < 1.0:
            raise ConfigError(f"config key 'testbed.longtail_ratio' must be >= 1, got {self.testbed.longtail_ratio}")
        for key, value in (("data.split", self.data.split), ("data.eval_split", self.data.eval_split)):
            if value not in (None, "train", "val", "test"):
                raise ConfigError(f"config key {key!r} must be train, val or test, got {value!r}")
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


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _field_types(obj: Any) -> Dict[str, Any]:
    return typing.get_type_hints(type(obj))


def set_value(cfg: Any, dotted_key: str, value: Any) -> None:
    """Set a (possibly nested) field, checking the key exists and the value has the field's type."""
    check_removed(dotted_key, value, explicit=True)  # a removed key given explicitly is an error
    parts = dotted_key.split(".")
    target = cfg
    for depth, name in enumerate(parts):
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"unknown config key {dotted_key!r}: {'.'.join(parts[:depth])} is not a section")
        types_ = _field_types(target)
        if name not in types_:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(
                f"unknown config key {dotted_key!r}: {where} has no field {name!r} "
                f"(known: {', '.join(sorted(types_))})"
            )
        if depth == len(parts) - 1:
            current = getattr(target, name)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key {dotted_key!r} is a section: give a mapping, got {value!r}")
                _update(current, value, prefix=dotted_key + ".")
            else:
                setattr(target, name, _coerce(value, types_[name], dotted_key))
        else:
            target = getattr(target, name)


def _update(section: Any, data: Dict[str, Any], prefix: str) -> None:
    for key, value in data.items():
        if check_removed(prefix + str(key), value, explicit=False):
            continue
        try:
            set_value(section, str(key), value)
        except ConfigError as exc:
            # report the full dotted key, not the one relative to this section
            raise ConfigError(str(exc).replace(repr(str(key)), repr(prefix + str(key)), 1)) from None


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key {key!r} got {value!r}")
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        return [_coerce(item, args[0], key) for item in value] if args else list(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} expects true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} expects an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
        raise ConfigError(f"config key {key!r} expects a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r} expects a string, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------- auto values
def resolve_filter(cfg: Config) -> Config:
    """``filter.detector`` and ``filter.rule`` at auto replaced by what they resolve to (in place;
    see :func:`resolve_auto`); the pipeline calls it too, for configs that skipped resolve_auto."""
    if cfg.filter.detector == "auto":
        probe = cfg.pseudo.source == "given" and cfg.method == "coft" and cfg.phase1.train_on == "auto"
        cfg.filter.detector = "probe" if probe else "prompts"
    if cfg.filter.rule == "auto":
        cfg.filter.rule = "mixture" if cfg.filter.detector == "probe" else "paper"
    return cfg


def resolve_auto(cfg: Config, command: str = "train") -> Config:
    """Replace the values that depend on others by what they resolve to (in place; returns ``cfg``),
    so that a printed or saved config shows what a run uses:

    - ``zeroshot.templates=auto``: "ensemble" for the ``zeroshot`` command and for coft+ (with a
      warning: the paper's CoFT+ averages LLM-written templates, give them with --templates), else
      "single" (the paper's hand template);
    - ``filter.detector=auto``: "probe" for given labels (pseudo.source=given, the ``clean-labels``
      command) with method coft and phase1.train_on left at auto, where it ranked labels best on the
      test bed (docs/noisy-labels.md); else "prompts" (the paper's);
    - ``filter.rule=auto``: "mixture" with the probe detector, else "paper";
    - ``phase1.train_on=auto``: "s_star" (the paper's; also for given labels, where "pool_halves" was
      measured and ranked labels worse);
    - ``phase2.pretrained`` unset while ``phase2.model`` is another open_clip model: ``model.pretrained``
      when ``phase2.model`` has that pre-trained tag, else a ConfigError naming ``phase2.pretrained``
      (a phase II backbone with random weights is never built by accident).
    """
    import logging

    if cfg.zeroshot.templates == "auto":
        if command == "zeroshot":
            cfg.zeroshot.templates = "ensemble"
        elif cfg.method == "coft+":
            logging.getLogger("coft_fast").warning(
                "method coft+: no --templates file given, so zero-shot pseudo-labels use CLIP's 80-template ensemble; "
                "the paper's CoFT+ averages LLM-written templates (see `coft-fast templates`)")
            cfg.zeroshot.templates = "ensemble"
        else:
            cfg.zeroshot.templates = "single"
    resolve_filter(cfg)
    if cfg.phase1.train_on == "auto":
        cfg.phase1.train_on = "s_star"
    phase2 = cfg.phase2
    if phase2.model and phase2.pretrained is None and not phase2.model.startswith("local-dir:"):
        inherited = cfg.model.pretrained
        if inherited is not None:  # model.pretrained=null: the user asked for random weights, kept for both
            if inherited not in pretrained_tags(phase2.model):
                raise ConfigError(
                    f"config key 'phase2.pretrained' is not set and phase2.model={phase2.model!r} has no pre-trained "
                    f"tag {inherited!r} (model.pretrained) to inherit: set phase2.pretrained to one of its tags "
                    f"({', '.join(pretrained_tags(phase2.model)) or 'none known'}) or to a checkpoint file")
            phase2.pretrained = inherited
    return cfg


def pretrained_tags(model_name: str) -> List[str]:
    """open_clip's pre-trained tags of ``model_name`` (empty for a name it does not know)."""
    import open_clip

    try:
        return list(open_clip.list_pretrained_tags_by_model(model_name))
    except Exception:
        return []


# ---------------------------------------------------------------------------------------- recipes
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
RECIPE_KEYS = ("recipe", "version", "summary", "config")


@dataclass
class Recipe:
    """A named, versioned config shipped with the package (coft_fast/recipes/NAME.yaml): ``config``
    holds the fields it sets over the defaults, each with a comment saying where its value comes from."""

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
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe file {path} is not valid YAML: {exc}") from None
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


def config_file_settings(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The mapping a YAML config file holds (an error naming the file when it is not one)."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def apply_file(cfg: Config, path: Union[str, os.PathLike]) -> Config:
    """Apply a YAML config file over ``cfg`` (the file's keys win); returns ``cfg``."""
    data = config_file_settings(path)
    try:
        _update(cfg, data, prefix="")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg
