"""How much can a few labels teach the test bed's frozen features? (Why CoFT gains or not.)

    python bench/diagnose_testbed.py --testbed DIR [--tag NAME]

On the frozen image features of cifar10/pool, a linear head that starts as the zero-shot classifier
(the class text embeddings at the model's logit scale, as phase II's head does) is trained with Adam
on: zero-shot top-K pseudo-labels (what S* holds), K TRUE labels per class (few-shot oracle), and
all TRUE labels of the pool (the ceiling). Each is scored on cifar10/test. CoFT's premise is that
features learn much from a few clean labels (CLIP's do): when the K-shot oracle is barely above
zero-shot, phase I cannot label the pool much better than zero-shot did, and neither can CoFT.
Writes bench/results/testbed_diagnosis[_TAG].md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from coft_fast.models import load_clip
from coft_fast.pseudo import class_prompts, class_text_embeddings, logit_scale_of, zeroshot_probabilities
from coft_fast.pseudo.selection import select_top_k
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", required=True, help="a built test-bed folder")
    parser.add_argument("--tag", default="")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    root = data_root() / "cifar10"
    features = frozen_features(args.testbed, root)
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

    lines = [f"# What a few labels teach the test bed's features ({args.testbed})", "",
             "`python bench/diagnose_testbed.py --testbed DIR" + (f" --tag {args.tag}" if args.tag else "") + "`. "
             "A linear head started from the zero-shot classifier, trained on frozen cifar10/pool features "
             "(Adam, 300 full-batch steps), scored on cifar10/test.", "",
             "| training labels | images | label precision | test top-1 |", "|---|---|---|---|"]
    for name, count, precision, acc in rows_out:
        lines.append(f"| {name} | {count} | {precision} | {100 * acc:.2f} % |")
    settings = testbed_settings(args.testbed)
    if settings:
        lines += ["", f"Test bed: {settings}."]
    lines += ["", f"Machine: {machine()}.", ""]
    report = "\n".join(lines)
    print(report)
    atomic_write_text(RESULTS / ("testbed_diagnosis" + (f"_{args.tag}" if args.tag else "") + ".md"), report)


if __name__ == "__main__":
    main()
