"""What a run and ``zeroshot`` write into their folders."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from coft_fast.pseudo import class_name_mapping
from coft_fast.run_report import build_report
from coft_fast.runtime import distributed
from coft_fast.runtime.io import atomic_write_csv, atomic_write_json
from coft_fast.scoring import ZeroShotResult

PARTIAL_METRICS = "metrics_partial.json"  # what a failed run had measured, and its error
log = logging.getLogger("coft_fast")


def start_folder(out_dir: Path, cfg, class_names) -> None:
    """A run folder's first files: the resolved config.yaml and class_names.json (every output's class order)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.yaml")
    atomic_write_json(out_dir / "class_names.json", class_name_mapping(class_names))


def write_skipped(out_dir: Path, skipped) -> None:
    """skipped.csv: the images that could not be decoded, and why (none: no file)."""
    if skipped:
        atomic_write_csv(out_dir / "skipped.csv", ["path", "reason"], ((s["path"], s["reason"]) for s in skipped))


def write_zeroshot_outputs(result: ZeroShotResult, out_dir: Path) -> None:
    """predictions.csv, skipped.csv and (with labels or skipped files) metrics.json of ``zeroshot``."""
    names = result.source.class_names
    rows = (
        (path, names[int(p)], f"{float(c):.6f}")
        for path, p, c in zip(result.paths, result.predictions, result.confidence)
    )
    atomic_write_csv(out_dir / "predictions.csv", ["path", "prediction", "confidence"], rows)
    write_skipped(out_dir, result.source.skipped)
    if result.source.has_labels or result.source.skipped:
        atomic_write_json(out_dir / "metrics.json", result.metrics)


def write_partial_metrics(run, out_dir: Path, exc: Exception) -> None:
    """What a failed run had measured, and why it stopped (metrics_partial.json); resume continues it."""
    partial = {**run.metrics_record(), "error": {"type": type(exc).__name__, "message": str(exc)}}
    try:
        atomic_write_json(out_dir / PARTIAL_METRICS, partial)
    except Exception:  # never hide the original error behind a failed write
        log.exception("could not write %s", out_dir / PARTIAL_METRICS)
    log.error("the run stopped: %s; what it measured is in %s, finished stages resume with --resume",
              exc, out_dir / PARTIAL_METRICS)


def write_train_outputs(run, out_dir: Path, issues=None) -> None:
    """pseudo_labels.csv, label_issues.csv (``issues``: run.label_issues()), skipped.csv, and the plots: rounds.png
    (CoFT+), clean_probability.png and, where the pool's labels are known, pseudo_label_accuracy.png."""
    from coft_fast.pseudo.label_issues import LABEL_ISSUES_FILE, issue_scores, write_label_issues
    from coft_fast.runtime.plots import (per_class_accuracy, plot_clean_probability, plot_issue_scores,
                                         plot_per_class_accuracy, plot_rounds)

    state, names, truth = run.state, run.names, run.truth
    confidence, zs_labels = state.zs_probabilities.max(1)
    result = state.filter
    paths = [run.pool.paths[i] for i in state.positions.tolist()]
    empty = [""] * len(paths)  # the columns a method does not produce stay empty
    if result is None:
        model1 = model2 = kept1 = kept2 = empty
    else:
        model1 = [names[i] for i in result.labels1.tolist()]
        model2 = [names[i] for i in result.labels2.tolist()]
        kept1, kept2 = result.keep1.int().tolist(), result.keep2.int().tolist()
    zs_names = [names[i] for i in zs_labels.tolist()]
    confidences = [f"{c:.6f}" for c in confidence.tolist()]
    pool_labels = [names[i] if i >= 0 else "" for i in truth.tolist()]
    shots = run.shots
    shot_column = (shots >= 0).int().tolist() if shots is not None else [0] * len(paths)
    given = [names[i] for i in run.given_labels.tolist()] if run.given else empty
    rows = zip(paths, zs_names, confidences, model1, model2, kept1, kept2, pool_labels, shot_column, given)
    atomic_write_csv(out_dir / "pseudo_labels.csv",
                     ["path", "zero_shot_label", "zero_shot_confidence", "model1_label", "model2_label", "kept1", "kept2",
                      "pool_label", "shot", "given_label"], rows)
    if issues is not None:
        write_label_issues(out_dir / LABEL_ISSUES_FILE, issues)
        plot_issue_scores(out_dir / "label_issue_scores.png", result.p_clean1, result.p_clean2,
                          issue_scores(result, shots), ~result.keep1, run.cfg.filter.threshold)
    write_skipped(out_dir, run.pool.skipped)
    if state.metrics.get("rounds"):
        plot_rounds(out_dir / "rounds.png", state.metrics["rounds"])
    if result is not None and not run.given:
        plot_clean_probability(out_dir / "clean_probability.png", result.p_clean1, result.keep1, run.cfg.filter.threshold)
    if bool((truth >= 0).any()):
        series = {"zero-shot (all)": per_class_accuracy(zs_labels, truth, len(names))}
        if result is not None:
            series["model 1 (all)"] = per_class_accuracy(result.labels1, truth, len(names))
            series["S1 clean"] = per_class_accuracy(result.labels1[result.keep1], truth[result.keep1], len(names))
            series["S2 clean"] = per_class_accuracy(result.labels2[result.keep2], truth[result.keep2], len(names))
        plot_per_class_accuracy(out_dir / "pseudo_label_accuracy.png", names, series)


def finish_run(run, out_dir: Optional[Path], issues=None) -> dict:
    """The finished run's metrics; with ``out_dir`` (rank 0), everything the folder gets."""
    metrics = run.metrics_record()
    if distributed.world_size() > 1:
        metrics["world_size"] = distributed.world_size()
    if out_dir and distributed.is_main():
        write_train_outputs(run, out_dir, issues)
        atomic_write_json(out_dir / "metrics.json", metrics)
        (out_dir / PARTIAL_METRICS).unlink(missing_ok=True)
        try:  # a failed report is logged, never fatal (`coft-fast report` retries it)
            log.info("report: %s", build_report(out_dir))
        except Exception:
            log.exception("could not write %s/report.html (rebuild it with coft-fast report --run %s)", out_dir,
                          out_dir)
    distributed.barrier()  # every rank returns once the outputs are written
    zs, final = metrics.get("zero_shot", {}), metrics.get("final", {})
    if "acc1" in zs and "acc1" in final:
        log.info("%s: zero-shot acc1 %.2f %% -> final acc1 %.2f %%", metrics["method"], 100 * zs["acc1"],
                 100 * final["acc1"])
    return metrics
