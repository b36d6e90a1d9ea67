"""Builds the CIFAR-10 test bed and measures it: zero-shot top-1 against a linear-probe ceiling.

    python bench/bench_testbed.py [--seed 0] [--out DIR] [--set testbed.image_epochs=10 ...]

Test bed from cifar10/pretrain; zero-shot on cifar10/test (CLIP's template ensemble); linear probe
(Adam, 500 full-batch steps) on the frozen features of cifar10/pool with its TRUE labels, scored on
cifar10/test. Writes bench/results/testbed_cifar10_seed<S>.json and prints the figures.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import coft_fast
from coft_fast.runtime.io import atomic_write_json

from common import RESULTS, data_root, linear_probe_ceiling, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="test-bed folder (default: a temporary one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    root = data_root() / "cifar10"
    out = Path(args.out or tempfile.mkdtemp(prefix="coft_testbed_"))

    started = time.perf_counter()
    report = coft_fast.testbed(root / "pretrain", out, seed=args.seed, overrides=args.overrides)
    build_seconds = time.perf_counter() - started

    zs = coft_fast.zeroshot(root / "test", model=f"local-dir:{out}", templates="ensemble", out=out / "zeroshot_test",
                            overrides=["data.num_workers=0", "run.progress=false"])
    probe = linear_probe_ceiling(out, root, seed=args.seed)

    result = {
        "seed": args.seed,
        "machine": machine(),
        "zero_shot_acc1": zs.metrics["acc1"],
        "zero_shot_mean_per_class_recall": zs.metrics["mean_per_class_recall"],
        "linear_probe_acc1": probe,
        "gap_points": 100 * (probe - zs.metrics["acc1"]),
        "build_seconds": build_seconds,
        "stage1_seconds": report["stage1_seconds"],
        "stage2_seconds": report["stage2_seconds"],
        "stage1_train_accuracy": report["stage1_train_accuracy"],
        "lookalike": report["lookalike"],
        "captions_per_class": report["captions_per_class"],
        "overrides": args.overrides,
        "testbed_dir": str(out),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"testbed_cifar10_seed{args.seed}.json", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("lookalike", "captions_per_class")}, indent=2))
    print(f"zero_shot={100 * zs.metrics['acc1']:.2f} linear_probe={100 * probe:.2f} "
          f"gap={result['gap_points']:.2f} build_s={build_seconds:.0f}")


if __name__ == "__main__":
    main()
