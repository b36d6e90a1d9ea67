"""How much can a few labels teach the test bed's frozen features? (Why CoFT gains or not.)

    python bench/diagnose_testbed.py --testbed DIR [--run RUN_DIR ...] [--tag NAME]

On the frozen image features of cifar10/pool, a linear head that starts as the zero-shot classifier
(the class text embeddings at the model's logit scale, as phase II's head does) is trained with Adam
on: zero-shot top-K pseudo-labels (what S* holds), K TRUE labels per class (few-shot oracle), and
all TRUE labels of the pool (the ceiling). Each is scored on cifar10/test. CoFT's premise is that
features learn much from a few clean labels (CLIP's do): when the K-shot oracle is barely above
zero-shot, phase I cannot label the pool much better than zero-shot did, and neither can CoFT.
With ``--run``, a finished CoFT run folder on the same test bed, the same head is also trained on
that run's clean set S1: with the run's pseudo-labels (what phase II learns from) and with the same
images' TRUE labels (what a perfect filter would give), which says how much the filter's label noise
costs, and how well the filter's clean probabilities rank model 1's labels (ROC AUC) next to
zero-shot confidence ranking zero-shot labels. Writes bench/results/testbed_diagnosis[_TAG].md.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from coft_fast.models import load_clip
from coft_fast.pseudo import class_prompts
from coft_fast.scoring import class_text_embeddings, logit_scale_of, zeroshot_probabilities
from coft_fast.pseudo.selection import select_top_k
from coft_fast.runtime.checkpoint import load_state
from coft_fast.runtime.io import atomic_write_text

from common import RESULTS, data_root, frozen_features, machine, testbed_settings


def head_accuracy(train_x, train_y, text, scale, test_x, test_y, steps=300, lr=1e-2) -> float:
    """Top-1 of a zero-shot-initialised, row-normalised linear head trained on (train_x, train_y)."""
    weight = text.clone().requires_grad_()
    optimizer = torch.optim.Adam([weight], lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(scale * train_x @ F.normalize(weight, dim=1).T, train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return ((test_x @ F.normalize(weight, dim=1).T).argmax(1) == test_y).double().mean().item()


def read_run(run: Path, pool_paths, names) -> dict:
    """A finished CoFT run's per-image labels, in the frozen features' row order ("rows" maps the
    run's pool positions to feature rows), its filter's clean probabilities and its final acc1."""
    table = run / "pseudo_labels.csv"
    if not table.is_file():
        raise SystemExit(f"{run}: no pseudo_labels.csv (is it a finished run folder?)")
    position = {str(Path(p).resolve()): i for i, p in enumerate(pool_paths)}
    class_index = {name: i for i, name in enumerate(names)}
    columns = {"rows": [], "zero_shot": [], "confidence": [], "model1": [], "kept1": []}
    with open(table, newline="") as handle:
        for record in csv.DictReader(handle):
            path = str(Path(record["path"]).resolve())
            if path not in position:
                raise SystemExit(f"{table}: {record['path']} is not an image of cifar10/pool")
            if not record["model1_label"]:
                raise SystemExit(f"{table}: no model1_label (only CoFT and CoFT+ runs have a clean set)")
            columns["rows"].append(position[path])
            columns["zero_shot"].append(class_index[record["zero_shot_label"]])
            columns["confidence"].append(float(record["zero_shot_confidence"]))
            columns["model1"].append(class_index[record["model1_label"]])
            columns["kept1"].append(record["kept1"] == "1")
    out = {name: torch.tensor(values) for name, values in columns.items()}
    # The filter stage holds model 2's clean probability of each model-1 label, by run position.
    checkpoint = load_state(run / "checkpoints" / "filter.pt")
    if checkpoint is None:
        raise SystemExit(f"{run}: no filter stage in checkpoints/ (did the run reach the filter?)")
    out["p_clean1"] = torch.full((len(out["rows"]),), float("nan"))
    out["p_clean1"][checkpoint["positions"]] = checkpoint["result"]["p_clean1"].float()
    out["final"] = json.loads((run / "metrics.json").read_text())["final"]["acc1"]
    return out


def ranking_auc(score: torch.Tensor, correct: torch.Tensor) -> float:
    """Probability that a correct label scores above a wrong one (ROC AUC, ties counted half)."""
    good, bad = score[correct].double(), score[~correct].double().sort().values
    below = torch.searchsorted(bad, good, right=False)  # wrong labels scored strictly lower
    not_above = torch.searchsorted(bad, good, right=True)  # ... lower or equal
    return ((below + not_above).double().sum() / (2 * len(good) * len(bad))).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", required=True, help="a built test-bed folder")
    parser.add_argument("--run", action="append", default=[],
                        help="a finished CoFT run folder on this test bed (repeatable)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    root = data_root() / "cifar10"
    paths = {}
    features = frozen_features(args.testbed, root, paths)
    (pool_x, pool_y), (test_x, test_y) = features["pool"], features["test"]
    clip = load_clip(f"local-dir:{args.testbed}")
    names = [line for line in (Path(args.testbed) / "classes.txt").read_text().splitlines() if line]
    text = class_text_embeddings(clip, class_prompts("ensemble", names), names, torch.device("cpu"))
    scale = logit_scale_of(clip)
    confidence, pseudo_labels = zeroshot_probabilities(pool_x, text, scale).max(1)
    generator = torch.Generator().manual_seed(args.seed)

    def accuracy(rows, labels):
        return head_accuracy(pool_x[rows], labels, text, scale, test_x, test_y)

    rows_out = [("zero-shot (no training)", "-", "-", ((test_x @ text.T).argmax(1) == test_y).double().mean().item())]
    for k in (16, 64, 200):
        selection = select_top_k(pseudo_labels, confidence, k, names)
        rows, pseudo = selection.rows, selection.labels
        precision = (pseudo == pool_y[rows]).double().mean().item()
        rows_out.append((f"top-{k} zero-shot pseudo-labels (S*)", len(rows), f"{100 * precision:.1f} %", accuracy(rows, pseudo)))
    for k in (16, 64):
        rows = torch.cat([(pool_y == c).nonzero().flatten()[torch.randperm(int((pool_y == c).sum()), generator=generator)[:k]]
                          for c in range(len(names))])
        rows_out.append((f"{k} true labels per class (oracle)", len(rows), "100 %", accuracy(rows, pool_y[rows])))
    everything = torch.arange(len(pool_y))
    rows_out.append(("all true labels of the pool (oracle)", len(everything), "100 %", accuracy(everything, pool_y)))
    run_notes = []
    for run in args.run:
        labels = read_run(Path(run), paths["pool"], names)
        truth = pool_y[labels["rows"]]
        kept = labels["kept1"]
        rows, pseudo = labels["rows"][kept], labels["model1"][kept]
        precision = (pseudo == truth[kept]).double().mean().item()
        rows_out.append((f"clean set S1 of {run}, its pseudo-labels", len(rows), f"{100 * precision:.1f} %",
                         accuracy(rows, pseudo)))
        rows_out.append((f"clean set S1 of {run}, TRUE labels (perfect filter)", len(rows), "100 %",
                         accuracy(rows, pool_y[rows])))
        scored = labels["p_clean1"].isfinite()  # images the run could not read have no score
        filter_auc = ranking_auc(labels["p_clean1"][scored], (labels["model1"] == truth)[scored])
        zero_shot_auc = ranking_auc(labels["confidence"], labels["zero_shot"] == truth)
        per_class = ["", f"What {run}'s filter keeps, per class of model 1's label:", "",
                     "| class | pool images | model 1 labels | their precision | kept in S1 | S1 precision | share of the "
                     "class's correct labels kept |", "|---|---|---|---|---|---|---|"]
        for c, name in enumerate(names):
            given = labels["model1"] == c
            right = given & (truth == c)
            kept_c = given & kept
            per_class.append(f"| {name} | {int((truth == c).sum())} | {int(given.sum())} | {100 * right.sum().item() / max(int(given.sum()), 1):.1f} % | "
                             f"{int(kept_c.sum())} | {100 * (kept_c & right).sum().item() / max(int(kept_c.sum()), 1):.1f} % | "
                             f"{100 * (kept_c & right).sum().item() / max(int(right.sum()), 1):.1f} % |")
        run_notes.append("\n".join(per_class))
        run_notes.append(f"{run}: its phase II (full fine-tuning on S1's pseudo-labels) scored "
                         f"{100 * labels['final']:.2f} %. How well scores rank labels (ROC AUC of correct "
                         f"against wrong): model 2's clean probability of model 1's labels {filter_auc:.3f}, "
                         f"zero-shot confidence of zero-shot labels {zero_shot_auc:.3f}.")

    command = "python bench/diagnose_testbed.py --testbed DIR" + " --run RUN_DIR" * len(args.run)
    lines = [f"# What a few labels teach the test bed's features ({args.testbed})", "",
             f"`{command}" + (f" --tag {args.tag}" if args.tag else "") + "`. "
             "A linear head started from the zero-shot classifier, trained on frozen cifar10/pool features "
             "(Adam, 300 full-batch steps), scored on cifar10/test.", "",
             "| training labels | images | label precision | test top-1 |", "|---|---|---|---|"]
    for name, count, precision, acc in rows_out:
        lines.append(f"| {name} | {count} | {precision} | {100 * acc:.2f} % |")
    if run_notes:
        lines += [""] + run_notes
    settings = testbed_settings(args.testbed)
    if settings:
        lines += ["", f"Test bed: {settings}."]
    lines += ["", f"Machine: {machine()}.", ""]
    report = "\n".join(lines)
    print(report)
    atomic_write_text(RESULTS / ("testbed_diagnosis" + (f"_{args.tag}" if args.tag else "") + ".md"), report)


if __name__ == "__main__":
    main()
