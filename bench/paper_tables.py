"""Reproduce the paper's tables: the unlabelled setting on its nine datasets, laid out as CoOp prepares them.

    python bench/paper_tables.py --data-root DIR --model ViT-B-16 --pretrained openai
        [--datasets Caltech101 DTD ...] [--methods zero-shot coft coft+ self-train] [--seeds 0 1 2]
        [--templates-dir DIR] [--distill] [--out DIR] [--set key=value ...]

For each dataset the train split is the unlabelled pool (its labels are used only for diagnostics)
and the test split the evaluation set, as in the paper (Table 1; with --distill, Table 3: phase I
on ViT-L/14, phase II fine-tunes ViT-B/16, the `paper-distill` recipe). Methods: `zero-shot`
(CLIP with the hand template "a photo of a {}."), `coft` (the `paper-coft` recipe, the default),
`coft+` (`paper-coftplus`; with --templates-dir, the dataset's LLM template file DIR/<Dataset>.json,
e.g. DTD.json, else CLIP's 80-template ensemble) and `self-train` (the baseline, default config).

Writes OUT/paper_tables.md and OUT/paper_tables.csv: the paper's figures beside this library's
(mean over the seeds) and each dataset's time. Every run is a normal `coft_fast.train` run folder
under OUT/runs/<Dataset>/<method>_seed<S>; one that finished (metrics.json) is read back, never run
again, and an interrupted one resumes, so re-running the same command continues where it stopped.

Layout (CoOp's DATASETS.md; the split files are CoOp's, from its Google Drive links):

| dataset | folder under --data-root | split file | images relative to |
|---|---|---|---|
| Caltech101 | caltech-101 | split_zhou_Caltech101.json | caltech-101/101_ObjectCategories |
| DTD | dtd | split_zhou_DescribableTextures.json | dtd/images |
| EuroSAT | eurosat | split_zhou_EuroSAT.json | eurosat/2750 |
| FGVCAircraft | fgvc_aircraft | no JSON: variants.txt, images_variant_train.txt / _test.txt | fgvc_aircraft/images (<id>.jpg) |
| Flowers102 | oxford_flowers | split_zhou_OxfordFlowers.json | oxford_flowers/jpg |
| Food101 | food-101 | split_zhou_Food101.json | food-101/images |
| OxfordPets | oxford_pets | split_zhou_OxfordPets.json | oxford_pets/images |
| StanfordCars | stanford_cars | split_zhou_StanfordCars.json | stanford_cars |
| UCF101 | ucf101 | split_zhou_UCF101.json | ucf101/UCF-101-midframes |

Class names are CoOp's: the third field of each split entry (underscores read as spaces in
prompts), and for FGVCAircraft the lines of variants.txt, as CoOp's loaders read them.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

REPO = Path(__file__).resolve().parent.parent


class Dataset(NamedTuple):
    folder: str
    split_file: Optional[str]  # None: FGVCAircraft's variant lists
    image_dir: str  # relative to the dataset folder ("" for the folder itself)


DATASETS: Dict[str, Dataset] = {
    "Caltech101": Dataset("caltech-101", "split_zhou_Caltech101.json", "101_ObjectCategories"),
    "DTD": Dataset("dtd", "split_zhou_DescribableTextures.json", "images"),
    "EuroSAT": Dataset("eurosat", "split_zhou_EuroSAT.json", "2750"),
    "FGVCAircraft": Dataset("fgvc_aircraft", None, "images"),
    "Flowers102": Dataset("oxford_flowers", "split_zhou_OxfordFlowers.json", "jpg"),
    "Food101": Dataset("food-101", "split_zhou_Food101.json", "images"),
    "OxfordPets": Dataset("oxford_pets", "split_zhou_OxfordPets.json", "images"),
    "StanfordCars": Dataset("stanford_cars", "split_zhou_StanfordCars.json", ""),
    "UCF101": Dataset("ucf101", "split_zhou_UCF101.json", "UCF-101-midframes"),
}
METHODS = ("zero-shot", "coft", "coft+", "self-train")
# top-1 %, CLIP ViT-B/16, fully unlabelled (docs/coft-method.md): (zero-shot, CoFT, CoFT+)
PAPER_TABLE1 = {
    "Caltech101": (89.27, 95.50, 94.40), "DTD": (44.73, 52.13, 52.30), "EuroSAT": (48.75, 86.02, 90.20),
    "FGVCAircraft": (25.11, 29.49, 31.25), "Flowers102": (71.73, 78.08, 79.60), "Food101": (84.83, 90.58, 90.45),
    "OxfordPets": (86.01, 92.40, 93.16), "StanfordCars": (66.52, 77.08, 79.13), "UCF101": (67.44, 78.35, 80.23),
}
# Table 3 (distillation): phase I on ViT-L/14, phase II ViT-B/16: (zero-shot B/16, CoFT, CoFT+)
PAPER_TABLE3 = {
    "Caltech101": (89.27, 95.88, 95.27), "DTD": (44.73, 57.97, 57.72), "EuroSAT": (48.75, 87.10, 89.57),
    "FGVCAircraft": (25.11, 36.86, 37.67), "Flowers102": (71.73, 81.86, 82.72), "Food101": (84.83, 92.59, 93.53),
    "OxfordPets": (86.01, 95.50, 95.14), "StanfordCars": (66.52, 83.38, 83.87), "UCF101": (67.44, 80.84, 81.37),
}
PAPER_COLUMN = {"zero-shot": 0, "coft": 1, "coft+": 2}
RECIPES = {"coft": "paper-coft", "coft+": "paper-coftplus", "self-train": "paper-coft"}


class Sources(NamedTuple):
    pool: str
    evaluation: str
    classes: Optional[List[str]]
    settings: List[str]  # config keys that select the splits


def fgvc_sources(folder: Path, work: Path) -> Sources:
    """FGVCAircraft as CoOp's loader reads it: class names from variants.txt, images_variant_<split>.txt
    lines "<image id> <variant name>", images at images/<id>.jpg; written as CSVs the library reads."""
    variants = folder / "variants.txt"
    if not variants.is_file():
        raise SystemExit(f"FGVCAircraft: {variants} not found (CoOp's layout: fgvc_aircraft/variants.txt)")
    names = [line.strip() for line in variants.read_text().splitlines() if line.strip()]
    index = {name: i for i, name in enumerate(names)}
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        listing = folder / f"images_variant_{split}.txt"
        if not listing.is_file():
            raise SystemExit(f"FGVCAircraft: {listing} not found")
        rows = []
        for number, line in enumerate(listing.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in index:
                raise SystemExit(f"{listing}, line {number}: variant {variant!r} is not in {variants}")
            rows.append((str(folder / "images" / f"{image_id}.jpg"), index[variant]))
        target = work / f"fgvc_{split}.csv"
        with open(target, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            writer.writerows(rows)
        out[split] = str(target)
    return Sources(out["train"], out["test"], names, [])


def dataset_sources(name: str, root: Path, work: Path) -> Sources:
    spec = DATASETS[name]
    folder = root / spec.folder
    if not folder.is_dir():
        raise SystemExit(f"{name}: folder {folder} not found (see the layout table in bench/paper_tables.py)")
    if spec.split_file is None:
        return fgvc_sources(folder, work / "lists")
    split = folder / spec.split_file
    if not split.is_file():
        raise SystemExit(f"{name}: split file {split} not found (CoOp's {spec.split_file})")
    image_root = folder / spec.image_dir if spec.image_dir else folder
    return Sources(str(split), str(split), None,
                   ["data.split=train", "data.eval_split=test", f"data.image_root={json.dumps(str(image_root))}"])


def run_cell(name: str, method: str, seed: int, sources: Sources, args, out: Path) -> dict:
    """One method on one dataset: its metrics (read back when the run finished before)."""
    import coft_fast

    folder = out / "runs" / name / f"{method}_seed{seed}"
    done = folder / ("metrics.json" if method != "zero-shot" else "zero_shot_metrics.json")
    if done.is_file():
        return json.loads(done.read_text())
    started = time.perf_counter()
    model = {} if args.distill else {"model": args.model, "pretrained": args.pretrained}
    if method == "zero-shot":
        settings = [s.replace("data.split=train", "data.split=test") for s in sources.settings]
        # Table 3's zero-shot column is the phase II backbone's (ViT-B/16): --model / --pretrained in both tables
        result = coft_fast.zeroshot(sources.evaluation, sources.classes, templates="single", out=folder,
                                    overrides=settings + ["run.progress=false"] + list(args.overrides),
                                    model=args.model, pretrained=args.pretrained)
        metrics = {"final": {"acc1": result.metrics["acc1"]}, "zero_shot": {"acc1": result.metrics["acc1"]}}
    else:
        templates = []
        if method == "coft+" and args.templates_dir:
            file = Path(args.templates_dir) / f"{name}.json"
            if not file.is_file():
                raise SystemExit(f"{name}: no template file {file} in --templates-dir")
            templates = [f"zeroshot.templates={json.dumps(str(file))}"]
        recipe = "paper-distill" if args.distill else RECIPES[method]
        overrides = sources.settings + [f"seed={seed}", "run.progress=false", f"method={method}"] + templates
        result = coft_fast.train(sources.pool, sources.classes, eval_images=sources.evaluation, out=folder,
                                 resume=True, recipe=recipe, overrides=overrides + list(args.overrides), **model)
        metrics = result.metrics
    metrics["wall_seconds"] = time.perf_counter() - started
    done.write_text(json.dumps(metrics))
    return metrics


def fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_tables(results: Dict[str, Dict[str, List[dict]]], args, out: Path) -> None:
    paper = PAPER_TABLE3 if args.distill else PAPER_TABLE1
    table = "Table 3 (distillation, phase I ViT-L/14 -> phase II ViT-B/16)" if args.distill else "Table 1"
    columns = []
    for method in args.methods:
        if method in PAPER_COLUMN:
            columns.append((method, True))
        columns.append((method, False))
    header = ["dataset"] + [f"{m} ({'paper' if p else 'ours'})" for m, p in columns] + ["seeds", "minutes"]
    rows, csv_rows = [], []
    sums = {c: [] for c in columns}
    for name, per_method in results.items():
        row = [name]
        for method, is_paper in columns:
            if is_paper:
                value = paper[name][PAPER_COLUMN[method]]
            else:
                finals = [100 * m["final"]["acc1"] for m in per_method.get(method, [])]
                value = statistics.mean(finals) if finals else None
            if value is not None:
                sums[(method, is_paper)].append(value)
            row.append(fmt(value))
        seconds = sum(m.get("wall_seconds", 0.0) for ms in per_method.values() for m in ms)
        row += [str(len(args.seeds)), f"{seconds / 60:.1f}"]
        rows.append(row)
        for method, metrics in per_method.items():
            for seed, m in zip(args.seeds if method != "zero-shot" else [0], metrics):
                paper_value = paper[name][PAPER_COLUMN[method]] if method in PAPER_COLUMN else None
                csv_rows.append([name, method, seed, f"{100 * m['final']['acc1']:.2f}",
                                 "" if paper_value is None else f"{paper_value:.2f}", f"{m.get('wall_seconds', 0):.0f}"])
    average = ["average"] + [fmt(statistics.mean(v)) if len(v) == len(results) and v else "-" for v in sums.values()]
    rows.append(average + ["", ""])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "paper_tables.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "method", "seed", "top1", "paper_top1", "seconds"])
        writer.writerows(csv_rows)
    model = "phase I ViT-L-14 (openai), phase II ViT-B-16 (openai)" if args.distill else f"{args.model} ({args.pretrained})"
    lines = [f"# The paper's {table} beside coft_fast", "",
             f"`python bench/paper_tables.py` on {model}; top-1 % on each dataset's test split, the train split as "
             f"the unlabelled pool; ours: mean over seeds {', '.join(map(str, args.seeds))} (zero-shot needs none). "
             f"Overrides: {args.overrides or 'none'}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    (out / "paper_tables.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="the folder holding CoOp's dataset folders")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name or local-dir:PATH")
    parser.add_argument("--pretrained", default="openai")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS), metavar="NAME")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--templates-dir", help="per-dataset LLM template files for coft+: DIR/<Dataset>.json")
    parser.add_argument("--distill", action="store_true", help="Table 3: the paper-distill recipe")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "paper_tables"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.distill and "self-train" in args.methods:
        args.methods = [m for m in args.methods if m != "self-train"]
    root, out = Path(args.data_root), Path(args.out)
    results: Dict[str, Dict[str, List[dict]]] = {}
    for name in args.datasets:
        sources = dataset_sources(name, root, out / "runs" / name)
        results[name] = {}
        for method in args.methods:
            seeds = [0] if method == "zero-shot" else args.seeds
            results[name][method] = [run_cell(name, method, seed, sources, args, out) for seed in seeds]
            print(f"{name} {method}: " + ", ".join(f"{100 * m['final']['acc1']:.2f}" for m in results[name][method]),
                  flush=True)
        write_tables(results, args, out)  # after every dataset, so a stopped run leaves a table
    print((out / "paper_tables.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
