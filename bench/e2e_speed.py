"""The whole CoFT pipeline twice on the same data and model, in one process: the research code's naive
configuration and coft_fast's fast one. Prints per-phase times, phase II images per second, both
accuracies and the end-to-end ratio; writes bench/results/e2e_speed_<device>[_quick].csv and .md.

    python bench/e2e_speed.py --quick                       # CPU: test bed, 2,000 pool images
    python bench/e2e_speed.py --images DIR --eval-images DIR --model local-dir:TESTBED
    python bench/e2e_speed.py --model ViT-B-16 --pretrained none --subset 3000 --quick   # GPU speed study

Naive = PIL DataLoader decoding every epoch, eager fp32, positive and negative prompts in two
full-length text-encoder calls, no reuse of decoded images or zero-shot prompts, unfused losses,
no torch.compile. Fast = the defaults (decoded images resident, on the GPU when there is one; one
cut text call; fused ops on CUDA; bf16 and torch.compile on CUDA). The last three lines are
acc_naive=, acc_fast= and speedup= (plain decimals).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

import coft_fast
from coft_fast.data import load_source
from coft_fast.runtime.io import atomic_write_csv, atomic_write_text

from common import RESULTS, data_root, machine

NAIVE = ["data.resident=never", "data.decoder=pil", "model.precision=fp32", "run.compile=false",
         "phase1.text_encoding=separate", "run.reuse=false", "run.op_backend=eager"]
FAST: list = []  # the defaults
QUICK = ["phase1.steps=150", "phase1.min_epochs=1", "phase2.epochs=2"]
PHASES = ["zero_shot", "phase1", "filter", "phase2", "evaluation"]


def subset_csv(images: str, classes, count: int, seed: int, out: Path) -> Path:
    """A class-stratified random subset of ``images`` as a CSV (absolute paths, labels when known)."""
    source = load_source(images, classes)
    rng = random.Random(seed)
    by_class = {}
    for index, label in enumerate(source.labels):
        by_class.setdefault(label, []).append(index)
    chosen = []
    for indices in by_class.values():
        rng.shuffle(indices)
        chosen += indices[: max(1, round(count * len(indices) / len(source)))]
    chosen = sorted(chosen)[:count]
    rows = [(str(Path(source.paths[i]).resolve()), source.class_names[source.labels[i]] if source.labels[i] >= 0 else "")
            for i in chosen]
    atomic_write_csv(out, ["path", "label"], rows)
    names = out.with_suffix(".classes.txt")
    atomic_write_text(names, "\n".join(source.class_names) + "\n")
    return out


def read_all(csv_path: Path) -> None:
    """Read every image once so that both configurations start with the files in the page cache."""
    import csv

    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            with open(row["path"], "rb") as image:
                image.read()


class GpuUtilisation:
    """Mean GPU utilisation (%) sampled every 0.2 s while running (None without CUDA or NVML)."""

    def __init__(self):
        self.samples, self._stop = [], threading.Event()

    def __enter__(self):
        if torch.cuda.is_available():
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            try:
                self.samples.append(torch.cuda.utilization())
            except Exception:  # no NVML: leave it unmeasured
                return
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def mean(self):
        return statistics.mean(self.samples) if self.samples else None


def run(name: str, overrides, args, pool: Path, eval_csv: Path, classes: Path, work: Path) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    with GpuUtilisation() as gpu:
        result = coft_fast.train(pool, classes, model=args.model, pretrained=args.pretrained, eval_images=eval_csv,
                                 out=out, overrides=["run.progress=false", f"seed={args.seed}", *args.overrides,
                                                     *overrides])
    seconds = time.perf_counter() - started
    metrics = result.metrics
    seen = sum(entry["steps"] for entry in metrics.get("phase2", {}).values()) * result.config.phase2.batch_size
    row = {
        "config": name, "seconds": seconds, "acc1": metrics["final"]["acc1"],
        "zero_shot_acc1": metrics["zero_shot"]["acc1"],
        **{f"{phase}_s": metrics["timings"].get(phase, 0.0) for phase in PHASES},
        "phase2_images_per_s": seen / max(metrics["timings"].get("phase2", 0.0), 1e-9),
        "gpu_utilisation": gpu.mean,
    }
    print(f"{name}: {seconds:.1f} s end to end, final acc1 {100 * row['acc1']:.2f} % "
          f"(zero-shot {100 * row['zero_shot_acc1']:.2f} %); "
          + ", ".join(f"{phase} {row[phase + '_s']:.1f} s" for phase in PHASES), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", help="unlabelled pool (default: the shared cifar10/pool)")
    parser.add_argument("--eval-images", help="labelled evaluation images (default: the shared cifar10/test)")
    parser.add_argument("--classes", help="class names file (optional for class folders)")
    parser.add_argument("--model", help="open_clip name (random weights with --pretrained none) or local-dir:DIR "
                        "(default: a test bed under --work, built from cifar10/pretrain)")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--quick", action="store_true", help=f"a subset and a short schedule: {' '.join(QUICK)}")
    parser.add_argument("--subset", type=int, help="pool images used (default: all; --quick: 2000)")
    parser.add_argument("--eval-subset", type=int, help="evaluation images used (default: all; --quick: 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the results files (e.g. bf16 for a --fast-set variant)")
    parser.add_argument("--work", default=str(RESULTS / "tmp" / "e2e_speed"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="applied to both runs")
    parser.add_argument("--fast-set", dest="fast_overrides", action="append", default=[],
                        help="applied to the fast run only (e.g. model.precision=bf16 on a CPU with AMX)")
    args = parser.parse_args()
    if args.quick:
        args.overrides = QUICK + args.overrides
        args.subset = args.subset or 2000
        args.eval_subset = args.eval_subset or 2000
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    root = data_root() / "cifar10" if not (args.images and args.eval_images) else None
    images = args.images or str(root / "pool")
    eval_images = args.eval_images or str(root / "test")
    if args.model is None:
        testbed = work / "testbed"
        if not (testbed / "open_clip_config.json").is_file():
            coft_fast.testbed(root / "pretrain", testbed, seed=0, overrides=["run.progress=false"])
        args.model = f"local-dir:{testbed}"
    pool = subset_csv(images, args.classes, args.subset or 10**12, args.seed, work / "pool.csv")
    eval_csv = subset_csv(eval_images, args.classes, args.eval_subset or 10**12, args.seed + 1, work / "eval.csv")
    classes = pool.with_suffix(".classes.txt")
    read_all(pool)
    read_all(eval_csv)

    # warm-up outside the timed runs: imports, the first DataLoader, kernel selection and, where
    # torch.compile is on, compilation (whole phase II batches and padded inference batches have the
    # shapes of the timed runs)
    warm = subset_csv(images, args.classes, 300, args.seed, work / "warm.csv")
    fast_overrides = FAST + args.fast_overrides
    for overrides in (NAIVE, fast_overrides):
        coft_fast.train(warm, classes, model=args.model, pretrained=args.pretrained, out=work / "warm",
                        overrides=["run.progress=false", *args.overrides, "phase1.steps=3", "phase1.min_epochs=1",
                                   "phase2.epochs=1", *overrides])
        shutil.rmtree(work / "warm", ignore_errors=True)

    rows = [run("naive", NAIVE, args, pool, eval_csv, classes, work), run("fast", fast_overrides, args, pool, eval_csv, classes, work)]
    naive, fast = rows
    speedup = naive["seconds"] / fast["seconds"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stem = f"e2e_speed_{device}" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    header = list(rows[0])
    atomic_write_csv(RESULTS / f"{stem}.csv", header, [[row[k] for k in header] for row in rows])

    def cell(value, key):
        if value is None:
            return "-"
        if key in ("acc1", "zero_shot_acc1"):
            return f"{100 * value:.2f}"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    lines = [f"# End-to-end speed, naive versus fast ({machine()})", "",
             f"`python bench/e2e_speed.py {' '.join(sys.argv[1:])}`: model {args.model}, "
             f"pool {args.subset or 'all'} images of {images}, eval {args.eval_subset or 'all'} of {eval_images}; "
             f"overrides for both: {args.overrides or 'none'}; threads {torch.get_num_threads()}, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.", "",
             f"Naive: `{' '.join(NAIVE)}`. Fast: the defaults{' and `' + ' '.join(fast_overrides) + '`' if fast_overrides else ''}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[k], k) for k in header) + " |" for row in rows]
    difference = 100 * (fast["acc1"] - naive["acc1"])
    lines += ["", f"Speed-up end to end: {speedup:.2f}x; accuracy difference (fast - naive): {difference:+.2f} points "
                  f"({'within' if abs(difference) <= 1.0 else 'NOT within'} 1 point)."]
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"acc_naive={naive['acc1']:.4f}")
    print(f"acc_fast={fast['acc1']:.4f}")
    print(f"speedup={speedup:.3f}")


if __name__ == "__main__":
    main()
