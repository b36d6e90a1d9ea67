"""The pool's labels: zero-shot scoring, pseudo.refine, and S* (the class-balanced top-K)."""
from __future__ import annotations

import logging

from coft_fast.pseudo import class_prompts, templates_record
from coft_fast.pseudo.selection import Selection, select_top_k
from coft_fast.pseudo.transductive import refine_labels
from coft_fast.runtime.distributed import gather_objects
from coft_fast.scoring import class_text_embeddings, score_images
from coft_fast.stages.context import RunContext, label_accuracy, sharded

log = logging.getLogger("coft_fast")


def zero_shot(run: RunContext) -> None:
    """Score every pool image against the class prompts (text embeddings computed once)."""
    cfg = run.cfg

    def compute():
        prompts = class_prompts(cfg.zeroshot.templates, run.names)
        text = class_text_embeddings(run.clip, prompts, run.names, run.device, cfg.model.precision).cpu()
        features, positions, probabilities = score_images(
            run.clip, run.pool, text, run.device, cfg.model.precision, cfg.data.batch_size, cfg.data.num_workers,
            progress=run.progress, compile_model=run.compile, gather=sharded)
        if not len(positions):
            raise RuntimeError(f"{run.pool.origin}: none of the {len(run.pool)} images could be decoded")
        skipped = gather_objects(run.pool.skipped)  # each rank met the broken files of its shard
        return {"positions": positions, "probabilities": probabilities, "text": text, "skipped": skipped,
                "features": features if run.keep_features else None}

    state = run.stage("zero_shot", "zero_shot", compute)
    metrics = run.state.metrics
    metrics.setdefault("zero_shot", {})["templates"] = templates_record(cfg.zeroshot.templates)
    run.pool.skipped[:] = state["skipped"]
    run.state.positions = state["positions"]
    run.state.zs_probabilities = run.state.pool_probabilities = state["probabilities"]
    run.state.zs_features = state.get("features")
    run.state.text_embeddings = state["text"]
    metrics["pool"] = {
        "num_images": int(len(state["positions"])),
        "num_skipped": len(state["skipped"]),
        "refine": cfg.pseudo.refine,
        "pseudo_label_accuracy": label_accuracy(state["probabilities"].argmax(1), run.truth),
    }
    metrics["zero_shot"]["pool_acc1"] = metrics["pool"]["pseudo_label_accuracy"]
    shots = run.shots
    if shots is not None:
        counts = shots[shots >= 0].bincount(minlength=len(run.names)).tolist()
        metrics["shots"] = {"per_class": dict(zip(run.names, counts)), "total": int(sum(counts))}


def refine(run: RunContext) -> None:
    """pseudo.refine (a stage): the pool's labels refined on its zero-shot features, for every later stage."""
    mode = run.cfg.pseudo.refine
    if mode == "none":
        return
    features, zero_shot_probabilities = run.state.zs_features, run.state.zs_probabilities
    if features is None:
        raise RuntimeError(f"pseudo.refine={mode} needs the zero-shot stage's image features, which its checkpoint "
                           "lacks (it was written with pseudo.refine=none): start the run in a new folder")

    def compute():
        refined = refine_labels(mode, zero_shot_probabilities, features.to(run.device), run.cfg.pseudo.knn_k)
        details = dict(refined.details)
        if "empty_classes" in details:
            details["empty_classes"] = [run.names[i] for i in details["empty_classes"]]
        return {"probabilities": refined.probabilities.cpu(), "ranking": refined.ranking.cpu(), "details": details}

    state = run.stage(f"refine_{mode}", "refine", compute)
    run.state.pool_probabilities, run.state.pool_ranking = state["probabilities"], state["ranking"]
    labels = state["probabilities"].argmax(1)
    pool = run.state.metrics["pool"]
    pool["zero_shot_label_accuracy"] = pool["pseudo_label_accuracy"]
    pool["pseudo_label_accuracy"] = label_accuracy(labels, run.truth)
    pool["refine_details"] = {**state["details"], "seconds": state["seconds"],
                              "changed": (labels != zero_shot_probabilities.argmax(1)).double().mean().item()}
    log.info("pseudo.refine=%s changed %.1f %% of the zero-shot labels", mode, 100 * pool["refine_details"]["changed"])


def select(run: RunContext) -> Selection:
    """S*: the class-balanced top-K of the pool's (or given) labels; labelled shots first."""
    cfg = run.cfg
    confidence, labels = run.ranked_labels(run.state.pool_probabilities)
    if run.state.pool_ranking is not None:
        confidence = run.state.pool_ranking
    selection = select_top_k(labels, confidence, cfg.pseudo.top_k, run.names, run.shots)
    record = run.state.metrics["selection"] = {
        "source": cfg.pseudo.source,
        "top_k": cfg.pseudo.top_k,
        "size": int(len(selection.rows)),
        "per_class": dict(zip(run.names, selection.counts.tolist())),
        "classes_short": selection.short_classes,
        "classes_empty": selection.empty_classes,
        "pseudo_label_accuracy": label_accuracy(selection.labels, run.truth[selection.rows]),
    }
    if run.state.pool_ranking is not None:  # the top-K the zero-shot labels alone give, for comparison
        zs_confidence, zs_labels = run.ranked_labels(run.state.zs_probabilities)
        before = select_top_k(zs_labels, zs_confidence, cfg.pseudo.top_k, run.names, run.shots)
        record["zero_shot_pseudo_label_accuracy"] = label_accuracy(before.labels, run.truth[before.rows])
    return selection


def label_pool(run: RunContext) -> Selection:
    """The stages every method starts with: zero-shot scoring, pseudo.refine, S*."""
    zero_shot(run)
    refine(run)
    return select(run)
