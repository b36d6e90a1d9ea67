"""How CLIP-like a test bed is: zero-shot, CoOp, linear probes and k-means on its frozen features (issue 36).

    python bench/testbed_fidelity.py --testbed MODEL_DIR --tag NAME [--pool DIR --eval DIR]
                                     [--cells METHOD:SHOTS:SEED ...] [--shots 1 2 ...] [--threads N]
                                     [--stop-after SECONDS] [--results DIR] [--steps N] [--probe-steps N]

For one built test bed (a `local-dir:` model folder; --pool and --eval default to cifar10/pool and
cifar10/test under $COFT_DATA, e.g. `--pool D/data/pool --eval D/data/test` for the test bed of
`coft-fast demo --out D`), top-1 on the evaluation split of:

- `zero-shot`: the paper's single template ("a photo of a {}.", the default run's);
- `coop`: the library's positive-prompt learner without visual prompts (phase I with phase1.lam=0,
  so the loss is L1 alone, CoOp's cross-entropy over the positive prompts, and phase1.vpt_tokens=0;
  every other phase1.* at its default: 16 context tokens, 1000 SGD steps at lr 0.03, batch 64, the
  DeFT augmentation), trained on k TRUE-labelled shots per class drawn from the pool's class folders
  (bench/e2e_shots.py's seeded, nested draw); its positive prompts are the classifier;
- `probe`: a linear head from scratch on the shots' frozen image features
  (coft_fast.linear_probe.train_linear_head: full-batch Adam, 500 steps, lr 1e-2, N(0, 0.01^2) init
  seeded by the cell's seed);
- `zs-init probe`: the same head and training, its weight starting at the class text embeddings
  times the logit scale (bias 0), i.e. at zero-shot's classifier;
- `coop s*`, `probe s*`: the same two learners on S*, the class-balanced top-16 (pseudo.top_k) of
  the pool's zero-shot labels, with those pseudo-labels;
- `phase1 s*`: phase I at the paper's defaults (lam=1, vpt_tokens=20) on S*: CoFT's model 1, its
  positive prompts over its visual-prompted image features as the classifier;
- `phase1 no-vpt s*`: the same without visual prompts (phase1.vpt_tokens=0): what the visual prompts
  cost or give, the issue's "phase I with and without visual prompts";
- `kmeans`: sklearn KMeans (C clusters, n_init=10, seeded) of the pool's frozen features, the
  clusters matched one-to-one to the classes by the Hungarian method (scipy's
  linear_sum_assignment); its accuracy is on the POOL (acc1 and pool_acc1 alike).

k in 1, 2, 4, 8, 16 (--shots), seeds 0-2 up to 4 shots and seed 0 above; the shot-free methods run
seed 0 (shots 0). Every cell also records pool_acc1, the method's labelling accuracy over the whole
pool (which holds its training images: the shots or S*), for the issue's comparison of CoOp on S*
and a linear head on S* as pool labellers. The pool's folders are the truth, used only for the
shots and for scoring.

Resumable per cell (testbed, method, shots, seed): each finished cell goes to
bench/results/testbed_fidelity.csv at once (re-read and merged under a lock, so several test beds
may fill it at the same time, one process each), and a cell already there is never run again;
bench/results/testbed_fidelity.md (per test bed: method x shots, means over seeds, the issue's
targets) and .png (accuracy against shots, a panel per test bed) are rewritten from the CSV. The
frozen features of pool and evaluation split are encoded once per invocation, and only when a cell
needs them.

--steps N (phase I steps, with phase1.min_epochs=1) and --probe-steps N cut training for smoke
runs and tests; the script refuses to write such rows into bench/results (give --results DIR).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from functools import cached_property
from pathlib import Path

import torch

import common
from common import CellTable, data_root, machine, markdown_table, run_cells

STEM = "testbed_fidelity"
HEADER = ["testbed", "method", "shots", "seed", "acc1", "pool_acc1"]
METHODS = ("zero-shot", "coop", "probe", "zs-init probe", "coop s*", "probe s*", "phase1 s*", "phase1 no-vpt s*",
           "kmeans")
SHOT_METHODS = ("coop", "probe", "zs-init probe")
SHOTS = (1, 2, 4, 8, 16)
PROBE_STEPS, PROBE_LR = 500, 1e-2  # train_linear_head's defaults
KMEANS_INIT = 10


def seeds_for(shots: int) -> tuple:
    """3 seeds up to 4 shots per class, 1 above (and for the shot-free methods)."""
    return (0, 1, 2) if 0 < shots <= 4 else (0,)


def cells(testbed: str, shots=SHOTS) -> list:
    """The order the cells run in: the cheap ones (zero-shot, k-means, the probes), the S* learners,
    then CoOp on true shots, 16 and 1 shots first (the targets' end points)."""
    order = [("zero-shot", 0, 0), ("kmeans", 0, 0)]
    order += [(m, k, s) for m in ("probe", "zs-init probe") for k in shots for s in seeds_for(k)]
    order += [("probe s*", 0, 0), ("coop s*", 0, 0), ("phase1 s*", 0, 0), ("phase1 no-vpt s*", 0, 0)]
    coop = [("coop", k, s) for k in shots for s in seeds_for(k)]
    first = [c for c in (("coop", 16, 0), ("coop", 1, 0)) if c in coop]
    order += first + [c for c in coop if c not in first]
    return [{"testbed": testbed, "method": m, "shots": k, "seed": s} for m, k, s in order]


def cell_name(cell: dict) -> str:
    return f"{cell['method']}:{cell['shots']}:{cell['seed']}"


def pct(fraction) -> str:
    return "" if fraction is None else f"{100 * fraction:.2f}"


def hungarian_accuracy(clusters, labels, num_classes: int) -> float:
    """The share of rows whose cluster, matched one-to-one to a class so as to maximise the matches
    (Hungarian method), is their class. Clusters and classes both number ``num_classes``."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    clusters, labels = np.asarray(clusters), np.asarray(labels)
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)  # (cluster, class)
    np.add.at(counts, (clusters, labels), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum()) / len(labels)


def kmeans_accuracy(features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int) -> float:
    from sklearn.cluster import KMeans

    found = KMeans(n_clusters=num_classes, n_init=KMEANS_INIT, random_state=seed).fit_predict(features.double().numpy())
    return hungarian_accuracy(found, labels.numpy(), num_classes)


def train_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int, steps: int,
               init: torch.Tensor = None):
    """(weight, bias) of a linear head on frozen features: train_linear_head (seeded N(0, 0.01^2)
    init) or, with ``init``, the same full-batch Adam loop started at weight ``init``, bias 0."""
    from coft_fast.linear_probe import train_linear_head

    generator = torch.Generator().manual_seed(seed) if init is None else None
    return train_linear_head(features, labels, num_classes, steps, PROBE_LR, generator, init)


class Bed:
    """One test bed's model, images and (computed once, on first use) frozen features, zero-shot
    labels and S*."""

    def __init__(self, model_dir: Path, pool_dir: Path, eval_dir: Path, top_k: int = 16):
        from coft_fast.data import from_folder

        self.model_dir, self.pool_dir, self.top_k = Path(model_dir), Path(pool_dir), top_k
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pool_source = from_folder(pool_dir)
        self.names = self.pool_source.class_names
        self.eval_source = from_folder(eval_dir, class_names=self.names)

    @cached_property
    def clip(self):
        from coft_fast.models import load_clip

        return load_clip(f"local-dir:{self.model_dir}", device=self.device)

    def _encode(self, source):
        from coft_fast.scoring import encode_images

        features, positions = encode_images(self.clip, source, self.device, batch_size=512, progress=False)
        return features, torch.tensor(source.labels)[positions], positions

    @cached_property
    def pool(self):
        """(normalised frozen features, true labels, source positions) of the pool's decodable images."""
        return self._encode(self.pool_source)

    @cached_property
    def eval(self):
        return self._encode(self.eval_source)

    @cached_property
    def text(self) -> torch.Tensor:
        from coft_fast.pseudo import class_prompts
        from coft_fast.scoring import class_text_embeddings

        return class_text_embeddings(self.clip, class_prompts("single", self.names), self.names, self.device).cpu()

    @cached_property
    def logit_scale(self) -> float:
        from coft_fast.scoring import logit_scale_of

        return logit_scale_of(self.clip)

    @cached_property
    def s_star(self):
        """(pool feature rows, zero-shot pseudo-labels) of S*: select_top_k of the zero-shot labels."""
        from coft_fast.pseudo.selection import select_top_k
        from coft_fast.scoring import zeroshot_probabilities

        confidence, labels = zeroshot_probabilities(self.pool[0], self.text, self.logit_scale).max(1)
        chosen = select_top_k(labels, confidence, self.top_k, self.names)
        return chosen.rows, chosen.labels

    def shot_rows(self, shots: int, seed: int):
        """(pool feature rows, true labels) of e2e_shots' seeded draw of ``shots`` images per class."""
        from e2e_shots import draw_shots

        row_of = {str(Path(self.pool_source.paths[p]).resolve()): r for r, p in enumerate(self.pool[2].tolist())}
        drawn = draw_shots(self.pool_dir, shots, seed)
        missing = [p for p, _ in drawn if str(Path(p).resolve()) not in row_of]
        if missing:
            raise RuntimeError(f"{len(missing)} drawn shots are not decodable pool images, e.g. {missing[0]}")
        rows = torch.tensor([row_of[str(Path(p).resolve())] for p, _ in drawn], dtype=torch.long)
        return rows, self.pool[1][rows]

    def head_accuracies(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple:
        """(eval, pool) top-1 of logits = features @ weight.T + bias (the features are normalised)."""
        return tuple((((x @ weight.T + bias).argmax(1)) == y).double().mean().item()
                     for x, y, _ in (self.eval, self.pool))

    def prompt_model(self, rows: torch.Tensor, labels: torch.Tensor, cfg, seed: int):
        """A phase-I model (config ``cfg``) trained on the pool feature ``rows`` labelled ``labels``,
        seeded as a CoFT run of seed ``seed`` seeds its model 1."""
        from coft_fast.data.resident import ResidentImages, preprocess_stats
        from coft_fast.phases.phase1 import make_prompt_model, train_phase1
        from coft_fast.pseudo import prompt_names
        from coft_fast.runtime.device import seed_everything

        seed_everything(seed)
        positions = self.pool[2][rows]
        resident = "cuda" if self.device.type == "cuda" else "cpu"
        images = ResidentImages(self.pool_source, positions.tolist(), *preprocess_stats(self.clip.model), progress=False,
                                device=torch.device(resident))
        if not torch.equal(images.positions, positions):
            raise RuntimeError("a pool image that decoded for its features failed to decode again")
        model_seed = seed * 1000 + cfg.seeds[0]
        model = make_prompt_model(self.clip, prompt_names(self.names), cfg, model_seed, self.device)
        train_phase1(model, images, torch.arange(len(positions)), labels, cfg, model_seed, self.device, progress=False)
        return model

    def prompt_accuracies(self, model) -> tuple:
        """(eval, pool) top-1 of a phase-I model's positive prompts: over the cached frozen features
        when it has no visual prompts (its image features are then the frozen ones), else over its
        own visual-prompted features."""
        from coft_fast.phases.phase1 import encode_with_models

        with torch.no_grad():
            positive, _ = model.text_features()
        positive = positive.cpu()
        found = []
        for source, (x, y, positions) in ((self.eval_source, self.eval), (self.pool_source, self.pool)):
            if model.visual_prompts.num_tokens:
                (x,), encoded = encode_with_models([model], source, positions.tolist(), self.device, progress=False)
                if not torch.equal(encoded, positions):
                    raise RuntimeError(f"{source.origin}: the images that decoded differ between two passes")
            found.append(((x @ positive.T).argmax(1) == y).double().mean().item())
        return tuple(found)


def phase1_configs(steps: int = None) -> dict:
    """{"coop": lam 0, no visual prompts; "phase1": the paper's defaults; "phase1 no-vpt": those without
    visual prompts}, with --steps applied."""
    from coft_fast.config import Config

    base = Config().phase1
    if steps is not None:
        base = dataclasses.replace(base, steps=steps, min_epochs=1, warmup_steps=min(base.warmup_steps, steps))
    return {"coop": dataclasses.replace(base, lam=0.0, vpt_tokens=0), "phase1": base,
            "phase1 no-vpt": dataclasses.replace(base, vpt_tokens=0)}


def run_cell(cell: dict, bed: Bed, configs: dict, probe_steps: int) -> dict:
    method, shots, seed = cell["method"], cell["shots"], cell["seed"]
    C = len(bed.names)
    if method == "zero-shot":
        acc = tuple(((x @ bed.text.T).argmax(1) == y).double().mean().item() for x, y, _ in (bed.eval, bed.pool))
    elif method == "kmeans":
        pool_acc = kmeans_accuracy(bed.pool[0], bed.pool[1], C, seed)
        acc = (pool_acc, pool_acc)
    else:
        rows, labels = bed.s_star if method.endswith(" s*") else bed.shot_rows(shots, seed)
        if method in ("coop", "coop s*", "phase1 s*", "phase1 no-vpt s*"):
            cfg = configs[{"phase1 s*": "phase1", "phase1 no-vpt s*": "phase1 no-vpt"}.get(method, "coop")]
            acc = bed.prompt_accuracies(bed.prompt_model(rows, labels, cfg, seed))
        else:
            init = bed.text * bed.logit_scale if method == "zs-init probe" else None
            acc = bed.head_accuracies(*train_head(bed.pool[0][rows], labels, C, seed, probe_steps, init))
    return {**cell, "acc1": pct(acc[0]), "pool_acc1": pct(acc[1])}


# ------------------------------------------------------------------------------------------ tables
def summary(rows) -> dict:
    """{testbed: {method: {shots: [acc1 per seed]}}} (and the same of pool_acc1 under "pool")."""
    found = {}
    for row in rows:
        for column, key in (("acc1", "acc1"), ("pool_acc1", "pool")):
            if row.get(column, "") != "":
                per = found.setdefault(row["testbed"], {}).setdefault(key, {}).setdefault(row["method"], {})
                per.setdefault(int(row["shots"]), []).append(float(row[column]))
    return found


def mean(found: dict, method: str, shots: int):
    values = found.get(method, {}).get(shots)
    return statistics.mean(values) if values else None


def targets(acc: dict, pool: dict) -> list:
    """[(target, text)] of the issue's targets on one test bed's means; '-' where not computable."""
    def check(name, left, right, margin):
        if left is None or right is None:
            return name, "not computable yet"
        gap = left - (right + margin)
        return name, f"{'met' if gap >= 0 else 'MISSED'}: {left:.2f} against {right + margin:.2f} ({gap:+.2f})"

    zero_shot, zero_shot_pool = mean(acc, "zero-shot", 0), mean(pool, "zero-shot", 0)
    found = [check("CoOp@1 >= probe@1 + 10", mean(acc, "coop", 1), mean(acc, "probe", 1), 10),
             check("CoOp@16 >= probe@16 - 3", mean(acc, "coop", 16), mean(acc, "probe", 16), -3),
             check("CoOp@16 >= zero-shot + 12", mean(acc, "coop", 16), zero_shot, 12),
             check("k-means >= zero-shot + 10 (both on the pool)", mean(acc, "kmeans", 0), zero_shot_pool, 10),
             check("coop s* >= probe s* - 2 (eval split)", mean(acc, "coop s*", 0), mean(acc, "probe s*", 0), -2),
             check("coop s* >= probe s* - 2 (labelling the pool)", mean(pool, "coop s*", 0), mean(pool, "probe s*", 0), -2),
             check("phase1 s* >= coop s* - 2 (eval split)", mean(acc, "phase1 s*", 0), mean(acc, "coop s*", 0), -2),
             check("visual prompts cost at most 2: phase1 s* >= phase1 no-vpt s* - 2 (eval split)",
                   mean(acc, "phase1 s*", 0), mean(acc, "phase1 no-vpt s*", 0), -2)]
    return found


def write(table: CellTable, results: Path, note: str = "") -> None:
    from coft_fast.runtime.io import atomic_write_text

    found = summary(table.rows.values())
    shot_columns = (0,) + SHOTS
    lines = [f"# Test-bed fidelity: zero-shot, CoOp, linear probes and k-means ({machine()})", "",
             "`python bench/testbed_fidelity.py --testbed DIR --tag NAME [--pool DIR --eval DIR]` (resumable per cell; "
             "bench/testbed_fidelity.py's docstring gives every method's settings). Top-1 in % on the evaluation split, "
             "means over the seeds done (seed count in brackets); k-means is scored on the pool. coop: phase I with "
             "lam=0 and no visual prompts (CoOp) on true shots; probe: a linear head from scratch on frozen features; "
             "zs-init probe: the same head started at the class text embeddings x the logit scale; * s*: on S*, the "
             "class-balanced top-16 of the pool's zero-shot labels; phase1 s*: phase I at the paper's defaults on S*; "
             "phase1 no-vpt s*: the same without visual prompts."
             + (f" {note}" if note else ""), ""]
    for testbed in sorted(found):
        acc, pool = found[testbed].get("acc1", {}), found[testbed].get("pool", {})
        lines += [f"## {testbed}", "", "| method | " + " | ".join(f"{k} shots" for k in shot_columns) + " |",
                  "|---|" + "---|" * len(shot_columns)]
        for method in [m for m in METHODS if m in acc] + sorted(set(acc) - set(METHODS)):
            lines.append(f"| {method} | " + " | ".join(
                f"{statistics.mean(acc[method][k]):.2f} ({len(acc[method][k])})" if k in acc[method] else "-"
                for k in shot_columns) + " |")
        labellers = [m for m in ("zero-shot", "probe s*", "coop s*", "phase1 s*", "phase1 no-vpt s*", "kmeans") if m in pool]
        if labellers:
            lines += ["", "Pool labelling accuracy (%, the pool holds S*):", "",
                      *markdown_table(["method", "pool_acc1"],
                                      [{"method": m, "pool_acc1": f"{mean(pool, m, 0):.2f}"} for m in labellers])]
        lines += ["", "Targets (issue 36):", ""] + [f"- {name}: {text}" for name, text in targets(acc, pool)] + [""]
    atomic_write_text(results / f"{STEM}.md", "\n".join(lines))
    plot(found, results)


def plot(found: dict, results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from coft_fast.runtime.io import atomic_write

    beds = sorted(found)
    if not beds:
        return
    fig, axes = plt.subplots(1, len(beds), figsize=(5.5 * len(beds), 4), squeeze=False)
    styles = {"zero-shot": ("k", "-"), "coop s*": ("C0", ":"), "probe s*": ("C1", ":"), "phase1 s*": ("C3", ":"),
              "phase1 no-vpt s*": ("C5", ":"),
              "kmeans": ("C4", "--")}
    for ax, testbed in zip(axes[0], beds):
        acc = found[testbed].get("acc1", {})
        for index, method in enumerate(SHOT_METHODS):
            points = sorted((k, statistics.mean(v)) for k, v in acc.get(method, {}).items() if k > 0)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], "-o", color=f"C{index}", label=method)
        for method, (colour, line) in styles.items():
            value = mean(acc, method, 0)
            if value is not None:
                label = method + (" (on the pool)" if method == "kmeans" else "")
                ax.axhline(value, color=colour, linestyle=line, linewidth=1.2, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(SHOTS)
        ax.set_xticklabels([str(k) for k in SHOTS])
        ax.set_xlabel("true shots per class")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(testbed, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(results / f"{STEM}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", required=True, help="a built test-bed folder (a local-dir: model)")
    parser.add_argument("--tag", required=True, help="the test bed's name in the tables (e.g. cifar10, strong, digits)")
    parser.add_argument("--pool", help="the pool's class folders (default: cifar10/pool under $COFT_DATA)")
    parser.add_argument("--eval", help="the evaluation split's class folders (default: cifar10/test)")
    parser.add_argument("--cells", nargs="+", help="only these cells, as METHOD:SHOTS:SEED (e.g. coop:16:0, 'probe s*:0:0')")
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS), help="shots per class of the shot methods")
    parser.add_argument("--threads", type=int, help="torch (and k-means) CPU threads (1 shares a busy machine best)")
    parser.add_argument("--stop-after", type=float, help="start no new cell after this many seconds")
    parser.add_argument("--results", help="the folder of the CSV, markdown and PNG (default: bench/results)")
    parser.add_argument("--steps", type=int, help="phase I steps (and min_epochs 1) instead of the defaults: smoke runs")
    parser.add_argument("--probe-steps", type=int, default=PROBE_STEPS, help="the probes' Adam steps")
    args = parser.parse_args(argv)
    if args.pool is None or args.eval is None:
        cifar10 = data_root() / "cifar10"
        args.pool, args.eval = args.pool or str(cifar10 / "pool"), args.eval or str(cifar10 / "test")
    if not (Path(args.testbed) / "open_clip_config.json").is_file():
        raise SystemExit(f"--testbed {args.testbed}: not a built test bed (no open_clip_config.json)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    results = Path(args.results) if args.results else common.RESULTS
    reduced = args.steps is not None or args.probe_steps != PROBE_STEPS or set(args.shots) - set(SHOTS)
    if reduced and results.resolve() == (common.REPO / "bench" / "results").resolve():
        raise SystemExit("--steps, --probe-steps or other shots change the measured settings: give --results DIR "
                         "(rows of reduced settings must not join bench/results)")
    if args.threads:
        torch.set_num_threads(args.threads)
    results.mkdir(parents=True, exist_ok=True)
    saved, common.RESULTS = common.RESULTS, results  # the folder CellTable reads and writes (kept in table.path)
    try:
        table = CellTable(STEM, HEADER, ("testbed", "method", "shots", "seed"))
    finally:
        common.RESULTS = saved
    bed = Bed(Path(args.testbed), Path(args.pool), Path(args.eval))
    configs = phase1_configs(args.steps)
    note = (f"Written with reduced settings (phase I steps {args.steps}, probe steps {args.probe_steps}): a smoke run, "
            "not a measurement." if reduced else "")

    def order():
        mine = cells(args.tag, tuple(args.shots))
        others = sorted({row["testbed"] for row in table.rows.values()} - {args.tag})
        return [c for testbed in others for c in cells(testbed)] + mine

    def run(cell):
        started = time.perf_counter()
        if args.threads:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(args.threads):
                row = run_cell(cell, bed, configs, args.probe_steps)
        else:
            row = run_cell(cell, bed, configs, args.probe_steps)
        print(f"{cell_name(cell)}: {time.perf_counter() - started:.1f} s", flush=True)
        return row

    def record(row):
        table.add(row, order())
        write(table, results, note)

    run_cells(args, cells(args.tag, tuple(args.shots)), cell_name, table.__contains__, run, record)
    write(table, results, note)


if __name__ == "__main__":
    main()
