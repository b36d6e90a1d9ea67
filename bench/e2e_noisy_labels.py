"""Noisy human labels on the CIFAR-10 test bed: find the wrong ones, then fine-tune on the rest.

    python bench/e2e_noisy_labels.py [--testbed DIR] [--work DIR] [--cells METHOD:NOISE:SEED ...]
                                     [--threads N] [--stop-after SECONDS]

The pool (cifar10/pool) gets synthetic label noise, seeded: symmetric 20 % and 40 % (that share of
the images, drawn at random, relabelled uniformly with another class) and asymmetric 30 % (that
share of each class relabelled with its look-alike: the nearest other class by the cosine of the
classes' mean frozen test-bed features of the pool). One seed per noise type, 3 seeds for 40 %
symmetric. Methods:

- clean-labels (probe): `coft-fast clean-labels` (CoFT with the given labels) with its default
  detector, `filter.detector=probe`: no phase I; two 5-fold ensembles of linear probes on the
  frozen image features judge every given label out of fold, the second round training only on
  the labels the first round's out-of-fold prediction agrees with, and a per-class two-component
  mixture on the probability of the given label flags the issues (filter.rule=mixture); its
  label_issues.csv gives the detection (is_issue, issue_score) and phase II the final accuracy.
- clean-labels (S*): the phase-I prompt detector (`filter.detector=prompts`): both models train on
  S*, the 160 given labels zero-shot CLIP is surest of. The default before issue 29's probe detector.
- zero-shot confidence: a label is an issue when zero-shot CLIP's prediction differs from it; the
  score is 1 - the zero-shot probability of the given label. No training, so no final accuracy.
- cleanlab: confident learning (cleanlab.filter.find_label_issues) on out-of-fold probabilities of
  a linear probe (5 folds) on the frozen test-bed features with the given labels; the score is 1 -
  cleanlab's label quality. Detection only (`pip install cleanlab`, the `bench` extra).
- plain fine-tuning: phase II on all the given labels (`train --method self-train --set
  pseudo.source=given --set pseudo.top_k=<pool size>`): the final accuracy without any cleaning.

Two more methods were measured and their options removed in issue 37 (their committed rows stay
in the tables, RETIRED; bench/results/archive/removed_options.md): the pool-halves prompt detector
(clean-labels-pool-halves) and the probe detector with relabelled issues in phase II
(clean-labels-probe-relabel, 40 % symmetric only).

Detection: precision and recall of the flagged labels against the labels the noise changed, and
the ROC AUC of the score. Final: top-1 on cifar10/test. Resumable per cell (method, noise, seed):
each finished cell goes to bench/results/e2e_noisy_labels.csv (and the .md table and the PNG) at
once, and a cell already in the CSV is never run again; an interrupted training cell resumes from
its run folder under --work.
"""
from __future__ import annotations

import csv
import os
import statistics
import time
from pathlib import Path

import torch

import coft_fast
from coft_fast.runtime.io import atomic_write_text

from common import RESULTS, SECONDS_NOTE, CellTable, cell_bench_args, frozen_features, machine, markdown_table, run_cells, testbed_settings

STEM = "e2e_noisy_labels"
NOISES = {"sym20": ("symmetric", 0.2), "sym40": ("symmetric", 0.4), "asym30": ("asymmetric", 0.3)}
METHODS = ("zero-shot", "cleanlab", "clean-labels-probe", "clean-labels-s-star", "plain-finetune")
# methods whose options were removed in issue 37: not run any more; their committed rows keep rendering
RETIRED = ("clean-labels-pool-halves", "clean-labels-probe-relabel")
ROW_ORDER = ("zero-shot", "cleanlab", "clean-labels-probe", "clean-labels-s-star", *RETIRED, "plain-finetune")
LABELS = {"zero-shot": "zero-shot confidence", "cleanlab": "cleanlab (linear probe, 5-fold)",
          "clean-labels-probe": "CoFT clean-labels, probe detector (the default)",
          "clean-labels-s-star": "CoFT clean-labels, S* prompt detector (option)",
          "clean-labels-pool-halves": "CoFT clean-labels, pool-halves detector (removed)",
          "clean-labels-probe-relabel": "CoFT clean-labels (probe) + relabelled issues (removed)",
          "plain-finetune": "plain fine-tuning (all given labels)"}
