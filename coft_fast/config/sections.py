"""The sections of :class:`coft_fast.config.Config`: one dataclass each, every field with its default
and a comment saying what it does and where its value comes from; and the named test-bed presets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class ModelConfig:
    # open_clip model name ("ViT-B-16"), or "local-dir:/path" for open_clip's folder format.
    name: str = "ViT-B-16"
    # open_clip pre-trained tag ("openai", "laion2b_s34b_b88k") or a local checkpoint path (ignored
    # for "local-dir:" models); None: random initialisation.
    pretrained: Optional[str] = "openai"
    # QuickGELU activation: None decides from the weights (OpenAI weights need it).
    quick_gelu: Optional[bool] = None
    # "auto": CUDA when available, else CPU.
    device: str = "auto"
    # "auto": bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16".
    precision: str = "auto"
    # open_clip download cache folder (None: open_clip's default).
    cache_dir: Optional[str] = None


@dataclass
class DataConfig:
    # Images per inference batch.
    batch_size: int = 256
    # DataLoader worker processes for decoding (0 decodes in the main process).
    num_workers: int = 2
    # The split of a CoOp split JSON to read ("train", "val" or "test"), and of one given as
    # evaluation images (train --eval-images).
    split: Optional[str] = None
    eval_split: str = "test"
    # The folder a CoOp split JSON's paths are relative to (None: found next to it).
    image_root: Optional[str] = None
    # Decoding after the first pass over the images: "pil" (DataLoader workers), "dali" (nvJPEG on a
    # GPU, DALI's CPU operators otherwise), "auto" (DALI on a GPU when installed, else PIL). The
    # first pass (zero-shot scoring) always uses PIL, which skips and records broken files.
    decoder: str = "auto"
    # Training images kept decoded in memory (on the GPU when there is one) instead of decoded every
    # epoch: "auto" (when they fit in resident_max_gb), "always", "never".
    resident: str = "auto"
    resident_max_gb: float = 8.0
    # A few labelled images per class (class sub-folders, a CSV of path,label, or a CoOp split JSON read
    # at labeled_split; `train --labeled`): first in S* with their labels, never filtered out, always in
    # phase II's training set (a pool image among them counts once). None: the fully unlabelled setting.
    labeled: Optional[str] = None
    labeled_split: Optional[str] = None


@dataclass
class ZeroShotConfig:
    # "single" ("a photo of a {}."), "ensemble" (CLIP's 80 ImageNet templates), a JSON file (templates
    # with "{}" for the class name, or a mapping class -> sentences), or "auto", resolved before the
    # config is printed or saved: "single" (the paper's hand template) for coft and self-train;
    # "ensemble" for coft+ (with a warning: the paper's CoFT+ averages LLM-written templates given as
    # a file) and for `coft-fast zeroshot` (CLIP's own practice).
    templates: str = "auto"


@dataclass
class PseudoConfig:
    # Class-balanced top-K: the K most confident zero-shot samples of each class form S*.
    top_k: int = 16
    # Beyond the paper ("none" by default): the pool's zero-shot labels refined on its frozen features
    # before S* is ranked by their confidence (every later stage trains on them). "knn": a
    # confidence-weighted vote of the knn_k nearest neighbours; "transclip": TransCLIP (Zanella et
    # al., NeurIPS 2024; class Gaussians, a 3-neighbour graph, a KL tie to the zero-shot softmax).
    refine: str = "none"
    knn_k: int = 10
    # Where the labels come from: "zeroshot" (CLIP's pseudo-labels; CoFT) or "given" (the pool's own,
    # possibly wrong, labels; `coft-fast clean-labels`): the filter judges the given labels
    # (filter.detector; with prompts, S* holds the class-balanced top-K by the zero-shot probability
    # of the given label), phase II trains on the kept ones, and the run writes label_issues.csv.
    source: str = "zeroshot"


@dataclass
class Phase1Config:
    """Prompt tuning of the two models on S* (defaults: the paper's, else DeFT's; the schedule counted in steps)."""

    # Context vectors per prompt (M), shared by all classes, initialised N(0, ctx_init_std).
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
    # The visual prompts learn at lr * vpt_lr_scale (1: one learning rate, as DeFT). The `testbed`
    # recipe uses 0.1: at 1.0 the deep prompts overfit S* on the test bed (phase I model 43.2 % on
    # cifar10/test at 1.0, 47.4 % at 0.1, zero-shot 42.3 %; bench/results/phase1_variants.md).
    vpt_lr_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 50
    # Training augmentation: "deft" (DeFT's transform for both phases: Resize(256) -> RandomCrop(224)
    # -> horizontal flip for 224-px models, the same ratios for other sizes) or "random_resized_crop"
    # (area in [crop_scale_min, 1], aspect 3/4..4/3, flip; the `testbed` recipe; crop_scale_min 1.0: no crop).
    augment: str = "deft"
    crop_scale_min: float = 0.5
    # "joint": positive and negative prompts in one text-encoder call, cut after the last end-of-text
    # token (exact); "separate": two calls over the full context, as the research code does.
    text_encoding: str = "joint"
    # CoFT+ only: how each round ranks a model's pool labels for its next top-K: "own" (its softmax
    # confidence, the paper's) or "peer" (that times the other model's p_clean of the label).
    round_ranking: str = "own"
    # Seeds of the two models (they differ only in initialisation and data order).
    seeds: List[int] = field(default_factory=lambda: [1, 2])
    # CoFT+ only (CoFT runs one): rounds of phase I (the method doc's R). In round r > 1 each model of
    # round r - 1 labels the pool and is re-initialised and trained on its own class-balanced top-K.
    rounds: int = 3


@dataclass
class FilterConfig:
    # A label is kept when the validating model's p_clean exceeds this (the method: 0.5, s+ > s-).
    threshold: float = 0.5
    # The decision over the two models' labels and p_clean: "paper" (each set by the other model's
    # p_clean > threshold), "mixture" (per class, a two-component Gaussian mixture on logit p_clean,
    # as DivideMix; pseudo/filter.py: decide) or "auto" (mixture with the probe detector, else paper).
    rule: str = "auto"
    # Who judges the labels: "prompts" (the phase-I models' p_clean, the paper's filter) or, for given
    # labels only, "probe" (no phase I: two K-fold ensembles of linear probes on the frozen image
    # features, each label judged out of fold; pseudo/probe_detector.py). "auto": probe for given
    # labels with method coft (it ranked labels best on the test bed: docs/noisy-labels.md), else prompts.
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
    # Training augmentation, as phase1's (CoFT+'s contrastive views are always random resized crops
    # with crop_scale_min, as MoCo's).
    augment: str = "deft"
    crop_scale_min: float = 0.5
    # Logit-adjusted cross-entropy (beyond the paper; Menon et al. 2021): tau * log(training label prior)
    # is added to the logits in the loss, so classes the pseudo-labels under-represent are not learnt as
    # rare. 0: plain cross-entropy (the paper's Eq. 7); 1.0 targets balanced accuracy (the `testbed`
    # recipe; bench/results/e2e_cifar10_logit_adjust.md).
    logit_adjust: float = 0.0
    # "zeroshot": the head starts as the zero-shot classifier; "random": a fresh head; "probe": LP-FT
    # (Kumar et al., ICLR 2022; beyond the paper), the head first fitted alone as a linear probe on
    # the frozen tower's features of the training set, then trained with the whole tower.
    head_init: str = "zeroshot"
    # Distillation: another open_clip backbone for phase II (None: the phase I model), and its
    # pre-trained tag or checkpoint (None: model.pretrained when phase2.model has that tag, which the
    # resolved config shows; otherwise the run stops with an error naming phase2.pretrained).
    model: Optional[str] = None
    pretrained: Optional[str] = None


@dataclass
class ContrastiveConfig:
    """CoFT+ phase II: InfoNCE of the fine-tuned encoder against a momentum encoder's key queue (not
    given by the paper; defaults from MoCo: momentum, queue, temperature; and the method doc)."""

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
    # DeiT-style hard distillation in stage 1 from a small convnet teacher trained first on the same
    # images (then thrown away): (1 - distill_weight) * CE(label) + distill_weight * CE(teacher's label
    # of the augmented view). teacher_width: its first layer's channels (0: no teacher, the default).
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
    # Image-grounded captions: up to this many words per caption saying where the image sits in its class
    # (the sign of its offset along one of the class's top `attribute_directions` principal directions),
    # trained with CLIP's in-batch contrastive loss; 0: class-name captions only (cross-entropy over classes).
    caption_attributes: int = 0
    attribute_directions: int = 8
    # Images per class used from the input folder (None: all).
    per_class: Optional[int] = None


# Named test-bed presets (`coft-fast testbed --preset NAME`): ``testbed.*`` fields over the defaults, none
# specific to one dataset. "strong": image features with CLIP-like few-shot headroom; its look-alike share
# is 0.4 as at 0.3 its zero-shot on CIFAR-10 was 56 % (bench/results/testbed_strong.md).
TESTBED_PRESETS: Dict[str, Dict] = {
    "default": {},
    "strong": dict(image_epochs=18, teacher_width=16, teacher_epochs=10, distill_weight=0.5, lookalike_share=0.4),
    "clip-like": dict(image_epochs=18, teacher_width=16, teacher_epochs=10, distill_weight=0.5, lookalike_share=0.45,
                      caption_attributes=3, text_steps=1000),
    "digits": dict(image_size=16, patch_size=4, vision_width=64, vision_layers=2, vision_head_width=32, embed_dim=64,
                   text_width=64, text_heads=2, text_layers=1, image_epochs=30, image_batch_size=64, text_steps=300,
                   text_batch_size=128),
    "tiny": dict(image_size=16, patch_size=4, vision_width=32, vision_layers=2, vision_head_width=16, embed_dim=32,
                 text_width=32, text_heads=2, text_layers=1, image_epochs=4, image_batch_size=64, text_steps=80,
                 text_batch_size=128),
}
# One line each for `coft-fast testbed --help`.
TESTBED_PRESET_HELP: Dict[str, str] = {
    "default": "the test bed of the CIFAR-10 tables (ViT 128x4, 10 epochs; about 6 min for 10k images)",
    "strong": "stronger image features for the same kind of biased text tower (18 epochs, distilled from a "
              "convolutional teacher; look-alike share 0.4; about 42 min for 40k 32-px images on 2 cores)",
    "clip-like": "strong's image tower under a text tower trained as CLIP is, on image-grounded captions (class name "
                 "plus up to 3 words placing the image in its class) with the in-batch contrastive loss; look-alike "
                 "share 0.45 (a text-only rebuild of a strong folder's build_state/: about 6 min)",
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
    # digits; false keeps float32 accuracy (kernels use tf32x3). Under bf16 autocast (CUDA's default)
    # it only affects the float32 parts.
    tf32: bool = False
    # Deterministic algorithms (torch.use_deterministic_algorithms, which also switches it on): the
    # kernels use one fixed config and no atomic adds, so a resumed run repeats bitwise on one GPU model.
    deterministic: bool = False
