"""Wall time of `clean-labels` with the probe detector (the default) against the S* prompt detector (the old default).

    python bench/clean_labels_cost.py --testbed DIR [--noise sym40] [--seed 0] [--threads N]

One invocation runs both detectors, one after the other in fresh run folders, on the same noisy
pool (bench/e2e_noisy_labels.py's noise), and prints each whole run's wall time, its phase timings
and the ratio (new / old). Writes bench/results/clean_labels_cost.md. Both runs share the machine's
state, so the ratio is the figure to read; run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import coft_fast
from coft_fast.runtime.io import atomic_write_text

from common import RESULTS, data_root, machine, testbed_settings
from e2e_noisy_labels import NOISES, Pool

# name: overrides; the first is the old default (the ratio's denominator)
DETECTORS = {"S* prompts (the old default)": ["filter.detector=prompts"],
             "probe (the default)": ["filter.detector=probe"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", required=True)
    parser.add_argument("--noise", default="sym40", choices=list(NOISES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = data_root() / "cifar10"
    testbed = Path(args.testbed)
    pool = Pool(testbed, root)
    work = Path(tempfile.mkdtemp(prefix="clean_labels_cost_"))
    labelled = pool.write_csv(work / "given.csv", pool.given(args.noise, args.seed))
    classes = work / "classes.txt"
    classes.write_text("\n".join(pool.names) + "\n")
    seconds, timings = {}, {}
    for index, (name, overrides) in enumerate(DETECTORS.items()):
        started = time.perf_counter()
        result = coft_fast.clean_labels(labelled, classes, model=f"local-dir:{testbed}", eval_images=root / "test",
                                        out=work / f"detector{index}", overrides=["run.progress=false",
                                                                                  f"seed={args.seed}", *overrides])
        seconds[name] = time.perf_counter() - started
        timings[name] = ", ".join(f"{k} {v:.0f}" for k, v in result.metrics["timings"].items())
        print(f"{name}: {seconds[name]:.0f} s ({timings[name]})", flush=True)
    old, new = (seconds[name] for name in DETECTORS)
    lines = [f"# clean-labels wall time: probe detector against S* prompts ({machine()})", "",
             f"`python bench/clean_labels_cost.py --testbed DIR --noise {args.noise} --seed {args.seed}`"
             f"{f' --threads {args.threads}' if args.threads else ''}: both runs in one invocation, one after the "
             f"other, on the 10,000-image cifar10/pool with {args.noise} noise. Test bed: {testbed_settings(testbed)}.", "",
             "| detector | whole run (s) | phases (s) |", "|---|---|---|"]
    lines += [f"| {name} | {seconds[name]:.0f} | {timings[name]} |" for name in DETECTORS]
    lines += ["", f"Ratio (probe / S* prompts): {new / old:.2f}x (target: at most 2x).", ""]
    atomic_write_text(RESULTS / "clean_labels_cost.md", "\n".join(lines))
    print(lines[-2])


if __name__ == "__main__":
    main()