# the options of each clean-labels method
CLEAN_LABELS_OPTIONS = {"clean-labels-probe": ["filter.detector=probe"],
                        "clean-labels-s-star": ["filter.detector=prompts"]}
HEADER = ["method", "noise", "seed", "noisy share", "flagged", "precision", "recall", "roc auc", "final", "kept",
          "seconds"]


def cells(methods=METHODS) -> list:
    """The order the cells run in: 40 % symmetric (3 seeds), then the other noises; cheap methods
    first. ``cells(ROW_ORDER)``: the tables' order, with the retired methods' rows."""
    order = [("sym40", seed) for seed in (0, 1, 2)] + [("sym20", 0), ("asym30", 0)]
    return [{"method": m, "noise": n, "seed": s} for n, s in order for m in methods]


def lookalikes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) each class's nearest other class by the cosine of the class-mean features."""
    means = torch.stack([features[labels == c].mean(0) for c in range(num_classes)])
    means = torch.nn.functional.normalize(means, dim=1)
    similarity = means @ means.T
    similarity.fill_diagonal_(-2.0)
    return similarity.argmax(1)


def add_noise(labels: torch.Tensor, kind: str, rate: float, seed: int, lookalike: torch.Tensor,
              num_classes: int) -> torch.Tensor:
    """Noisy copy of ``labels``: symmetric (round(rate * N) images, another class uniformly) or
    asymmetric (round(rate * n_c) images of each class c, relabelled lookalike[c])."""
    generator = torch.Generator().manual_seed(seed)
    noisy = labels.clone()
    if kind == "symmetric":
        chosen = torch.randperm(len(labels), generator=generator)[:round(rate * len(labels))]
        shift = torch.randint(1, num_classes, (len(chosen),), generator=generator)
        noisy[chosen] = (labels[chosen] + shift) % num_classes
        return noisy
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[:round(rate * len(members))]]
        noisy[chosen] = lookalike[c]
    return noisy


def detection(flagged: torch.Tensor, score: torch.Tensor, wrong: torch.Tensor) -> dict:
    from sklearn.metrics import roc_auc_score

    hits = int((flagged & wrong).sum())
    return {"flagged": int(flagged.sum()), "precision": hits / max(int(flagged.sum()), 1),
            "recall": hits / max(int(wrong.sum()), 1), "roc auc": float(roc_auc_score(wrong.numpy(), score.numpy()))}


