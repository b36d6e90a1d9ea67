"""Evaluation: zero-shot, phase-I and final accuracies on the labelled evaluation images."""
from __future__ import annotations

import time

import torch

from coft_fast.data import ImageSource
from coft_fast.data.resident import preprocess_stats
from coft_fast.inference import ensemble_logits
from coft_fast.models import ClipModel
from coft_fast.runtime.metrics import classification_metrics
from coft_fast.scoring import model_outputs, score_images
from coft_fast.stages.context import RunContext, check_same_positions, sharded


def evaluate_classifiers(run: RunContext, clip2: ClipModel, source: ImageSource, positions: torch.Tensor,
                         truth: torch.Tensor) -> None:
    """Each phase II classifier's accuracy and, for two, their logit ensemble's (then ``final``'s)."""
    cfg, final = run.cfg, run.state.metrics.setdefault("final", {})
    all_logits = {}
    for tag, classifier in run.state.classifiers.items():
        logits, found = sharded(lambda shard: model_outputs(
            classifier, source, clip2.preprocess_eval, run.device, cfg.model.precision, cfg.data.batch_size,
            cfg.data.num_workers, shard, run.progress, f"evaluating {tag}", run.decoder,
            preprocess_stats(clip2.model), run.compile), positions.tolist())
        check_same_positions(found, positions, source.origin)
        all_logits[tag] = logits
        final[tag] = classification_metrics(logits, truth)
    if len(all_logits) > 1:  # phase2.train_on=both: the logit ensemble
        final["ensemble"] = classification_metrics(ensemble_logits(all_logits.values()), truth)
    main = "ensemble" if "ensemble" in final else next(iter(all_logits))
    final.update({key: final[main][key] for key in ("acc1", "acc5", "mean_per_class_recall")})
    final["classifier"] = main
    final["num_images"] = int(len(positions))


def evaluate(run: RunContext, clip2: ClipModel) -> None:
    """Zero-shot, phase I and final accuracies on the evaluation images (when they have labels)."""
    metrics, source, cfg = run.state.metrics, run.eval_source, run.cfg
    zero_shot = metrics.setdefault("zero_shot", {})
    metrics.setdefault("final", {})
    if source is None or not source.has_labels:
        return
    started = time.perf_counter()
    _, positions, probabilities = score_images(
        run.clip, source, run.class_text(run.clip), run.device, cfg.model.precision, cfg.data.batch_size,
        cfg.data.num_workers, progress=run.progress, description="evaluating zero-shot", compile_model=run.compile,
        gather=sharded)
    truth = torch.tensor(source.labels, dtype=torch.long)[positions]
    zero_shot.update(classification_metrics(probabilities, truth))
    zero_shot["num_images"] = int(len(positions))
    models = run.state.prompt_models
    features = run.model_features(models, source, positions, "evaluating phase I") if models else []
    for index, (model, feats) in enumerate(zip(models, features), start=1):  # with its positive prompts
        with torch.no_grad():
            pos, _ = model.text_features()
        entry = metrics["phase1"][f"model{index}"]
        entry["eval"] = classification_metrics(run.logit_scale * feats @ pos.cpu().T, truth)
        entry["acc1"] = entry["eval"]["acc1"]
    evaluate_classifiers(run, clip2, source, positions, truth)
    run.timed("evaluation", time.perf_counter() - started)
