"""One runner per method, composing the stages over a run context."""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from coft_fast.models import ClipModel
from coft_fast.stages.context import RunContext
from coft_fast.stages.evaluation import evaluate
from coft_fast.stages.filtering import clean_sets, filter_labels
from coft_fast.stages.finetune import phase2
from coft_fast.stages.labels import label_pool
from coft_fast.stages.prompt_tuning import phase1

TrainingSets = Dict[str, Dict[str, torch.Tensor]]


def finish(run: RunContext, sets: TrainingSets) -> Tuple[TrainingSets, ClipModel]:
    """Phase II on ``sets``, then evaluation; (the training sets, the phase II CLIP)."""
    clip2 = phase2(run, sets)
    evaluate(run, clip2)
    return sets, clip2


def run_coft(run: RunContext) -> Tuple[TrainingSets, ClipModel]:
    """CoFT and CoFT+ (with given labels, clean-labels); the probe detector needs no phase I."""
    selection = label_pool(run)
    if run.cfg.filter.detector == "prompts":
        phase1(run, selection)
    filter_labels(run)
    return finish(run, clean_sets(run))


def run_self_train(run: RunContext) -> Tuple[TrainingSets, ClipModel]:
    """Self-training: phase II on S*."""
    selection = label_pool(run)
    return finish(run, {"s_star": {"rows": selection.rows, "labels": selection.labels}})


RUNNERS = {"coft": run_coft, "coft+": run_coft, "self-train": run_self_train}


def run_method(run: RunContext) -> Tuple[TrainingSets, ClipModel]:
    """The runner of ``run.cfg.method``."""
    return RUNNERS[run.cfg.method](run)
