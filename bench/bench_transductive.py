"""Benchmark of TransCLIP's solver (coft_fast.pseudo.transductive): ours against the dense reference, one process.

    python bench/bench_transductive.py [--cells N:C ...] [--dim 512] [--device cpu|cuda] [--threads T]
                                       [--dense-max N] [--tag NAME]

Data: N unit-norm rows in C Gaussian clusters (d = --dim), text embeddings near the cluster centres,
the prior at logit scale 15 (the test beds' scale). Methods, on the same tensors:
  dense  transclip_dense: the straightforward version, as the public code computes it (an N x N
         affinity and top-k, the likelihood as an (N, C, d) broadcast in blocks of 2,500 rows);
  ours   transclip: chunked matmuls, a k-NN graph (exact search up to 100,000 rows, IVF above), three
         (N, C) buffers, the prior computed per chunk from the text (TextPrior) so no (N, C) prior is held.
Both run TransCLIP's published defaults (3 neighbours, 10 x 5 iterations). Dense runs only up to
--dense-max rows (its N x N affinity is 10 GB at 50,000). Time: one wall-clock run each (perf_counter;
CUDA synchronised). Peak memory: on CUDA, torch.cuda.max_memory_allocated; on the CPU, the largest
resident-set growth over the run, sampled every 5 ms from /proc/self/statm. ours' time is split into its
parts (graph search, likelihood, z steps, Gaussian updates), and the z steps' bytes moved per second are
set beside a plain copy's (an (N, C) tensor cloned) to say whether they are memory-bound.
Resumable per cell: bench/results/transductive_speed_<device>[_TAG].csv and .md.
"""
from __future__ import annotations

import argparse
import math
import os
import threading
import time

import torch
import torch.nn.functional as F

from common import RESULTS, CellTable, machine, markdown_table
from coft_fast.pseudo.transductive import (CONFIDENT_PER_CLASS, INNER_ITERATIONS, LAMBDA, LIKELIHOOD_TEMPERATURE,
                                           NEIGHBOURS, OUTER_ITERATIONS, TextPrior, _init_means, transclip)

HEADER = ["N", "C", "d", "method", "seconds", "peak memory (GB)", "dense / ours time", "dense / ours memory",
          "agreement with dense", "graph s", "likelihood s", "z steps s", "gaussians s", "z steps GB/s", "copy GB/s"]
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakMemory:
    """Peak memory growth during a ``with`` block: CUDA's allocator peak, or the CPU's sampled RSS."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base, self.running = resident_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes() - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, resident_bytes() - self.base)


def clustered(rows: int, classes: int, dim: int, device: torch.device, seed: int = 0):
    """(features, text): rows in classes clusters, text embeddings near the centres."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=generator), dim=1)
    features = torch.empty(rows, dim)
    for start in range(0, rows, 1 << 16):  # in blocks: no (N, d) temporaries beside the result
        stop = min(start + (1 << 16), rows)
        labels = torch.randint(0, classes, (stop - start,), generator=generator)
        features[start:stop] = F.normalize(centres[labels] + 0.04 * torch.randn(stop - start, dim, generator=generator), dim=1)
    text = F.normalize(centres + 0.05 * torch.randn(classes, dim, generator=generator), dim=1)
    return features.to(device), text.to(device)


@torch.no_grad()
def transclip_dense(features: torch.Tensor, log_prior: torch.Tensor, *, neighbours: int = NEIGHBOURS,
                    outer_iterations: int = OUTER_ITERATIONS, inner_iterations: int = INNER_ITERATIONS,
                    lam: float = LAMBDA, confident_per_class: int = CONFIDENT_PER_CLASS,
                    broadcast_rows: int = 2500) -> torch.Tensor:
    """The reference z (N, C): TransCLIP as the public code computes it (an N x N affinity, an (N, C, d) broadcast)."""
    x = F.normalize(features.float(), dim=1)
    rows, dim = x.shape
    affinity = x @ x.T
    affinity.fill_diagonal_(-math.inf)
    values, columns = affinity.topk(neighbours, dim=1)
    del affinity
    w = torch.sparse_coo_tensor(torch.stack([torch.arange(rows).repeat_interleave(neighbours), columns.reshape(-1)]),
                                values.reshape(-1), (rows, rows), check_invariants=True).coalesce()
    y_hat = log_prior.float().exp()
    z = y_hat.clone()
    mu = _init_means(x, z, confident_per_class).float()
    std = torch.full((dim,), 1.0 / dim)
    for outer in range(outer_iterations + 1):
        likelihood = torch.empty(rows, mu.shape[0])
        for start in range(0, rows, broadcast_rows):
            block = x[start:start + broadcast_rows, None, :] - mu[None]
            likelihood[start:start + broadcast_rows] = -0.5 * (block ** 2 / std).sum(2)
        for _ in range(inner_iterations):
            logits = likelihood + (LIKELIHOOD_TEMPERATURE / (2 * neighbours)) * (w.T @ z + w @ z)
            logits = logits - logits.max(1, keepdim=True).values
            z = y_hat ** lam * torch.exp(logits / LIKELIHOOD_TEMPERATURE)
            z = z / z.sum(1, keepdim=True)
        if outer == outer_iterations:
            break
        mu = F.normalize(z.T @ x / z.sum(0)[:, None], dim=1)
        spread = torch.zeros(dim)
        for start in range(0, rows, broadcast_rows):
            block = x[start:start + broadcast_rows, None, :] - mu[None]
            spread += torch.einsum("nc,ncd->d", z[start:start + broadcast_rows], block ** 2)
        std = spread / z.sum()
    return z


