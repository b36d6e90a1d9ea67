"""Phase II: the visual tower and a linear head fine-tuned on each training set."""
from __future__ import annotations

from typing import Dict

import torch

from coft_fast.inference import CLASSIFIER_FILE, classifier_metadata
from coft_fast.models import ClipModel, load_clip
from coft_fast.models.momentum import MomentumContrast
from coft_fast.phases.phase2 import ContrastiveTerm, FineTunedClassifier, build_classifier, train_phase2
from coft_fast.runtime.checkpoint import save_tensors
from coft_fast.runtime.distributed import all_gather_rows
from coft_fast.linear_probe import train_linear_head
from coft_fast.scoring import logit_scale_of
from coft_fast.stages.context import RunContext, label_accuracy


def phase2_backbone(run: RunContext):
    """The phase II CLIP (the phase I one, or another for distillation) and its class embeddings."""
    cfg = run.cfg
    if not cfg.phase2.model:
        return run.clip, run.class_text(run.clip)
    if cfg.phase2.pretrained is None and cfg.model.pretrained is not None and not cfg.phase2.model.startswith("local-dir:"):
        raise ValueError("config key 'phase2.pretrained' is not set: phase II would fine-tune a randomly initialised "
                         f"{cfg.phase2.model} (resolve the config with coft_fast.config.resolve_auto, or set it)")
    clip2 = load_clip(cfg.phase2.model, cfg.phase2.pretrained, run.device, None, cfg.model.cache_dir)
    run.prepare(clip2)
    return clip2, run.class_text(clip2)


def contrastive_on(run: RunContext) -> bool:
    """Phase II adds CoFT+'s momentum-contrastive term."""
    return run.cfg.method == "coft+" and run.cfg.contrastive.gamma > 0


def queue_size(run: RunContext) -> int:
    """CoFT+'s key queue length: capped by a share of the pool, at least one global batch."""
    cfg = run.cfg.contrastive
    pool_size = len(run.state.positions)
    return max(min(cfg.queue_size, int(pool_size * cfg.queue_pool_fraction)), run.cfg.phase2.batch_size)


def fit_probe_head(run: RunContext, classifier: FineTunedClassifier, data: Dict[str, torch.Tensor],
                   scale: float) -> None:
    """phase2.head_init=probe (LP-FT): the head becomes a linear probe on the rows' zero-shot features."""
    features = run.state.zs_features
    if features is None:
        raise RuntimeError("phase2.head_init=probe needs the zero-shot stage's image features, which its checkpoint "
                           "lacks (it was written with another head_init): start the run in a new folder")
    generator = torch.Generator().manual_seed(run.cfg.seed)
    weight, bias = train_linear_head(features[data["rows"]], data["labels"], len(run.names), generator=generator)
    with torch.no_grad():
        classifier.head.weight.copy_(weight.to(classifier.head.weight.device) / scale)
        classifier.head.bias.copy_(bias.to(classifier.head.bias.device))


def train_classifier(run: RunContext, clip2: ClipModel, classifier: FineTunedClassifier, tag: str,
                     data: Dict[str, torch.Tensor], text: torch.Tensor, scale: float) -> Dict:
    """Phase II on one training set (``data``: pool rows and their labels); the stage's state."""
    cfg = run.cfg
    if cfg.phase2.head_init == "probe":
        fit_probe_head(run, classifier, data, scale)
    contrastive = None
    if contrastive_on(run):  # labelled rows and contrastive batches come from the whole pool
        images = run.pool_images() if clip2 is run.clip else run.training_images(run.state.positions, clip2.model)
        rows, con = data["rows"], cfg.contrastive  # CoFT+'s momentum encoder and key queue over the whole pool
        module = MomentumContrast(classifier.visual, text.shape[1], queue_size(run), con.momentum, con.projection_dim,
                                  seed=cfg.seed, gather=all_gather_rows).to(run.device)
        contrastive = ContrastiveTerm(module, torch.arange(len(run.state.positions)), con.gamma, con.temperature,
                                      cfg.run.op_backend)
    else:
        images = run.training_images(run.state.positions[data["rows"]], clip2.model)
        rows = torch.arange(len(data["rows"]))
    report = train_phase2(
        classifier, images, rows, data["labels"], cfg.phase2, cfg.seed, run.device, cfg.model.precision,
        checkpoint=run.store.path(f"phase2_{tag}_progress"), checkpoint_seconds=cfg.run.checkpoint_seconds,
        progress=run.progress, writer=run.writer, tag=tag, contrastive=contrastive, compile_model=run.compile,
    )
    return {"model": {k: v.detach().cpu() for k, v in classifier.state_dict().items()}, "report": report}


def phase2(run: RunContext, sets: Dict[str, Dict[str, torch.Tensor]]) -> ClipModel:
    """A classifier per training set (a stage each); returns the phase II CLIP."""
    cfg = run.cfg
    clip2, text = phase2_backbone(run)
    scale = logit_scale_of(clip2)
    if contrastive_on(run):
        contrastive = cfg.contrastive
        run.state.metrics["contrastive"] = {
            "queue_size": queue_size(run), "pool_size": int(len(run.state.positions)), "gamma": contrastive.gamma,
            "temperature": contrastive.temperature, "momentum": contrastive.momentum}
    for tag, data in sets.items():
        classifier = build_classifier(clip2.model.visual, text.to(run.device), scale, cfg.phase2.head_init,
                                      cfg.seed).to(run.device)
        state = run.stage(f"phase2_{tag}", "phase2",
                          lambda: train_classifier(run, clip2, classifier, tag, data, text, scale))
        classifier.load_state_dict(state["model"])
        classifier.eval()
        if run.out_dir:
            save_tensors(run.out_dir / CLASSIFIER_FILE.format(tag), state["model"],
                         classifier_metadata(clip2, run.names, tag))
        run.state.classifiers[tag] = classifier
        history = state["report"]["history"]
        run.state.metrics.setdefault("phase2", {})[tag] = {
            "train_size": int(len(data["rows"])), "steps": state["report"]["steps"], "seconds": state["seconds"],
            "train_label_accuracy": label_accuracy(data["labels"], run.truth[data["rows"]]),
            "final_loss": history[-1]["loss"] if history else None,
            **({"contrastive_loss": [entry["contrastive"] for entry in history]}
               if history and "contrastive" in history[-1] else {}),
        }
    return clip2
