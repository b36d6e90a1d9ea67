"""Which score ranks wrong labels best? The clean-labels runs of bench/e2e_noisy_labels.py, rescored.

    python bench/noisy_labels_scores.py [--work DIR]

Reads each finished clean-labels run folder under --work (default: bench/e2e_noisy_labels.py's
bench/results/tmp/e2e_noisy_labels) whose filter checkpoint records the models' own confidences
(runs whose filter stage ran after they were recorded), and, with the labels the synthetic noise
changed as truth, prints the ROC AUC of the issue scores one could build from the same two phase-I
models: 1 - p_clean (the negative prompts; `clean-labels`' score is the min over the two models),
1 - the positive prompts' softmax probability of the given label (the models' own confidence, the
self-confidence score confident learning ranks by), their product, and each taken from the
out-of-fold model only (pool-halves detector: the model that did not train on the label). Writes
bench/results/noisy_labels_scores.md. No training: seconds per run.
"""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from coft_fast.pipeline import stratified_halves
from coft_fast.runtime.checkpoint import load_state
from coft_fast.runtime.io import atomic_write_text

from common import RESULTS, machine, markdown_table

RUN = re.compile(r"(?P<method>clean-labels[a-z-]*)_(?P<noise>[a-z0-9]+)_seed(?P<seed>\d+)$")


def scores(run: Path, work: Path):
    """{score name: ROC AUC} of one run, or None where its filter lacks the models' confidences."""
    match = RUN.match(run.name)
    state = load_state(run / "checkpoints" / "filter.pt")
    if match is None or state is None or state["result"].get("confidence1") is None:
        return None
    given_csv = work / f"given_{match['noise']}_seed{match['seed']}.csv"
    with open(given_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = (work / "classes.txt").read_text().split()
    positions = state["positions"]
    positions = positions.tolist() if hasattr(positions, "tolist") else list(positions)
    given = torch.tensor([names.index(rows[p]["label"]) for p in positions])
    wrong = [int(rows[p]["label"] != Path(rows[p]["path"]).parent.name) for p in positions]
    result = state["result"]
    p1, p2, c1, c2 = (result[key].double() for key in ("p_clean1", "p_clean2", "confidence1", "confidence2"))
    halves = stratified_halves(given, int(match["seed"]))

    def out_of_fold(score1, score2):  # model 1 trained on the first half: model 2 judges it, and back
        score = score2.clone()
        score[halves[1]] = score1[halves[1]]
        return score

    def auc(clean_score):
        return roc_auc_score(wrong, (-clean_score).tolist())

    found = {"p_clean (min, the rule's)": auc(torch.minimum(p1, p2)),
             "own confidence (min)": auc(torch.minimum(c1, c2)),
             "p_clean x own confidence (min)": auc(torch.minimum(p1 * c1, p2 * c2))}
    if match["method"] != "clean-labels-s-star":  # the pool-halves detector: each label has an out-of-fold model
        found["p_clean (out-of-fold model)"] = auc(out_of_fold(p1, p2))
        found["own confidence (out-of-fold model)"] = auc(out_of_fold(c1, c2))
    return {"run": run.name, **{k: f"{v:.4f}" for k, v in found.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(RESULTS / "tmp" / "e2e_noisy_labels"))
    args = parser.parse_args()
    work = Path(args.work)
    found = [row for run in sorted(work.glob("clean-labels*_seed*")) if (row := scores(run, work))]
    if not found:
        raise SystemExit(f"no clean-labels run under {work} records the models' confidences")
    header = list(dict.fromkeys(key for row in found for key in row))
    lines = [f"# Issue scores of clean-labels' phase-I models, compared ({machine()})", "",
             "`python bench/noisy_labels_scores.py`: for each finished clean-labels run of bench/e2e_noisy_labels.py, "
             "the ROC AUC (wrong against right given labels) of scores built from the same two phase-I models. "
             "p_clean: the negative prompts' clean probability of the given label; own confidence: the positive "
             "prompts' softmax probability of it; out-of-fold: taken from the model that did not train on the label.",
             "", *markdown_table(header, [{h: row.get(h, "") for h in header} for row in found])]
    atomic_write_text(RESULTS / "noisy_labels_scores.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
