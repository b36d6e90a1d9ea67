"""End to end on CIFAR-10 with the test bed: zero-shot, self-train, CoFT and CoFT+ over several seeds.

    python bench/e2e_cifar10.py [--seeds 0 1 2] [--methods coft coft+ self-train] [--testbed DIR]
                                [--work DIR] [--recipe NAME] [--set key=value ...] [--knn]

Every run uses `--recipe testbed` (the settings tuned on this test bed, the defaults before issue
19) unless --recipe names another; the results files say which.

A method name ending in "+knn" (e.g. coft+knn) is that method with pseudo.refine=knn; --knn
adds that variant of every method, so each is measured with and without kNN refinement.

The test bed is built from cifar10/pretrain (seed 0) unless --testbed names a built one;
cifar10/pool is the unlabelled pool (its labels are used only for the diagnostics columns),
cifar10/test the evaluation set. A linear probe on the pool's TRUE labels gives the ceiling (an
oracle for the table, never used by a method). Each run is a normal `coft_fast.train` run folder
under --work and resumes if interrupted, so the script can be re-run until every run has finished.
Writes bench/results/e2e_cifar10[_TAG].csv and .md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import coft_fast
from coft_fast.runtime.io import atomic_write_csv, atomic_write_text

from common import RESULTS, data_root, linear_probe_ceiling, machine, testbed_settings

COLUMNS = [
    ("zero-shot", lambda m: m["zero_shot"]["acc1"]),
    ("S* precision", lambda m: m["selection"]["pseudo_label_accuracy"]),
    ("phase I model 1", lambda m: m.get("phase1", {}).get("model1", {}).get("acc1")),
    ("phase I model 2", lambda m: m.get("phase1", {}).get("model2", {}).get("acc1")),
    ("clean set size", lambda m: m.get("filter", {}).get("s1", {}).get("size")),
    ("filter precision", lambda m: m.get("filter", {}).get("s1", {}).get("precision")),
    ("filter recall", lambda m: m.get("filter", {}).get("s1", {}).get("recall")),
    ("final", lambda m: m["final"]["acc1"]),
]


KNN_SUFFIX = "+knn"


def run_one(root: Path, testbed: Path, method: str, seed: int, work: Path, overrides, recipe: str = "testbed") -> dict:
    out = work / f"{method}_seed{seed}"
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    started = time.perf_counter()
    base = method[: -len(KNN_SUFFIX)] if method.endswith(KNN_SUFFIX) else method
    extra = ["pseudo.refine=knn"] if base != method else []
    result = coft_fast.train(root / "pool", model=f"local-dir:{testbed}", eval_images=root / "test", method=base,
                             out=out, resume=True, recipe=recipe,
                             overrides=[f"seed={seed}", "run.progress=false", *overrides, *extra])
    print(f"{method} seed {seed}: final {100 * result.metrics['final']['acc1']:.2f} "
          f"(zero-shot {100 * result.metrics['zero_shot']['acc1']:.2f}) in {time.perf_counter() - started:.0f} s",
          flush=True)
    return result.metrics


def fmt(value, percent=True):
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{100 * value:.2f}" if percent else f"{value:.0f}"


def largest_class(model_entry: dict) -> str:
    """'truck 20.0' for a round's model: the class it gives most pool images, and their share (label-free)."""
    counts = model_entry.get("pool_class_counts")
    if not counts:
        return "-"
    name = max(counts, key=counts.get)
    return f"{name} {100 * counts[name] / sum(counts.values()):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["coft", "coft+", "self-train"])
    parser.add_argument("--testbed", help="a built test-bed folder (default: build one under --work)")
    parser.add_argument("--work", default=str(RESULTS / "tmp" / "e2e_cifar10"), help="folder for the run folders")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--recipe", default="testbed", help="the recipe of every run (default: testbed)")
    parser.add_argument("--tag", default="", help="suffix of the results files (e.g. k64 for a variant)")
    parser.add_argument("--knn", action="store_true", help="also run every method with pseudo.refine=knn")
    args = parser.parse_args()
    if args.knn:
        args.methods = [m for method in args.methods for m in (method, method + KNN_SUFFIX)]
    stem = "e2e_cifar10" + (f"_{args.tag}" if args.tag else "")
    root = data_root() / "cifar10"
    work = Path(args.work)
    testbed = Path(args.testbed) if args.testbed else work / "testbed"
    if not (testbed / "open_clip_config.json").is_file():
        coft_fast.testbed(root / "pretrain", testbed, seed=0, overrides=["run.progress=false"])
    ceiling = linear_probe_ceiling(testbed, root)

    runs = {(method, seed): run_one(root, testbed, method, seed, work, args.overrides, args.recipe)
            for seed in args.seeds for method in args.methods}

    header = ["method", "seed"] + [name for name, _ in COLUMNS] + ["linear probe (oracle)", "phase seconds"]
    rows = []
    for (method, seed), metrics in runs.items():
        values = [get(metrics) for _, get in COLUMNS]
        times = ", ".join(f"{k} {v:.0f}" for k, v in metrics["timings"].items())
        rows.append([method, seed] + values + [ceiling, times])
    atomic_write_csv(RESULTS / f"{stem}.csv", header, rows)

    lines = [f"# End to end on CIFAR-10 with the test bed ({machine()})", "",
             f"Test bed: {testbed} ({testbed_settings(testbed) or 'no build report'}); pool: cifar10/pool (10,000 images, labels hidden); eval: cifar10/test. "
             f"Top-1 and precisions in %. Recipe: {args.recipe}. Overrides: {args.overrides or 'none'}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([row[0], str(row[1])] + [fmt(v) for v in row[2:-1]] + [row[-1]]) + " |")
    summary = []
    for method in args.methods:
        finals = [runs[(method, s)]["final"]["acc1"] for s in args.seeds]
        zero = [runs[(method, s)]["zero_shot"]["acc1"] for s in args.seeds]
        summary.append((method, statistics.mean(finals), statistics.mean(zero)))
        lines.append(f"| **{method} mean** | - | {fmt(statistics.mean(zero))} | | | | | | | "
                     f"{fmt(statistics.mean(finals))} | {fmt(ceiling)} | |")
    lines.append("")
    plus_runs = [(seed, runs[(m, seed)]) for m, seed in runs if m == "coft+"]
    if plus_runs:
        lines += ["CoFT+ phase I rounds (label accuracy in %: the round's training subset / the whole pool, "
                  "model 1 and model 2; the pool column of round r is its models' labels; 'models agree': the share of "
                  "the pool on which the round's two models give the same label, which needs no labels):", "",
                  "| seed | round | subset model 1 | subset model 2 | pool model 1 | pool model 2 | models agree | "
                  "most-labelled class, % of the pool (model 1 / model 2) | seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for seed, metrics in plus_runs:
            for entry in metrics["rounds"]:
                m1, m2 = entry["model1"], entry["model2"]
                lines.append(f"| {seed} | {entry['round']} | {fmt(m1['subset_label_accuracy'])} | "
                             f"{fmt(m2['subset_label_accuracy'])} | {fmt(m1.get('pool_label_accuracy'))} | "
                             f"{fmt(m2.get('pool_label_accuracy'))} | {fmt(entry.get('agreement'))} | "
                             f"{largest_class(m1)} / {largest_class(m2)} | {entry['seconds']:.0f} |")
            losses = metrics["phase2"]["s1"].get("contrastive_loss", [])
            if losses:
                lines.append(f"| {seed} | phase II contrastive loss per epoch | "
                             + ", ".join(f"{v:.3f}" for v in losses) + " | | | | | | |")
        lines.append("")
    means = {method: final for method, final, _ in summary}
    zero_mean = summary[0][2]
    if "coft" in means:
        gap_closed = (means["coft"] - zero_mean) / max(ceiling - zero_mean, 1e-9)
        lines.append(f"CoFT closes {100 * gap_closed:.0f} % of the gap between zero-shot ({fmt(zero_mean)}) and the "
                     f"ceiling ({fmt(ceiling)}).")
        if "self-train" in means:
            lines.append(f"CoFT minus self-train: {100 * (means['coft'] - means['self-train']):+.2f} points.")
    for method in args.methods:
        if method.endswith(KNN_SUFFIX) and method[: -len(KNN_SUFFIX)] in means:
            base = method[: -len(KNN_SUFFIX)]
            s_star = [(runs[(method, s)]["selection"]["pseudo_label_accuracy"],
                       runs[(base, s)]["selection"]["pseudo_label_accuracy"]) for s in args.seeds]
            lines.append(f"kNN refinement, {base}: final {100 * (means[method] - means[base]):+.2f} points; S* precision "
                         f"{100 * statistics.mean(a - b for a, b in s_star if a is not None and b is not None):+.2f} points.")
    if "coft+" in means:
        lines.append(f"CoFT+ minus zero-shot: {100 * (means['coft+'] - zero_mean):+.2f} points.")
        if "coft" in means:
            lines.append(f"CoFT+ minus CoFT: {100 * (means['coft+'] - means['coft']):+.2f} points.")
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
