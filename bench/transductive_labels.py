"""Labels of the pool and of the evaluation split per test bed: zero-shot, the kNN vote and TransCLIP.

    python bench/transductive_labels.py --testbed NAME=MODEL_DIR[,POOL_DIR,EVAL_DIR] [...]
                                        [--work DIR] [--threads N]

Test beds as in bench/filter_lab.py: NAME=MODEL_DIR for a CIFAR-10 test bed (cifar10/pool and
cifar10/test under $COFT_DATA), NAME=MODEL_DIR,POOL_DIR,EVAL_DIR for another (the digits test bed:
`coft-fast demo --out D` leaves D/testbed and D/data/{pool,test}). Each split is labelled on its own
(transductively: the split is its own pool), with the labels `coft_fast.pseudo.transductive.
refine_labels` gives a run (`pseudo.refine`): zero-shot with the single template and with the
80-template ensemble; the kNN vote (pseudo.refine=knn, k = pseudo.knn_k's default) and TransCLIP with
its published defaults (pseudo.refine=transclip) on each. Per cell: top-1 accuracy, the precision of
the class-balanced top-16 (S*, as select_top_k ranks it; mean over classes and the worst class), and
the refinement's seconds (features are encoded once per split, not counted). Resumable per cell:
bench/results/transductive_labels.csv; the .md table is rewritten from it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from coft_fast.config import Config
from coft_fast.pseudo.selection import select_top_k
from coft_fast.pseudo.transductive import refine_labels

from common import RESULTS, CellTable, data_root, machine, markdown_table, testbed_settings

STEM = "transductive_labels"
HEADER = ["testbed", "split", "prior", "refine", "images", "acc1", "top16 precision", "worst class top16",
          "changed", "seconds"]
PRIORS = ("single", "ensemble")
REFINES = ("none", "knn", "transclip")
TOP_K = 16


def parse_testbed(text: str):
    name, _, rest = text.partition("=")
    parts = rest.split(",")
    if len(parts) == 1:
        root = data_root() / "cifar10"
        return name, Path(parts[0]), root / "pool", root / "test"
    if len(parts) != 3:
        raise SystemExit(f"--testbed {text!r}: give NAME=MODEL_DIR or NAME=MODEL_DIR,POOL_DIR,EVAL_DIR")
    return name, Path(parts[0]), Path(parts[1]), Path(parts[2])


def scored_split(model_dir: Path, folder: Path, work: Path, name: str, split: str) -> dict:
    """{features, labels, probabilities per prior} of a split, cached under ``work``."""
    cache = work / f"{name}_{split}_scores.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    from coft_fast.data import from_folder
    from coft_fast.models import load_clip
    from coft_fast.pseudo import class_prompts
    from coft_fast.scoring import class_text_embeddings, encode_images, logit_scale_of, zeroshot_probabilities

    clip = load_clip(f"local-dir:{model_dir}")
    source = from_folder(folder)
    device = torch.device("cpu")
    features, positions = encode_images(clip, source, device, batch_size=512, progress=False)
    scores = {"features": features, "labels": torch.tensor(source.labels)[positions], "classes": source.class_names}
    for prior in PRIORS:
        text = class_text_embeddings(clip, class_prompts(prior, source.class_names), source.class_names, device)
        scores[prior] = zeroshot_probabilities(features, text, logit_scale_of(clip))
    work.mkdir(parents=True, exist_ok=True)
    torch.save(scores, cache)
    return scores


def top_k_precision(labels, ranking, truth, classes):
    """(mean over classes, worst class) precision of the class-balanced top-K."""
    chosen = select_top_k(labels, ranking, TOP_K, classes)
    right = (chosen.labels == truth[chosen.rows]).double()
    per_class = [right[chosen.labels == c].mean().item() for c in range(len(classes)) if (chosen.labels == c).any()]
    return sum(per_class) / len(per_class), min(per_class)


def run_cell(scores: dict, prior: str, refine: str) -> dict:
    probabilities, truth = scores[prior], scores["labels"]
    started = time.perf_counter()
    if refine == "none":
        labelled, ranking = probabilities, probabilities.max(1).values
    else:
        refined = refine_labels(refine, probabilities, scores["features"], Config().pseudo.knn_k)
        labelled, ranking = refined.probabilities, refined.ranking
    seconds = time.perf_counter() - started
    labels = labelled.argmax(1)
    mean, worst = top_k_precision(labels, ranking, truth, scores["classes"])
    return {"images": len(truth), "acc1": f"{100 * (labels == truth).double().mean().item():.2f}",
            "top16 precision": f"{100 * mean:.2f}", "worst class top16": f"{100 * worst:.2f}",
            "changed": f"{100 * (labels != probabilities.argmax(1)).double().mean().item():.2f}",
            "seconds": f"{seconds:.2f}"}


def write(table: CellTable, order, notes) -> None:
    rows = table.ordered(order)
    lines = [f"# Labels of the pool and the evaluation split: zero-shot, kNN vote, TransCLIP ({machine()})", "",
             "`python bench/transductive_labels.py --testbed NAME=DIR ...` (resumable per cell). Each split is "
             "labelled on its own, transductively. prior: the zero-shot text side (single template or the 80-template "
             "ensemble); refine: none (zero-shot), knn (pseudo.refine=knn, k = 10) or transclip (pseudo.refine="
             "transclip, TransCLIP's published defaults: 3 neighbours, 10 x 5 block iterations, lambda 1, the "
             "model's own logit scale). top16 precision: the class-balanced top-16 (S*), mean over classes; worst "
             "class: its lowest. changed: share of labels that differ from the prior's. seconds: the refinement "
             "alone (2 CPU cores, shared with other benchmark processes), features encoded once per split.", ""]
    lines += markdown_table(HEADER, rows)
    gains = []
    for row in rows:
        if row["refine"] == "none":
            continue
        base = table.rows.get(table.key({**row, "refine": "none"}))
        if base:
            gains.append(f"- {row['testbed']} {row['split']} ({row['prior']}): {row['refine']} "
                         f"{float(row['acc1']) - float(base['acc1']):+.2f} points accuracy, "
                         f"{float(row['top16 precision']) - float(base['top16 precision']):+.2f} top-16 precision")
    lines += ["", "Gains over the prior's zero-shot labels:", ""] + gains + [""] + notes
    (RESULTS / f"{STEM}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", nargs="+", required=True, help="NAME=MODEL_DIR[,POOL_DIR,EVAL_DIR]")
    parser.add_argument("--work", default=str(RESULTS / "tmp" / STEM), help="where the split features are cached")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = CellTable(STEM, HEADER, ("testbed", "split", "prior", "refine"))
    testbeds = [parse_testbed(text) for text in args.testbed]
    order = [{"testbed": name, "split": split, "prior": prior, "refine": refine} for name, *_ in testbeds
             for split in ("pool", "test") for prior in PRIORS for refine in REFINES]
    notes = [f"- {name}: {testbed_settings(model) or model}" for name, model, _, _ in testbeds]
    for name, model, pool, test in testbeds:
        for split, folder in (("pool", pool), ("test", test)):
            scores = None
            for prior in PRIORS:
                for refine in REFINES:
                    cell = {"testbed": name, "split": split, "prior": prior, "refine": refine}
                    if cell in table:
                        continue
                    scores = scores or scored_split(model, folder, Path(args.work), name, split)
                    row = {**cell, **run_cell(scores, prior, refine)}
                    print(row, flush=True)
                    table.add(row, order)
                    write(table, order, notes)
    write(table, order, notes)


if __name__ == "__main__":
    main()