def copy_bandwidth(rows: int, classes: int, device: torch.device) -> float:
    """GB/s of cloning an (N, C) float32 tensor (read + write), the best of 3."""
    block = torch.rand(min(max(1 << 26, rows * classes), 1 << 28) // classes, classes, device=device)  # 256 MB to 1 GB
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        block.clone()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * block.numel() * 4 / best / 1e9


def z_step_bytes(rows: int, classes: int) -> float:
    """Bytes one z step reads and writes at the least: z read at each row's 2k graph entries (W + Wᵀ),
    the unary term read, and the new z written (the per-block temporaries stay in cache)."""
    return (2 * NEIGHBOURS + 2) * rows * classes * 4.0


def run_cell(rows: int, classes: int, dim: int, method: str, device: torch.device, dense_labels: dict) -> dict:
    features, text = clustered(rows, classes, dim, device)
    row = {"N": rows, "C": classes, "d": dim, "method": method}
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        if method == "dense":
            prior = TextPrior(features, text, 15.0)(0, rows)
            labels = transclip_dense(features, prior).argmax(1)
        else:
            result = transclip(features, TextPrior(features, text, 15.0))
            labels = result.labels
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    row.update({"seconds": f"{seconds:.2f}", "peak memory (GB)": f"{memory.peak / 1e9:.2f}"})
    if method == "dense":
        dense_labels[(rows, classes)] = labels.cpu()
        return row
    timings = result.timings
    steps = (OUTER_ITERATIONS + 1) * INNER_ITERATIONS
    row.update({key + " s": f"{timings[part]:.2f}" for key, part in
                (("graph", "graph"), ("likelihood", "likelihood"), ("z steps", "assign"), ("gaussians", "gaussians"))})
    row["z steps GB/s"] = f"{steps * z_step_bytes(rows, classes) / timings['assign'] / 1e9:.1f}"
    row["copy GB/s"] = f"{copy_bandwidth(rows, classes, device):.1f}"
    if (rows, classes) in dense_labels:
        row["agreement with dense"] = f"{100 * (labels.cpu() == dense_labels[(rows, classes)]).double().mean().item():.2f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["10000:100", "10000:1000", "50000:100", "50000:1000",
                                                       "1281167:1000"], help="N:C cells, in order")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--dense-max", type=int, default=50_000, help="largest N the dense reference runs at")
    parser.add_argument("--dense-max-classes", type=int, default=100,
                        help="largest C the dense reference runs at (its broadcast is N x C x d: at 10,000 rows and "
                             "C = 1,000 about 2,000 s on 2 CPU cores)")
    parser.add_argument("--tag", default="", help="suffix of the results files")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stem = f"transductive_speed_{device.type}" + (f"_{args.tag}" if args.tag else "")
    table = CellTable(stem, HEADER, ("N", "C", "d", "method"))
    order = []
    for text in args.cells:
        rows, classes = map(int, text.split(":"))
        dense = rows <= args.dense_max and classes <= args.dense_max_classes
        order += [{"N": rows, "C": classes, "d": args.dim, "method": m} for m in (["dense"] if dense else []) + ["ours"]]
    order = [{k: str(v) for k, v in cell.items()} for cell in order]
    dense_labels = {}
    for cell in order:
        rows, classes = int(cell["N"]), int(cell["C"])
        if cell in table:
            continue
        row = run_cell(rows, classes, args.dim, cell["method"], device, dense_labels)
        if cell["method"] == "ours" and {**cell, "method": "dense"} in table:
            dense = table.rows[table.key({**cell, "method": "dense"})]
            row["dense / ours time"] = f"{float(dense['seconds']) / float(row['seconds']):.1f}x"
            row["dense / ours memory"] = f"{float(dense['peak memory (GB)']) / max(float(row['peak memory (GB)']), 1e-3):.1f}x"
        print(row, flush=True)
        table.add(row, order)
        lines = [f"# TransCLIP's solver: ours against the dense reference ({machine()}, {torch.get_num_threads()} threads)",
                 "", f"`python bench/bench_transductive.py --device {device.type}` (resumable per cell). "
                 + __doc__.split("Methods, on the same tensors:")[1].split("Resumable")[0].replace("\n", " ").strip(),
                 ""] + markdown_table(HEADER, table.ordered(order))
        (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
