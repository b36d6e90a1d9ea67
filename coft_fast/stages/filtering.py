"""The filter stage (phase-I prompt models or the probe detector as judges) and the clean sets."""
from __future__ import annotations

from typing import Dict

import torch

from coft_fast.pseudo.filter import FilterResult, ModelView, decide, filter_quality, generate_and_validate, validate_given
from coft_fast.pseudo.label_issues import label_issue_counts
from coft_fast.pseudo.probe_detector import probe_detector
from coft_fast.stages.context import RunContext, label_accuracy
from coft_fast.stages.prompt_tuning import agreement, record_pool_labels


def probe_judgements(run: RunContext) -> Dict:
    """filter.detector=probe: out-of-fold linear probes on the zero-shot features judge the given labels."""
    cfg = run.cfg
    features = run.state.zs_features
    if features is None:
        raise RuntimeError("filter.detector=probe needs the zero-shot stage's image features, which its checkpoint "
                           "lacks (it was written with another detector): start the run in a new folder")
    trusted = None if run.shots is None else run.shots >= 0
    result = probe_detector(features.to(run.device), run.pool_training_labels(), len(run.names),
                            cfg.phase1.seeds, cfg.filter.probe_folds, cfg.filter.probe_rounds,
                            cfg.filter.threshold, trusted)
    return {"result": result.__dict__, "positions": run.state.positions}


def prompt_judgements(run: RunContext) -> Dict:
    """filter.detector=prompts: the phase-I models label the pool and validate each other's labels."""
    cfg, models = run.cfg, run.state.prompt_models
    features = run.model_features(models, run.pool, run.state.positions, "labelling the pool")
    with torch.no_grad():
        texts = [model.text_features() for model in models]
    views = [ModelView(f, pos.cpu(), neg.cpu()) for f, (pos, neg) in zip(features, texts)]
    if run.given:
        result = validate_given(views[0], views[1], run.given_labels, run.logit_scale, cfg.filter.threshold)
    else:
        result = generate_and_validate(views[0], views[1], run.logit_scale, cfg.filter.threshold)
    return {"result": result.__dict__, "positions": run.state.positions}


def filter_labels(run: RunContext) -> None:
    """The judgements (a stage), then filter.rule's keep decisions; shots are always kept."""
    cfg = run.cfg
    judge = probe_judgements if cfg.filter.detector == "probe" else prompt_judgements
    state = run.stage("filter", "filter", lambda: judge(run))
    checked = decide(FilterResult.from_dict(state["result"]), cfg.filter.rule, cfg.filter.threshold)
    result = checked if run.shots is None else checked.with_shots(run.shots)
    run.state.filter = result
    record_filter(run, result)


def record_filter(run: RunContext, result: FilterResult) -> None:
    """The filter's figures in metrics: each model's pool labels, the clean sets' size and quality."""
    cfg, metrics, truth = run.cfg, run.state.metrics, run.truth
    if cfg.filter.detector == "probe":
        metrics["detector"] = {"name": "probe", "folds": cfg.filter.probe_folds,
                               "rounds": cfg.filter.probe_rounds, "seeds": list(cfg.phase1.seeds)}
    else:
        phase1 = metrics.setdefault("phase1", {})
        for index, labels in ((1, result.labels1), (2, result.labels2)):
            phase1[f"model{index}"]["pool_label_accuracy"] = label_accuracy(labels, truth)
    rounds = metrics.get("rounds")
    if rounds:  # the last round's models are the filter's
        for index in (1, 2):
            rounds[-1][f"model{index}"]["pool_label_accuracy"] = metrics["phase1"][f"model{index}"]["pool_label_accuracy"]
        record_pool_labels(rounds[-1], result.labels1, result.labels2, run.names)
    known = bool((truth >= 0).any())
    metrics["filter"] = {
        "threshold": cfg.filter.threshold,
        "rule": cfg.filter.rule,
        "agreement": agreement(result.labels1, result.labels2),
        **{f"s{index}": {"size": int(keep.sum()),
                         **(filter_quality(result.training_labels(index), keep, truth) if known else {})}
           for index, keep in ((1, result.keep1), (2, result.keep2))},
    }
    if run.given:
        metrics["label_issues"] = label_issue_counts(result, run.given_labels, run.names, cfg.filter.threshold,
                                                     cfg.filter.rule, cfg.filter.detector)


def clean_sets(run: RunContext) -> Dict[str, Dict[str, torch.Tensor]]:
    """Phase II's training sets (phase2.train_on): S1 (model 1's labels model 2 kept), S2, or both."""
    result = run.state.filter
    sets = {
        "s1": {"rows": result.keep1.nonzero().flatten(), "labels": result.training_labels(1)[result.keep1]},
        "s2": {"rows": result.keep2.nonzero().flatten(), "labels": result.training_labels(2)[result.keep2]},
    }
    chosen = {"s1": ["s1"], "s2": ["s2"], "both": ["s1", "s2"]}[run.cfg.phase2.train_on]
    return {name: sets[name] for name in chosen}
