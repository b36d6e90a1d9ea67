"""Shared helpers of the benchmark scripts: where the shared data is, and writing results."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from coft_fast.runtime.device import cpu_name

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def data_root() -> Path:
    """``$COFT_DATA`` when set, else ``../shared/data`` beside the repository."""
    root = Path(os.environ.get("COFT_DATA", REPO.parent / "shared" / "data"))
    if not (root / "cifar10").is_dir():
        sys.exit(f"shared data not found at {root} (set COFT_DATA to the folder holding cifar10/)")
    return root


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def testbed_settings(testbed_dir) -> str:
    """"seed S, image_epochs E, ..." from a built test bed's report (the settings that shape its
    features and text bias), or "" when the folder has no report."""
    report_file = Path(testbed_dir) / "testbed_report.json"
    if not report_file.is_file():
        return ""
    built = json.loads(report_file.read_text())
    shown = ["image_epochs", "vision_layers", "vision_width", "longtail_ratio", "lookalike_share"]
    if built.get("config", {}).get("teacher_width"):
        shown += ["teacher_width", "teacher_epochs", "distill_weight"]
    settings = [f"{k} {v}" for k, v in built.get("config", {}).items() if k in shown]
    preset = [f"preset {built['preset']}"] if built.get("preset") else []
    return ", ".join(preset + [f"seed {built.get('seed')}"] + settings)


def frozen_features(model_dir, root: Path, paths: dict = None) -> dict:
    """{split: (normalised image features, true labels)} of cifar10/pool and cifar10/test; when a
    dict is given as ``paths``, it receives {split: the image path of each feature row}."""
    from coft_fast.data import from_folder
    from coft_fast.models import load_clip
    from coft_fast.scoring import encode_images

    clip = load_clip(f"local-dir:{model_dir}")
    features = {}
    for split in ("pool", "test"):
        source = from_folder(root / split)
        feats, positions = encode_images(clip, source, torch.device("cpu"), batch_size=512, progress=False)
        features[split] = (feats, torch.tensor(source.labels)[positions])
        if paths is not None:
            paths[split] = [source.paths[i] for i in positions.tolist()]
    return features


def linear_probe_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                          test_labels: torch.Tensor, steps: int = 500, lr: float = 1e-2, seed: int = 0) -> float:
    """Top-1 of :func:`fit_linear_probe` (seeded start) on the test features: an oracle ceiling for what
    the features support (it uses true labels and is never part of a method)."""
    from coft_fast.linear_probe import fit_linear_probe

    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predict = fit_linear_probe(train_features, train_labels, num_classes, steps, lr,
                               generator=torch.Generator().manual_seed(seed))
    return (predict(test_features).argmax(1) == test_labels).double().mean().item()


def linear_probe_ceiling(model_dir, root: Path, seed: int = 0) -> float:
    """Top-1 on cifar10/test of a linear probe on the frozen features of cifar10/pool with its TRUE
    labels: an oracle ceiling for the tables, never used by any method."""
    features = frozen_features(model_dir, root)
    return linear_probe_accuracy(*features["pool"], *features["test"], seed=seed)


def op_bench_parser(description: str, config_help: str, repeats: int) -> argparse.ArgumentParser:
    """The command line shared by the per-op benchmarks."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", action="append", help=f"{config_help} (repeatable)")
    parser.add_argument("--quick", action="store_true", help="one small configuration (a smoke run)")
    parser.add_argument("--repeats", type=int, default=repeats, help="CPU timing repeats (GPU uses do_bench)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); on a shared "
                        "machine 1 avoids stalls of multi-threaded kernels waiting on a busy core")
    parser.add_argument("--tag", default="", help="suffix of the results files (e.g. 2threads)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def start_op_bench(args, child_measure, child_setup) -> bool:
    """Apply --threads; in a --child process run its one measurement and return True."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child_measure(json.loads(args.child), child_setup)
        return True
    return False


def results_stem(op: str, device: torch.device, args) -> str:
    """The results file name of a per-op benchmark run: op, device, then --quick and --tag."""
    return f"{op}_{device.type}" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")


class CellTable:
    """A benchmark's finished cells, kept in ``bench/results/<stem>.csv`` as each cell finishes: a cell
    already in the file is never run again, so a committed table lets a later session continue it.
    ``key_fields`` name the columns that identify a cell. Several processes may fill one table (e.g.
    one per test bed): each write re-reads the file under a lock and keeps the rows others added."""

    def __init__(self, stem: str, header, key_fields):
        self.path = RESULTS / f"{stem}.csv"
        self.header, self.key_fields = list(header), tuple(key_fields)
        self.rows = {}
        self._read()

    def _read(self) -> None:
        """Add the file's rows that this table does not hold yet."""
        import csv

        if self.path.is_file():
            with open(self.path, newline="") as handle:
                for row in csv.DictReader(handle):
                    self.rows.setdefault(self.key(row), {h: row.get(h, "") for h in self.header})

    def key(self, row) -> tuple:
        return tuple(str(row[field]) for field in self.key_fields)

    def __contains__(self, row) -> bool:
        return self.key(row) in self.rows

    def add(self, row, order) -> None:
        """Record ``row`` and rewrite the CSV (with the rows other processes wrote meanwhile), its rows
        in the order of the cells in ``order``."""
        import fcntl

        from coft_fast.runtime.io import atomic_write_csv

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._read()
            self.rows[self.key(row)] = {h: row.get(h, "") for h in self.header}
            atomic_write_csv(self.path, self.header, ([r[h] for h in self.header] for r in self.ordered(order)))

    def ordered(self, order) -> list:
        keys = [self.key(cell) for cell in order]
        return [self.rows[k] for k in keys if k in self.rows] + [r for k, r in self.rows.items() if k not in keys]


SECONDS_NOTE = ("seconds: wall time of the invocation that finished the cell (a cell resumed after a kill counts only "
                "its remainder), on whatever else the machine ran, so not a speed measure.")


def markdown_table(header, rows) -> list:
    """Markdown lines of a table; empty cells as '-'."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[h]) if row[h] != "" else "-" for h in header) + " |" for row in rows]
    return lines


def cell_bench_args(description: str, cell_format: str, stem: str):
    """The command line of a resumable end-to-end benchmark on the CIFAR-10 test bed, parsed and
    applied: (args, cifar10 root, work folder, built test-bed folder); ``args.stem`` is ``stem`` with
    the ``--tag`` (the results files' name)."""
    import coft_fast.testbed_commands

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--testbed", help="a built test-bed folder (default: build one under --work)")
    parser.add_argument("--work", help="folder for the run folders")
    parser.add_argument("--cells", nargs="+", help=f"only these cells, as {cell_format}")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 shares a busy machine best)")
    parser.add_argument("--stop-after", type=float, help="start no new cell after this many seconds")
    parser.add_argument("--tag", default="", help="a test bed's name (e.g. strong): results go to "
                        f"bench/results/{stem}_TAG.* and run folders under bench/results/tmp/{stem}_TAG")
    args = parser.parse_args()
    args.stem = f"{stem}_{args.tag}" if args.tag else stem
    if args.work is None:
        args.work = str(RESULTS / "tmp" / args.stem)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = data_root() / "cifar10"
    work = Path(args.work)
    testbed = Path(args.testbed) if args.testbed else work / "testbed"
    if not (testbed / "open_clip_config.json").is_file():
        coft_fast.testbed_commands.testbed(root / "pretrain", testbed, seed=0, overrides=["run.progress=false"])
    return args, root, work, testbed


def run_cells(args, order, name_of, is_done, run, record) -> None:
    """Run each cell of ``order`` that ``is_done`` does not know (and ``args.cells`` names, when given),
    ``record``-ing its row as soon as it finishes; start none after ``args.stop_after`` seconds."""
    import time

    started = time.monotonic()
    for cell in order:
        name = name_of(cell)
        if is_done(cell) or (args.cells and name not in args.cells):
            continue
        if args.stop_after and time.monotonic() - started > args.stop_after:
            print(f"stopping before {name}: --stop-after {args.stop_after:.0f} s reached", flush=True)
            break
        row = run(cell)
        record(row)
        print(f"{name}: {row}", flush=True)


def run_label_aucs(run_dir) -> tuple:
    """(filter AUC, zero-shot AUC, own AUC) of a finished CoFT run on a pool with class folders: the
    ROC AUC of model 2's clean probability of model 1's labels for correct against wrong model-1
    labels, of zero-shot confidence for correct against wrong zero-shot labels, and of model 1's own
    softmax confidence for its labels (the ranking the negative prompts have to beat; None where the
    filter did not record it). The pool's folders are the truth, used only here. All None where the
    run has no filter stage or no pool labels."""
    import csv

    from sklearn.metrics import roc_auc_score

    from coft_fast.runtime.checkpoint import load_state

    run_dir = Path(run_dir)
    with open(run_dir / "pseudo_labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    checkpoint = load_state(run_dir / "checkpoints" / "filter.pt")
    if checkpoint is None or not rows or not rows[0].get("pool_label") or not rows[0].get("model1_label"):
        return None, None, None
    truth = [r["pool_label"] for r in rows]
    result, positions = checkpoint["result"], checkpoint["positions"]

    def auc(correct, score):
        return float(roc_auc_score(correct, score)) if 0 < sum(correct) < len(correct) else None

    def model1_label_auc(score):  # over the filtered rows, whose positions index the CSV's rows
        per_row = torch.full((len(rows),), float("nan"), dtype=torch.float64)
        per_row[positions] = score.double()
        scored = [i for i in range(len(rows)) if per_row[i].isfinite()]
        return auc([int(rows[i]["model1_label"] == truth[i]) for i in scored], [float(per_row[i]) for i in scored])

    filter_auc = model1_label_auc(result["p_clean1"])
    zero_shot_auc = auc([int(r["zero_shot_label"] == t) for r, t in zip(rows, truth)],
                        [float(r["zero_shot_confidence"]) for r in rows])
    own_auc = model1_label_auc(result["confidence1"]) if result.get("confidence1") is not None else None
    return filter_auc, zero_shot_auc, own_auc
