"""The filter lab: CoFT's clean-label filter and its variants, measured per test bed, variant and seed.

    python bench/filter_lab.py --testbed NAME=MODEL_DIR[,POOL_DIR,EVAL_DIR] [...] [--variants V ...]
                               [--seeds 0 ...] [--work DIR] [--threads N] [--stop-after SECONDS]
                               [--set KEY=VALUE ...]

Test beds: NAME=MODEL_DIR for a CIFAR-10 test bed (pool cifar10/pool, evaluation cifar10/test under
$COFT_DATA), or NAME=MODEL_DIR,POOL_DIR,EVAL_DIR for any other (e.g. the digits test bed of the
demo: `coft-fast demo --out D` leaves D/testbed and D/data/{pool,test}). Pool folders are class
folders whose labels are used only for scoring.

Variants (each a set of config keys whose defaults are the paper's; see VARIANTS):
- training variants run a whole `coft_fast.train` (phase I, filter, phase II, evaluation);
- coftplus and coftplus-peer run the paper-coftplus recipe (3 rounds of phase I), the second with
  each round's subset ranked by the peer model's p_clean too (phase1.round_ranking=peer); their
  rows add model 1's pool-label accuracy after each round;
- decision variants (filter.rule, phase II options) reuse the `paper` cell's zero-shot, phase-I
  and filter stages: its checkpoints are copied into a fresh run folder that resumes from them, so
  only the decision and phase II run (their detection figures are the same models' labels).

The variants of the options removed in issue 37 (RETIRED: hard complements, phase I on the pool or
on halves, the agreement rule, clean-probability sample weights) no longer run; their committed
rows stay in the tables (bench/results/archive/removed_options.md says what they measured).

Per cell, over the pool (truth used only for scoring): kept count and share, precision and recall
of S1 (model 1's labels kept by model 2), the ROC AUC of the clean probability that decides (model
2's p_clean of model 1's labels; correct against wrong model-1 labels) beside zero-shot confidence's
(for zero-shot labels) and model 1's own softmax confidence's (for its labels: the ranking the
negative prompts must beat), the two models' agreement, per-class kept and precision, and the final
top-1. Resumable per cell: bench/results/filter_lab.csv holds every finished cell and is never
rerun; bench/results/filter_lab_<testbed>.md and .png (precision against kept share) are rewritten
from it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

import coft_fast
from coft_fast.runtime.io import atomic_write_text

from common import RESULTS, CellTable, data_root, machine, markdown_table, run_cells, run_label_aucs

STEM = "filter_lab"
# name: (config overrides, decision-only: reuses the paper cell's stages up to the filter)
VARIANTS = {
    "paper": ([], False),
    "mixture": (["filter.rule=mixture"], True),
    "gce": (["phase2.loss=gce"], True),
    # the reference the targets name: self-training on the top-K (no filter; final only)
    "self-train": (["method=self-train"], False),
    # CoFT+ (the paper-coftplus recipe) with each round's subset ranked by the model's own confidence
    # (the paper) or by it times the peer model's p_clean of the label
    "coftplus": ([], False),
    "coftplus-peer": (["phase1.round_ranking=peer"], False),
    # transductive labels (pseudo.refine=transclip) under CoFT, self-training and the testbed recipe
    "transclip": (["pseudo.refine=transclip"], False),
    "self-train-transclip": (["method=self-train", "pseudo.refine=transclip"], False),
    "self-train-transclip-lpft": (["method=self-train", "pseudo.refine=transclip", "phase2.head_init=probe"], False),
    "self-train-transclip-top64": (["method=self-train", "pseudo.refine=transclip", "pseudo.top_k=64"], False),
    "self-train-transclip-top64-lpft": (["method=self-train", "pseudo.refine=transclip", "pseudo.top_k=64",
                                         "phase2.head_init=probe"], False),
    "testbed": ([], False),
    "testbed-transclip": (["pseudo.refine=transclip"], False),
}
# variants of options removed in issue 37 (bench/results/archive/removed_options.md): not runnable any
# more, named only so that their committed rows in filter_lab.csv keep rendering in the tables
RETIRED = ("hard-complements", "hard-complements-0.5", "deft-pool", "pool-halves", "s-star-halves-k32", "agreement",
           "clean-weights")
# the tables' variant order, the retired ones where they stood among the runnable ones
ROW_ORDER = ("paper", "hard-complements", "hard-complements-0.5", "deft-pool", "pool-halves", "s-star-halves-k32",
             "agreement", "mixture", "gce", "clean-weights",
             *(v for v in VARIANTS if v not in ("paper", "mixture", "gce")))
RECIPES = {"coftplus": "paper-coftplus", "coftplus-peer": "paper-coftplus",  # default: paper-coft
           "testbed": "testbed", "testbed-transclip": "testbed"}
REUSED_STAGES = ("zero_shot.pt", "phase1_model1.pt", "phase1_model2.pt", "filter.pt")
HEADER = ["testbed", "variant", "seed", "kept", "kept share", "precision", "recall", "filter AUC", "zero-shot AUC",
          "own AUC", "agreement", "model1 pool acc", "rounds: model1 pool acc", "final", "per class (kept/precision)", "seconds"]


def parse_testbeds(specs, cifar10: Path) -> dict:
    found = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        parts = rest.split(",")
        if len(parts) == 1:
            parts += [str(cifar10 / "pool"), str(cifar10 / "test")]
        if len(parts) != 3 or not name:
            raise SystemExit(f"--testbed {spec!r}: expected NAME=MODEL_DIR or NAME=MODEL_DIR,POOL_DIR,EVAL_DIR")
        model, pool, evaluation = (Path(p) for p in parts)
        if not (model / "open_clip_config.json").is_file():
            raise SystemExit(f"--testbed {name}: {model} is not a built test bed (no open_clip_config.json)")
        found[name] = (model, pool, evaluation)
    return found


def pct(value):
    return "" if value is None else f"{100 * value:.2f}"


def run_cell(cell: dict, testbeds: dict, work: Path, common_overrides=()) -> dict:
    name, variant, seed = cell["testbed"], cell["variant"], cell["seed"]
    model, pool, evaluation = testbeds[name]
    overrides, decision_only = VARIANTS[variant]
    out = work / name / f"{variant}_seed{seed}"
    started = time.perf_counter()
    if decision_only and not (out / "checkpoints").is_dir():
        source = work / name / f"paper_seed{seed}" / "checkpoints"
        if not all((source / stage).is_file() for stage in REUSED_STAGES):
            raise RuntimeError(f"{variant} reuses the paper cell of {name}, seed {seed}: run it first")
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        for stage in REUSED_STAGES:
            shutil.copy(source / stage, out / "checkpoints" / stage)
    result = coft_fast.train(pool, model=f"local-dir:{model}", eval_images=evaluation, out=out, resume=True,
                             recipe=RECIPES.get(variant), overrides=["run.progress=false", f"seed={seed}", *common_overrides, *overrides])
    m = result.metrics
    final = {**cell, "final": pct(m["final"].get("acc1")), "seconds": f"{time.perf_counter() - started:.0f}"}
    if "filter" not in m:  # self-training: no filter to score
        return final
    s1 = m["filter"]["s1"]
    filter_auc, zero_shot_auc, own_auc = run_label_aucs(out)
    per_class = per_class_quality(out)
    return {**final, "kept": s1["size"], "kept share": pct(s1["size"] / m["pool"]["num_images"]),
            "precision": pct(s1.get("precision")), "recall": pct(s1.get("recall")),
            "filter AUC": "" if filter_auc is None else f"{filter_auc:.4f}",
            "zero-shot AUC": "" if zero_shot_auc is None else f"{zero_shot_auc:.4f}",
            "own AUC": "" if own_auc is None else f"{own_auc:.4f}",
            "agreement": pct(m["filter"]["agreement"]), "model1 pool acc": pct(m["phase1"]["model1"].get("pool_label_accuracy")),
            "rounds: model1 pool acc": " → ".join(pct(r["model1"].get("pool_label_accuracy")) for r in m.get("rounds", [])),
            "per class (kept/precision)": per_class}


def per_class_quality(run: Path) -> str:
    """'class kept/precision; ...' of S1 by model 1's label, from the run's pseudo_labels.csv."""
    import csv

    counts = {}
    with open(run / "pseudo_labels.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["kept1"] == "1":
                kept, right = counts.get(row["model1_label"], (0, 0))
                counts[row["model1_label"]] = (kept + 1, right + (row["model1_label"] == row["pool_label"]))
    return "; ".join(f"{name} {kept}/{100 * right / kept:.0f}" for name, (kept, right) in sorted(counts.items()))


def plot(rows: list, testbed: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from coft_fast.runtime.io import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in ROW_ORDER:
        found = [r for r in rows if r["variant"] == variant and r["precision"] != ""]
        if found:
            share = statistics.mean(float(r["kept share"]) for r in found)
            precision = statistics.mean(float(r["precision"]) for r in found)
            ax.scatter([share], [precision], label=f"{variant} ({len(found)} seed{'s' if len(found) > 1 else ''})")
    ax.set_xlabel("kept share of the pool (%)")
    ax.set_ylabel("clean-set precision (%)")
    ax.set_title(f"Filter variants on the {testbed} test bed (mean over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(RESULTS / f"{STEM}_{testbed}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write(table: CellTable, order: list) -> None:
    rows = table.ordered(order)
    for testbed in dict.fromkeys(r["testbed"] for r in rows):
        mine = [r for r in rows if r["testbed"] == testbed]
        lines = [f"# Filter lab: the {testbed} test bed ({machine()})", "",
                 "`python bench/filter_lab.py` (resumable per cell). S1: model 1's labels kept by model 2. precision / "
                 "recall: of S1 against the pool's true labels; filter AUC: ROC AUC of model 2's p_clean of model 1's "
                 "labels (correct against wrong); zero-shot AUC: of zero-shot confidence for zero-shot labels; own AUC: of "
                 "model 1's softmax confidence for its own labels; final: "
                 "top-1 on the evaluation images. Decision variants (mixture, gce; agreement and clean-weights, "
                 "removed in issue 37) reuse the paper cell's phase-I models. Rows of variants removed in issue 37 "
                 "are kept as measured (bench/results/archive/removed_options.md). Percentages in %.", "",
                 *markdown_table(HEADER, mine), "", "Means over seeds:", "",
                 "| variant | seeds | kept share | precision | recall | filter AUC | own AUC | agreement | final |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for variant in ROW_ORDER:
            found = [r for r in mine if r["variant"] == variant]
            if found:
                cols = [statistics.mean(float(r[k]) for r in found if r[k] != "") if any(r[k] != "" for r in found) else None
                        for k in ("kept share", "precision", "recall", "filter AUC", "own AUC", "agreement", "final")]
                lines.append(f"| {variant} | {len(found)} | " + " | ".join(
                    "-" if v is None else (f"{v:.4f}" if i in (3, 4) else f"{v:.2f}") for i, v in enumerate(cols)) + " |")
        atomic_write_text(RESULTS / f"{STEM}_{testbed}.md", "\n".join(lines) + "\n")
        plot(mine, testbed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", action="append", required=True, help="NAME=MODEL_DIR[,POOL_DIR,EVAL_DIR]")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--work", default=str(RESULTS / "tmp" / STEM))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cells", nargs="+", help="only these cells, as TESTBED:VARIANT:SEED")
    parser.add_argument("--stop-after", type=float, help="start no new cell after this many seconds")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every cell (e.g. a smaller schedule for a smoke run)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    testbeds = parse_testbeds(args.testbed, data_root() / "cifar10")
    table = CellTable(STEM, HEADER, ("testbed", "variant", "seed"))
    # the paper cell first: the decision variants reuse its stages
    variants = ["paper"] + [v for v in args.variants if v != "paper"]
    order = [{"testbed": t, "variant": v, "seed": s} for t in testbeds for s in args.seeds for v in variants]

    def record(row):
        table.add(row, order)
        write(table, order)

    run_cells(args, order, lambda c: f"{c['testbed']}:{c['variant']}:{c['seed']}", table.__contains__,
              lambda cell: run_cell(cell, testbeds, Path(args.work), args.overrides), record)
    if table.rows:
        write(table, order)


if __name__ == "__main__":
    main()
