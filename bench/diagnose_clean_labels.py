"""Why `clean-labels` ranks wrong labels as it does: its finished runs, read back and scored.

    python bench/diagnose_clean_labels.py --work DIR

Reads every finished `clean-labels*_<noise>_seed<s>` run folder that bench/e2e_noisy_labels.py left
under ``--work`` (with its given-label CSV there) and scores, against the pool's true labels (each
image's class folder), the ROC AUC of wrong-label scores: zero-shot confidence of the given label
(the baseline, from the run's own zero-shot stage), each phase-I model's 1 - p_clean alone, the
library's rule (1 - the smaller p_clean) and 1 - the mean p_clean; where the filter recorded them,
the models' own confidence (1 - the smaller positive-prompt softmax probability of the given label,
confident learning's self-confidence); the phase-I models' top-1 on the eval split; and the kept set:
its size, the share of its labels that are right, and the share of the pool's right labels it keeps.
No training: it only reads run folders. Rows accumulate in bench/results/noisy_labels_diagnosis.csv
(a run read again replaces its row; runs no longer on disk keep theirs); the .md is rewritten.

The two out-of-fold columns (each score taken from the phase-I model that did not train on the
label) were filled only for the pool-halves prompt detector, whose option was removed in issue 37
(bench/results/archive/removed_options.md): the committed rows keep them; nothing computes them now.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path
from typing import Optional

import torch
from sklearn.metrics import roc_auc_score

from coft_fast.runtime.checkpoint import load_state
from coft_fast.runtime.io import atomic_write_text

from common import RESULTS, CellTable, markdown_table

STEM = "noisy_labels_diagnosis"
HEADER = ["run", "noisy share", "zero-shot auc", "model1 auc", "model2 auc", "min rule auc", "mean rule auc",
          "own confidence auc", "out-of-fold p_clean auc", "out-of-fold own confidence auc",
          "model1 top-1", "model2 top-1", "kept", "kept correct", "right labels kept"]


def diagnose(run: Path, given_csv: Path) -> Optional[dict]:
    """One run's row; None for a run without phase I (the probe detector: no prompt models to diagnose)."""
    phase1 = json.loads((run / "metrics.json").read_text()).get("phase1")
    if phase1 is None:
        return None
    with open(given_csv, newline="") as handle:
        pool = [(row["path"], row["label"]) for row in csv.DictReader(handle)]
    names = json.loads((run / "class_names.json").read_text())
    index = {name: i for i, name in enumerate(names)}
    zero_shot = load_state(run / "checkpoints" / "zero_shot.pt")
    zs_given = {pool[p][0]: zero_shot["probabilities"][row, index[pool[p][1]]].item()
                for row, p in enumerate(zero_shot["positions"].tolist())}
    with open(run / "label_issues.csv", newline="") as handle:
        issues = list(csv.DictReader(handle))
    wrong = torch.tensor([Path(r["path"]).parent.name != r["given_label"] for r in issues])
    p1 = torch.tensor([float(r["p_clean_model1"]) for r in issues])
    p2 = torch.tensor([float(r["p_clean_model2"]) for r in issues])
    kept = torch.tensor([r["is_issue"] == "false" for r in issues])
    zs = torch.tensor([zs_given[r["path"]] for r in issues])

    def auc(score):
        return f"{roc_auc_score(wrong.numpy(), score.numpy()):.4f}"

    return {**own_confidence(run, pool, issues, auc),
            "run": run.name, "noisy share": f"{100 * wrong.double().mean().item():.2f}",
            "zero-shot auc": auc(1 - zs), "model1 auc": auc(1 - p1), "model2 auc": auc(1 - p2),
            "min rule auc": auc(1 - torch.minimum(p1, p2)), "mean rule auc": auc(1 - (p1 + p2) / 2),
            "model1 top-1": f"{100 * phase1['model1']['acc1']:.2f}", "model2 top-1": f"{100 * phase1['model2']['acc1']:.2f}",
            "kept": int(kept.sum()), "kept correct": f"{100 * (~wrong[kept]).double().mean().item():.2f}",
            "right labels kept": f"{100 * kept[~wrong].double().mean().item():.2f}"}


def own_confidence(run: Path, pool: list, issues: list, auc) -> dict:
    """The own-confidence AUC, where the run's filter recorded the confidences (``issues``:
    label_issues.csv's rows, as diagnose read them)."""
    state = load_state(run / "checkpoints" / "filter.pt")
    if state is None or state["result"].get("confidence1") is None:
        return {}
    result, positions = state["result"], state["positions"].tolist()
    row_of = {pool[p][0]: row for row, p in enumerate(positions)}
    order = torch.tensor([row_of[r["path"]] for r in issues])  # label_issues.csv's rows in filter rows
    c1, c2 = result["confidence1"].double()[order], result["confidence2"].double()[order]
    return {"own confidence auc": auc(1 - torch.minimum(c1, c2))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="bench/e2e_noisy_labels.py's --work folder")
    args = parser.parse_args()
    work = Path(args.work)
    table = CellTable(STEM, HEADER, ("run",))
    for run in sorted(work.glob("clean-labels*_seed*")):
        match = re.fullmatch(r"clean-labels[a-z-]*_(\w+)_seed(\d+)", run.name)
        if match and (run / "label_issues.csv").is_file():
            row = diagnose(run, work / f"given_{match[1]}_seed{match[2]}.csv")
            if row is not None:  # the prompt detectors' runs
                table.add(row, [])
                print(row, flush=True)
    if not table.rows:
        raise SystemExit(f"{work}: no finished clean-labels run folders")
    rows = sorted(table.rows.values(), key=lambda r: r["run"])
    lines = ["# Why clean-labels ranks wrong labels as it does (CIFAR-10 test bed)", "",
             "`python bench/diagnose_clean_labels.py --work <e2e_noisy_labels work folder>`: reads the finished "
             "`clean-labels` runs of the phase-I prompt detector, an option since the probe detector became the "
             "default (clean-labels-s-star: the S* detector; clean-labels-pool-halves: the pool-halves detector, "
             "removed in issue 37, its rows as measured). AUCs: ROC AUC of each score for the labels the noise "
             "changed (zero-shot: 1 - zero-shot probability of the given label, from the run's own zero-shot stage; "
             "modelN: 1 - that model's p_clean; min rule: the library's issue score; mean rule: 1 - the mean "
             "p_clean; own confidence: 1 - the smaller positive-prompt softmax probability of the given label; "
             "out-of-fold: the score of the model that did not train on the label, pool-halves runs only; '-': not "
             "recorded by that run). modelN top-1: phase-I model on cifar10/test (%). kept correct: share of the kept labels that are right; "
             "right labels kept: share of the pool's right labels that are kept (%).", "",
             *markdown_table(HEADER, rows)]
    atomic_write_text(RESULTS / f"{STEM}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
