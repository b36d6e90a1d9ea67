"""`predict --transductive` against plain `predict` on finished runs: the run's classifier alone, then
TransCLIP over the whole evaluation set with that classifier as its prior.

    python bench/transductive_predict.py --run NAME=RUN_DIR[,EVAL_DIR] [...] [--threads N]

EVAL_DIR defaults to cifar10/test under $COFT_DATA. Per run: top-1 of plain predict and of predict
--transductive (coft_fast.predict on the same images, one process), their difference, and the
seconds of each (2 CPU cores shared with other benchmark processes: not a speed measure).
Resumable per run: bench/results/transductive_predict.csv and .md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import coft_fast

from common import RESULTS, CellTable, data_root, machine, markdown_table

STEM = "transductive_predict"
HEADER = ["run", "method", "pool labels", "images", "predict acc1", "predict --transductive acc1", "gain",
          "predict seconds", "transductive seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs="+", required=True, help="NAME=RUN_DIR[,EVAL_DIR]")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = CellTable(STEM, HEADER, ("run",))
    order = []
    for spec in args.run:
        name, _, rest = spec.partition("=")
        run_dir, _, evaluation = rest.rpartition(",")  # a run folder's name may hold commas
        if not run_dir or not Path(evaluation).is_dir():
            run_dir, evaluation = rest, ""
        evaluation = Path(evaluation) if evaluation else data_root() / "cifar10" / "test"
        cell = {"run": name}
        order.append(cell)
        if cell in table:
            continue
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
        started = time.perf_counter()
        plain = coft_fast.predict(run_dir, evaluation, progress=False)
        middle = time.perf_counter()
        refined = coft_fast.predict(run_dir, evaluation, progress=False, transductive=True)
        done = time.perf_counter()
        row = {"run": name, "method": metrics["method"],
               "pool labels": f"{metrics['pool'].get('refine', 'none')}",
               "images": plain["num_images"], "predict acc1": f"{100 * plain['acc1']:.2f}",
               "predict --transductive acc1": f"{100 * refined['acc1']:.2f}",
               "gain": f"{100 * (refined['acc1'] - plain['acc1']):+.2f}",
               "predict seconds": f"{middle - started:.1f}", "transductive seconds": f"{done - middle:.1f}"}
        print(row, flush=True)
        table.add(row, order)
    lines = [f"# predict --transductive against plain predict ({machine()})", "",
             "`python bench/transductive_predict.py --run NAME=RUN_DIR ...` (resumable per run). Top-1 in % on the "
             "evaluation images of each run (cifar10/test unless named); the transductive predictions are TransCLIP's "
             "over the whole set with the run's fine-tuned classifier as the prior and its tower's features. pool "
             "labels: the run's own pseudo.refine. Seconds on 2 CPU cores shared with other benchmark processes.", ""]
    lines += markdown_table(HEADER, table.ordered(order))
    (RESULTS / f"{STEM}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
