"""Accuracy against labelled shots per class on the CIFAR-10 test bed, as the paper's Fig. 2.

    python bench/e2e_shots.py [--testbed DIR] [--tag NAME] [--work DIR] [--cells METHOD:SHOTS:SEED ...]
                              [--threads N] [--stop-after SECONDS]

Methods, all from the same shots: CoFT with the shots (`train --labeled`, the default config),
self-training with the shots (`--method self-train --labeled`), phase I on the shots alone (`phase1`:
the default config's model 1, dual prompts and deep visual prompts, its positive prompts as the
classifier; not CoOp, which has no visual prompts and no negative prompts: bench/testbed_fidelity.py
measures that) and a linear probe on the shots' frozen test-bed features.
Shots: 0 / 2 / 4 / 8 / 16 per class, drawn at random (seeded) from the pool's own class folders (a
shot's folder is its label; the rest of the pool stays unlabelled, its folders used for diagnostics
only); a seed's smaller draws are the first images of its larger ones. One seed for the curve, 3
seeds at 16 shots. Pool: cifar10/pool; evaluation: cifar10/test.

Resumable per cell (method, shots, seed): each finished cell goes to bench/results/e2e_shots.csv (and
the .md table and the PNG) at once, and a cell already in the CSV is never run again. An interrupted
CoFT or self-training cell resumes from its run folder under --work. The 0-shot CoFT and
self-training cells are the default-config cells of bench/results/recipes_cifar10.csv when that
file has them (the same runs: the recipes benchmark's paper-coft and self-train rows); the table
says so in its `source` column. With --tag (another test bed, e.g. `--testbed DIR --tag strong
--cells coft:16:0 ...`) the files are e2e_shots_TAG.* and the 0-shot cells come from
recipes_cifar10_TAG.csv.
"""
from __future__ import annotations

import csv
import random
import statistics
import time
from pathlib import Path

import torch

import coft_fast
from coft_fast.runtime.io import atomic_write_text

from common import (RESULTS, SECONDS_NOTE, CellTable, cell_bench_args, linear_probe_accuracy, machine, markdown_table,
                    run_cells, testbed_settings)

STEM = "e2e_shots"
METHODS = ("coft", "self-train", "phase1", "linear-probe")
LABELS = {"coft": "CoFT + shots", "self-train": "self-training + shots", "phase1": "phase I (shots only)",
          "linear-probe": "linear probe (shots only)"}
HEADER = ["method", "shots", "seed", "final", "zero-shot", "S* precision", "clean set size", "filter precision",
          "seconds", "source"]


def cells() -> list:
    """The order the cells run in: 0 shots (taken from the recipes benchmark when it has them), the
    16-shot comparison (3 seeds, cheap methods first), then the rest of the curve."""
    order = [("self-train", 0, 0), ("coft", 0, 0)]
    order += [(method, 16, seed) for seed in (0, 1, 2) for method in ("linear-probe", "phase1", "self-train", "coft")]
    for shots in (8, 4, 2):
        order += [(method, shots, 0) for method in ("linear-probe", "phase1", "self-train", "coft")]
    return [{"method": m, "shots": n, "seed": s} for m, n, s in order]


def draw_shots(pool: Path, per_class: int, seed: int) -> list:
    """[(path, class folder)]: ``per_class`` images of each class folder, a seeded random draw (nested
    across ``per_class`` for one seed)."""
    chosen = []
    for folder in sorted(p for p in pool.iterdir() if p.is_dir()):
        files = sorted(str(p) for p in folder.iterdir() if p.is_file())
        chosen += [(path, folder.name) for path in random.Random(f"{seed}:{folder.name}").sample(files, len(files))[:per_class]]
    return chosen


def write_shots_csv(path: Path, shots: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *shots])
    return path


def pct(value):
    return "" if value is None else f"{100 * value:.2f}"


