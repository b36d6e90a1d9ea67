"""Phase I: two prompt-tuned models on S* (CoFT), or over ``phase1.rounds`` rounds (CoFT+)."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from coft_fast.data.resident import ResidentImages
from coft_fast.phases.phase1 import PromptModel, make_prompt_model, train_phase1
from coft_fast.pseudo.filter import ModelView
from coft_fast.pseudo.selection import Selection, select_top_k
from coft_fast.runtime.checkpoint import save_tensors
from coft_fast.stages.context import RunContext, label_accuracy


def agreement(labels1: torch.Tensor, labels2: torch.Tensor) -> float:
    """The share of the pool on which two models give the same label."""
    return (labels1 == labels2).double().mean().item()


def record_pool_labels(entry: Dict, labels1: torch.Tensor, labels2: torch.Tensor, names: Sequence[str]) -> None:
    """Label-free signs of a CoFT+ round: its models' agreement on the pool and their pool images per class."""
    entry["agreement"] = agreement(labels1, labels2)
    for index, labels in ((1, labels1), (2, labels2)):
        counts = torch.bincount(labels, minlength=len(names)).tolist()
        entry[f"model{index}"]["pool_class_counts"] = dict(zip(names, counts))


def round_seed(model_seed: int, round_: int) -> int:
    """Round 1 uses the model's seed (CoFT+'s first round is CoFT's phase I); later rounds new ones."""
    return model_seed + 1_000_003 * (round_ - 1)


def phase1(run: RunContext, selection: Selection) -> None:
    """One round for CoFT; ``phase1.rounds`` for CoFT+, each on the previous round's labels."""
    cfg = run.cfg
    plus = cfg.method == "coft+"
    rounds = cfg.phase1.rounds if plus else 1
    history = run.state.metrics.setdefault("rounds", []) if plus else []
    if plus:  # rounds draw their subsets from the whole pool; rows are pool rows
        images, offset = run.pool_images(), None
    else:  # S* alone is decoded; offset: the pool row of each S* row
        images = run.training_images(run.state.positions[selection.rows], run.clip.model)
        offset = selection.rows
    s_star_rows = selection.rows if plus else torch.arange(len(selection.rows))
    subsets = [(s_star_rows, selection.labels)] * len(cfg.phase1.seeds)  # round 1: both models on S*
    for round_ in range(1, rounds + 1):
        entry = {"round": round_, "seconds": 0.0}
        models = []
        for index, (seed, (rows, labels)) in enumerate(zip(cfg.phase1.seeds, subsets), start=1):
            model, seconds = train_prompt_model(run, round_, index, seed, images, rows, labels)
            models.append(model)
            pool_rows = rows if offset is None else offset[rows]
            entry[f"model{index}"] = {"subset_size": int(len(rows)),
                                      "subset_label_accuracy": label_accuracy(labels, run.truth[pool_rows])}
            entry["seconds"] += seconds
        if round_ < rounds:
            subsets = next_round_subsets(run, round_, models, entry)
        history.append(entry)
    run.state.prompt_models = models


def train_prompt_model(run: RunContext, round_: int, index: int, seed: int, images: ResidentImages,
                       rows: torch.Tensor, labels: torch.Tensor):
    """(a new phase-I model trained on ``rows``, seconds)."""
    cfg = run.cfg
    model_seed = round_seed(cfg.seed * 1000 + seed, round_)
    name = f"phase1_model{index}" if round_ == 1 else f"round{round_}_phase1_model{index}"
    model = make_prompt_model(run.clip, run.prompt_names, cfg.phase1, model_seed, run.device)

    def compute():
        report = train_phase1(
            model, images, rows, labels, cfg.phase1, model_seed, run.device, cfg.model.precision,
            checkpoint=run.store.path(f"{name}_progress"), checkpoint_seconds=cfg.run.checkpoint_seconds,
            progress=run.progress, writer=run.writer, backend=cfg.run.op_backend,
            tag=f"model{index}" if round_ == 1 else f"round{round_}/model{index}",
        )
        return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "report": report}

    state = run.stage(name, "phase1", compute)
    model.load_state_dict(state["model"])
    if run.out_dir:
        save_tensors(run.out_dir / f"prompts_model{index}.safetensors", state["model"],
                     {"class_names": "\n".join(run.names), "seed": str(model_seed), "round": str(round_)})
    history = state["report"]["history"]
    run.state.metrics.setdefault("phase1", {})[f"model{index}"] = {
        "seed": model_seed, "round": round_, "steps": state["report"]["steps"], "seconds": state["seconds"],
        "final_loss": history[-1]["loss"] if history else None,
    }
    return model, state["seconds"]


def next_round_subsets(run: RunContext, round_: int, models: List[PromptModel], entry: Dict):
    """CoFT+: [(rows, labels)] per model for the next round, its top-K of the pool (see round_ranking)."""
    cfg = run.cfg

    def compute():  # each model's label, confidence and the peer model's p_clean of it, per pool row
        features = run.model_features(models, run.pool, run.state.positions, f"round {round_}: labelling the pool")
        views, model_views = [], []
        for model, feats in zip(models, features):
            with torch.no_grad():
                pos, neg = model.text_features()
            model_views.append(ModelView(feats, pos.cpu(), neg.cpu()))
            probabilities = (run.logit_scale * feats @ pos.cpu().T).softmax(1)
            confidence, labels = run.ranked_labels(probabilities)
            views.append({"labels": labels, "confidence": confidence})
        for index, view in enumerate(views):  # the peer model's p_clean of each label (round_ranking=peer)
            view["peer_p_clean"] = model_views[1 - index].clean_probability(view["labels"], run.logit_scale)
        return {"views": views}

    state = run.stage(f"round{round_}_labels", "round_labels", compute)
    entry["seconds"] += state["seconds"]
    subsets = []
    for index, view in enumerate(state["views"], start=1):
        ranking = view["confidence"]
        if cfg.phase1.round_ranking == "peer":
            ranking = ranking * view["peer_p_clean"].to(ranking.dtype)
        chosen = select_top_k(view["labels"], ranking, cfg.pseudo.top_k, run.names, run.shots)
        entry[f"model{index}"]["pool_label_accuracy"] = label_accuracy(view["labels"], run.truth)
        if run.shots is not None:  # the next round's subset starts with every shot
            entry[f"model{index}"]["next_subset_shots"] = int((run.shots[chosen.rows] >= 0).sum())
        subsets.append((chosen.rows, chosen.labels))
    record_pool_labels(entry, state["views"][0]["labels"], state["views"][1]["labels"], run.names)
    return subsets