def cleanlab_scores(features: torch.Tensor, given: torch.Tensor, num_classes: int, seed: int):
    """(issues, score) of confident learning on 5-fold out-of-fold probabilities of a linear probe."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from coft_fast.linear_probe import fit_linear_probe

    generator = torch.Generator().manual_seed(seed)
    folds = torch.randperm(len(given), generator=generator) % 5
    probabilities = torch.zeros(len(given), num_classes)
    for fold in range(5):
        train, held = folds != fold, folds == fold
        predict = fit_linear_probe(features[train], given[train], num_classes)  # zero start
        probabilities[held] = predict(features[held]).softmax(1)
    labels, pred_probs = given.numpy(), probabilities.double().numpy()
    issues = torch.from_numpy(find_label_issues(labels, pred_probs))
    return issues, 1.0 - torch.from_numpy(get_label_quality_scores(labels, pred_probs)).float()


class Pool:
    """The clean pool: paths, true labels, frozen features, zero-shot probabilities (computed once)."""

    def __init__(self, testbed: Path, root: Path):
        paths = {}
        features = frozen_features(testbed, root, paths)
        self.features, self.truth = features["pool"]
        self.paths = [os.path.abspath(path) for path in paths["pool"]]  # the CSVs hold absolute paths
        from coft_fast.data import from_folder

        self.names = from_folder(root / "pool").class_names
        zero_shot = coft_fast.zeroshot(root / "pool", model=f"local-dir:{testbed}", templates="single", out=None,
                                       overrides=["run.progress=false"])
        order = {path: row for row, path in enumerate(zero_shot.paths)}
        self.zero_shot = zero_shot.probabilities[[order[p] for p in self.paths]]
        self.lookalike = lookalikes(self.features, self.truth, len(self.names))

    def given(self, noise: str, seed: int) -> torch.Tensor:
        kind, rate = NOISES[noise]
        return add_noise(self.truth, kind, rate, seed, self.lookalike, len(self.names))

    def write_csv(self, path: Path, given: torch.Tensor) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows([("path", "label"), *zip(self.paths, (self.names[i] for i in given.tolist()))])
        return path


def pct(value):
    return "" if value is None else f"{100 * value:.2f}"


def run_cell(cell: dict, pool: Pool, root: Path, testbed: Path, work: Path) -> dict:
    method, noise, seed = cell["method"], cell["noise"], cell["seed"]
    started = time.perf_counter()
    given = pool.given(noise, seed)
    wrong = given != pool.truth
    row = {**cell, "noisy share": pct(wrong.double().mean().item())}
    found = None
    if method == "zero-shot":
        own = pool.zero_shot.gather(1, given[:, None]).squeeze(1)
        found = detection(pool.zero_shot.argmax(1) != given, 1.0 - own, wrong)
    elif method == "cleanlab":
        found = detection(*cleanlab_scores(pool.features, given, len(pool.names), seed), wrong)
    else:
        labelled = pool.write_csv(work / f"given_{noise}_seed{seed}.csv", given)
        classes = work / "classes.txt"
        classes.write_text("\n".join(pool.names) + "\n")
        common = dict(model=f"local-dir:{testbed}", eval_images=root / "test", resume=True,
                      out=work / f"{method}_{noise}_seed{seed}")
        if method in CLEAN_LABELS_OPTIONS:
            result = coft_fast.clean_labels(labelled, classes, overrides=["run.progress=false", f"seed={seed}",
                                                                          *CLEAN_LABELS_OPTIONS[method]], **common)
            where = {path: i for i, path in enumerate(pool.paths)}
            flagged, score = torch.zeros(len(given), dtype=torch.bool), torch.zeros(len(given))
            for issue in result.label_issues:
                flagged[where[issue.path]], score[where[issue.path]] = issue.is_issue, issue.issue_score
            found = detection(flagged, score, wrong)
            row["kept"] = result.metrics["filter"]["s1"]["size"]
        else:
            result = coft_fast.train(labelled, classes, method="self-train", overrides=[
                "run.progress=false", f"seed={seed}", "pseudo.source=given", f"pseudo.top_k={len(given)}"], **common)
            row["kept"] = result.metrics["phase2"]["s_star"]["train_size"]
        row["final"] = pct(result.metrics["final"]["acc1"])
    if found:
        row.update({"flagged": found["flagged"], "precision": pct(found["precision"]), "recall": pct(found["recall"]),
                    "roc auc": f"{found['roc auc']:.4f}"})
    row["seconds"] = f"{time.perf_counter() - started:.0f}"
    return row


def means(rows: list, method: str, noise: str, key: str):
    values = [float(r[key]) for r in rows if r["method"] == method and r["noise"] == noise and r[key] != ""]
    return (statistics.mean(values), len(values)) if values else None


def plot(rows: list, stem: str = STEM) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from coft_fast.runtime.io import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(11, 6))
    noises = [n for n in NOISES if any(r["noise"] == n for r in rows)]
    for ax, key, methods, title in (
            (axes[0], "roc auc", ("zero-shot", "cleanlab", "clean-labels-probe", "clean-labels-s-star",
                                  "clean-labels-pool-halves"), "issue ROC AUC"),
            (axes[1], "final", ("clean-labels-probe", "clean-labels-probe-relabel", "clean-labels-s-star",
                                "clean-labels-pool-halves", "plain-finetune"),
             "top-1 on cifar10/test (%)")):
        methods = [m for m in methods if m in METHODS or any(r["method"] == m for r in rows)]  # retired: if measured
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            values = [means(rows, method, n, key) for n in noises]
            ax.bar([x + i * width for x in range(len(noises))], [v[0] if v else 0 for v in values], width,
                   label=LABELS[method])
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(noises))])
        ax.set_xticklabels(noises)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1)  # below: no bar hidden
    axes[0].set_ylim(0.5, 1.0)
    finals = [float(r["final"]) for r in rows if r["final"] != ""]
    if finals:  # start the accuracy axis near the bars so their differences show
        axes[1].set_ylim(max(0.0, min(finals) - 10), max(finals) + 5)
    fig.suptitle("CIFAR-10 test bed with synthetic label noise (mean over seeds done)", fontsize=10)
    fig.tight_layout()
    atomic_write(RESULTS / f"{stem}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write(table: CellTable, testbed: Path, stem: str = STEM, tag: str = "") -> None:
    rows = table.ordered(cells(ROW_ORDER))
    command = "python bench/e2e_noisy_labels.py" + (f" --testbed DIR --tag {tag}" if tag else "")
    lines = [f"# Noisy labels on the CIFAR-10 test bed{f' ({tag})' if tag else ''} ({machine()})", "",
             f"`{command}` (resumable per cell). Test bed: "
             f"{testbed_settings(testbed) or testbed}; pool: cifar10/pool (10,000 images) with synthetic noise; "
             "eval: cifar10/test (5,000). Shares, precision, recall and top-1 in %. precision / recall: of the "
             "flagged labels against the labels the noise changed; roc auc: of the issue score. " + SECONDS_NOTE, "",
             *markdown_table(HEADER, rows), "", "Means over the seeds done (seeds in brackets):", "",
             "| noise | method | precision | recall | roc auc | final |", "|---|---|---|---|---|---|"]
    for noise in NOISES:
        for method in ROW_ORDER:
            found = {key: means(rows, method, noise, key) for key in ("precision", "recall", "roc auc", "final")}
            if any(found.values()):
                lines.append(f"| {noise} | {LABELS[method]} | " + " | ".join(
                    (f"{v[0]:.4f} ({v[1]})" if key == "roc auc" else f"{v[0]:.2f} ({v[1]})") if v else "-"
                    for key, v in found.items()) + " |")
    auc = {m: [float(r["roc auc"]) for r in rows if r["method"] == m and r["noise"] == "sym40" and r["roc auc"]]
           for m in ("zero-shot", "cleanlab", "clean-labels-probe", "clean-labels-s-star")}
    for mine in ("clean-labels-probe", "clean-labels-s-star"):
        if len(auc[mine]) == 3:
            for other in ("zero-shot", "cleanlab"):
                if len(auc[other]) == 3:
                    lines.append(f"\n40 % symmetric, 3-seed means: {LABELS[mine]} ROC AUC minus {LABELS[other]}: "
                                 f"{statistics.mean(auc[mine]) - statistics.mean(auc[other]):+.4f}.")
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    plot(rows, stem)


def main() -> None:
    args, root, work, testbed = cell_bench_args(__doc__.splitlines()[0], "METHOD:NOISE:SEED (e.g. cleanlab:sym40:1)",
                                                STEM)
    table = CellTable(args.stem, HEADER, ("method", "noise", "seed"))
    pools = []  # the clean pool's features and zero-shot probabilities, computed for the first cell to run

    def run(cell):
        pools[:] = pools or [Pool(testbed, root)]
        return run_cell(cell, pools[0], root, testbed, work)

    def record(row):
        table.add(row, cells(ROW_ORDER))
        write(table, testbed, args.stem, args.tag)

    run_cells(args, cells(), lambda c: f"{c['method']}:{c['noise']}:{c['seed']}", table.__contains__, run, record)
    if table.rows:
        write(table, testbed, args.stem, args.tag)


if __name__ == "__main__":
    main()