class Features:
    """The frozen test bed's normalised features of the shots and of cifar10/test (computed once)."""

    def __init__(self, testbed: Path, root: Path):
        from coft_fast.data import from_folder
        from coft_fast.models import load_clip

        self.clip = load_clip(f"local-dir:{testbed}", device="cpu")
        self.names = from_folder(root / "test").class_names
        self.root = root
        self._test = None

    def encode(self, source):
        from coft_fast.scoring import encode_images

        features, positions = encode_images(self.clip, source, torch.device("cpu"), batch_size=512, progress=False)
        return features, torch.tensor(source.labels)[positions]

    @property
    def test(self):
        if self._test is None:
            from coft_fast.data import from_folder

            self._test = self.encode(from_folder(self.root / "test"))
        return self._test

    def shots(self, shots: list):
        from coft_fast.data import ImageSource

        return ImageSource([p for p, _ in shots], [self.names.index(c) for _, c in shots], self.names, "shots")


def linear_probe(features: Features, shots: list, seed: int) -> float:
    return linear_probe_accuracy(*features.encode(features.shots(shots)), *features.test, seed=seed)


def phase1(features: Features, shots: list, seed: int) -> float:
    """Phase I (the default config's) on the shots alone, the positive prompts as the classifier: the
    first model of a CoFT run with these shots as S*, evaluated on cifar10/test."""
    from coft_fast.config import Config
    from coft_fast.data import from_folder
    from coft_fast.data.resident import ResidentImages, preprocess_stats
    from coft_fast.phases.phase1 import encode_with_models, make_prompt_model, train_phase1
    from coft_fast.pseudo import prompt_names
    from coft_fast.runtime.device import seed_everything

    cfg = Config()
    seed_everything(seed)
    device = torch.device("cpu")
    source = features.shots(shots)
    images = ResidentImages(source, list(range(len(source))), *preprocess_stats(features.clip.model), progress=False)
    model_seed = seed * 1000 + cfg.phase1.seeds[0]  # as CoftRun seeds its model 1
    model = make_prompt_model(features.clip, prompt_names(features.names), cfg.phase1, model_seed, device)
    train_phase1(model, images, torch.arange(len(source)), torch.tensor(source.labels), cfg.phase1, model_seed, device,
                 progress=False)
    test = from_folder(features.root / "test")
    (image_features,), positions = encode_with_models([model], test, None, device, progress=False)
    with torch.no_grad():
        positive, _ = model.text_features()
    predictions = (image_features @ positive.T).argmax(1)
    return (predictions == torch.tensor(test.labels)[positions]).double().mean().item()


def from_recipes(cell: dict, tag: str = ""):
    """The 0-shot CoFT / self-training cell from bench/results/recipes_cifar10[_TAG].csv, when it has it."""
    path = RESULTS / ("recipes_cifar10" + (f"_{tag}" if tag else "") + ".csv")
    row_name = {"coft": "paper-coft", "self-train": "self-train"}.get(cell["method"])
    if cell["shots"] != 0 or row_name is None or not path.is_file():
        return None
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["row"] == row_name and int(row["seed"]) == cell["seed"]:
                return {**cell, "final": row["final"], "zero-shot": row["zero-shot"],
                        "S* precision": row["S* precision"], "clean set size": row["clean set size"],
                        "filter precision": row["filter precision"], "seconds": row["seconds"],
                        "source": f"{path.name} ({row_name}, seed {cell['seed']})"}
    return None


def run_cell(cell: dict, root: Path, testbed: Path, work: Path, features: Features) -> dict:
    method, shots, seed = cell["method"], cell["shots"], cell["seed"]
    started = time.perf_counter()
    drawn = draw_shots(root / "pool", shots, seed)
    row = {**cell, "source": "this script"}
    if method == "linear-probe":
        row["final"] = pct(linear_probe(features, drawn, seed))
    elif method == "phase1":
        row["final"] = pct(phase1(features, drawn, seed))
    else:
        labeled = write_shots_csv(work / f"shots_{shots}_seed{seed}.csv", drawn) if shots else None
        overrides = ["run.progress=false", f"seed={seed}"] + (["method=self-train"] if method == "self-train" else [])
        result = coft_fast.train(root / "pool", model=f"local-dir:{testbed}", eval_images=root / "test",
                                 out=work / f"{method}_{shots}shots_seed{seed}", resume=True, overrides=overrides,
                                 labeled=labeled)
        m = result.metrics
        s1 = m.get("filter", {}).get("s1", {})
        row.update({"final": pct(m["final"]["acc1"]), "zero-shot": pct(m["zero_shot"]["acc1"]),
                    "S* precision": pct(m["selection"]["pseudo_label_accuracy"]), "clean set size": s1.get("size", ""),
                    "filter precision": pct(s1.get("precision"))})
    row["seconds"] = f"{time.perf_counter() - started:.0f}"
    return row


