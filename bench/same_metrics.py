"""Behaviour check for refactors: one seed-0 cell per method (CoFT, CoFT+, self-train, clean-labels,
shots) on the digits test bed, run by the library on the import path; `--compare A B` then says
whether two such folders hold the same metrics (to --tolerance; timings and seconds are skipped).

    PYTHONPATH=<old checkout> python bench/same_metrics.py --demo DEMO --out /tmp/before
    python bench/same_metrics.py --demo DEMO --out /tmp/after
    python bench/same_metrics.py --compare /tmp/before /tmp/after

DEMO is a `coft-fast demo --out DEMO` folder (its digits images and test bed)."""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
from pathlib import Path

TINY = ["phase1.steps=60", "phase1.min_epochs=1", "phase2.epochs=2", "data.num_workers=0", "run.progress=false",
        "pseudo.top_k=16"]
CELLS = {
    "coft": dict(recipe="testbed", overrides=TINY),
    "coft+": dict(recipe="testbed", method="coft+", overrides=TINY + ["phase1.rounds=2"]),
    "self-train": dict(recipe="testbed", method="self-train", overrides=TINY),
    "clean-labels": dict(recipe=None, overrides=TINY, given=True),
    "shots": dict(recipe="testbed", overrides=TINY, shots=2),
}
SKIPPED = ("seconds", "timings", "world_size")


def noisy_labels(pool: Path, out: Path, share: float = 0.3) -> Path:
    """A CSV of the pool's images with ``share`` of the labels moved to another class (seeded)."""
    rng = random.Random(0)
    classes = sorted(p.name for p in pool.iterdir() if p.is_dir())
    rows = []
    for name in classes:
        for image in sorted((pool / name).iterdir()):
            label = rng.choice([c for c in classes if c != name]) if rng.random() < share else name
            rows.append((str(image), label))
    with open(out, "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])
    return out


def shot_csv(pool: Path, out: Path, per_class: int) -> Path:
    rows = [(str(image), d.name) for d in sorted(pool.iterdir()) if d.is_dir()
            for image in sorted(d.iterdir())[:per_class]]
    with open(out, "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])
    return out


def run_cells(demo: Path, out: Path, names) -> None:
    import torch

    import coft_fast
    from coft_fast.data.demo import digit_class_names

    torch.set_num_threads(1)
    data, model = demo / "data", f"local-dir:{demo / 'testbed'}"
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        cell = CELLS[name]
        target = out / name
        if (target / "metrics.json").is_file():
            continue
        kwargs = dict(classes=digit_class_names(), model=model, eval_images=data / "test", out=target, recipe=cell.get("recipe"),
                      overrides=cell["overrides"])
        images = data / "pool"
        if cell.get("given"):
            images = noisy_labels(images, out / "noisy_pool.csv")
            coft_fast.clean_labels(images, **kwargs)
            continue
        if cell.get("shots"):
            kwargs["labeled"] = shot_csv(images, out / "shots.csv", cell["shots"])
        coft_fast.train(images, method=cell.get("method"), **kwargs)
        print(f"{name}: done", flush=True)


def flatten(value, prefix=""):
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in SKIPPED:
                yield from flatten(item, f"{prefix}{key}.")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from flatten(item, f"{prefix}{index}.")
    else:
        yield prefix.rstrip("."), value


def compare(a: Path, b: Path, tolerance: float) -> int:
    differences = 0
    for name in CELLS:
        left = dict(flatten(json.loads((a / name / "metrics.json").read_text())))
        right = dict(flatten(json.loads((b / name / "metrics.json").read_text())))
        for key in sorted(set(left) | set(right)):
            x, y = left.get(key, "<missing>"), right.get(key, "<missing>")
            same = (math.isclose(x, y, abs_tol=tolerance) if isinstance(x, (int, float)) and isinstance(y, (int, float))
                    and not isinstance(x, bool) else x == y)
            if not same:
                differences += 1
                print(f"{name}: {key}: {x!r} -> {y!r}")
        print(f"{name}: {len(left)} figures compared")
    print("same metrics" if not differences else f"{differences} differences")
    return 1 if differences else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="a coft-fast demo folder")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--compare", nargs=2, type=Path)
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare, args.tolerance))
    run_cells(args.demo, args.out, args.cells)


if __name__ == "__main__":
    main()