def summary(table: CellTable) -> dict:
    """{method: {shots: [final per seed]}} of the finished cells."""
    found = {}
    for row in table.rows.values():
        found.setdefault(row["method"], {}).setdefault(int(row["shots"]), []).append(float(row["final"]))
    return found


def plot(found: dict, stem: str = STEM) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from coft_fast.runtime.io import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        points = sorted((shots, statistics.mean(values)) for shots, values in found.get(method, {}).items())
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], "-o", label=LABELS[method])
    ax.set_xscale("symlog", linthresh=2)
    ax.set_xticks([0, 2, 4, 8, 16])
    ax.set_xticklabels(["0", "2", "4", "8", "16"])
    ax.set_xlabel("labelled shots per class")
    ax.set_ylabel("top-1 on cifar10/test (%)")
    ax.set_title("CIFAR-10 test bed: accuracy against labelled shots (mean over seeds done)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(RESULTS / f"{stem}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write(table: CellTable, testbed: Path, stem: str = STEM, tag: str = "") -> None:
    rows = table.ordered(cells())
    found = summary(table)
    command = "python bench/e2e_shots.py" + (f" --testbed DIR --tag {tag}" if tag else "")
    lines = [f"# Accuracy against labelled shots on the CIFAR-10 test bed{f' ({tag})' if tag else ''} ({machine()})", "",
             f"`{command}` (resumable per cell). Test bed: "
             f"{testbed_settings(testbed) or testbed}; pool: cifar10/pool (10,000 images; the shots' folders are "
             "their labels, the rest stays unlabelled); eval: cifar10/test (5,000). Top-1 and precisions in %. "
             "Shots drawn at random per class and seed from the pool. CoFT and self-training run the default "
             "config (the paper's method) with `--labeled`; phase I is the default config's model 1 on the shots "
             "alone (dual prompts and visual prompts; its positive prompts as the classifier); the linear probe is trained on the shots' frozen features. " + SECONDS_NOTE, "",
             *markdown_table(HEADER, rows), "", "Means over the seeds done:", "",
             "| method | " + " | ".join(f"{n} shots" for n in (0, 2, 4, 8, 16)) + " |", "|---|" + "---|" * 5]
    for method in METHODS:
        values = found.get(method, {})
        lines.append(f"| {LABELS[method]} | " + " | ".join(
            f"{statistics.mean(values[n]):.2f} ({len(values[n])})" if n in values else "-" for n in (0, 2, 4, 8, 16))
            + " |")
    lines += ["", "(seeds done in brackets)"]
    sixteen = {m: found.get(m, {}).get(16, []) for m in METHODS}
    if len(sixteen["coft"]) == 3:
        for other in ("phase1", "self-train", "linear-probe"):
            if len(sixteen[other]) == 3:
                gap = statistics.mean(sixteen["coft"]) - statistics.mean(sixteen[other])
                lines.append(f"16 shots, 3-seed means: CoFT minus {LABELS[other]}: {gap:+.2f} points.")
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    plot(found, stem)


def main() -> None:
    args, root, work, testbed = cell_bench_args(__doc__.splitlines()[0], "METHOD:SHOTS:SEED (e.g. coft:16:1)", STEM)
    table = CellTable(args.stem, HEADER, ("method", "shots", "seed"))
    features = Features(testbed, root)

    def record(row):
        table.add(row, cells())
        write(table, testbed, args.stem, args.tag)

    run_cells(args, cells(), lambda c: f"{c['method']}:{c['shots']}:{c['seed']}", table.__contains__,
              lambda cell: from_recipes(cell, args.tag) or run_cell(cell, root, testbed, work, features), record)
    write(table, testbed, args.stem, args.tag)


if __name__ == "__main__":
    main()
