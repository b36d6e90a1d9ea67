"""Benchmark of coft_fast.neighbors: exact kNN by a flat faiss index against chunked torch matmul + topk,
and an approximate faiss IVF index, one process.

    python bench/bench_knn.py [--quick] [--sizes 10000,100000,1000000] [--queries Q] [--threads T] [--out FILE]

Data: random unit-norm float32 rows (d = 512 by default), queries drawn apart from the database; k = 20.
Methods, all on the same tensors, CPU always and CUDA when present:
  torch        knn_search(backend="torch"): chunked matmul + topk, exact; the reference of the recall;
  faiss flat   build_flat_index (IndexFlatIP: the build copies the database) + search_index, exact;
               on a faiss build with GPU support, a GPU index on CUDA (its times include the host round
               trip of coft_fast.neighbors' numpy interface);
  faiss IVF    at the largest size only: build_ivf_index (spherical k-means on min(N, 64 * nlist) rows,
               then add) and search_index for each --nprobe. Isotropic random data is IVF's worst case
               (no cluster structure), so its recall here is a lower bound of that on real features.
Time: median of --repeats wall-clock runs (perf_counter, CUDA synchronised) after one small warm-up search
per method. "total" is build + search (train + add + search for IVF); "total / torch" and "search / torch"
divide by the torch search time. recall@k: the mean fraction of each query's k neighbours found by torch
that the method also returns (ties at the k-th score can make an exact method differ slightly).
Prints a markdown table; --out FILE also writes it to FILE.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine
from coft_fast import neighbors

FULL_SIZES = [10_000, 100_000, 1_000_000]
QUICK_SIZES = [10_000, 50_000]
COLUMNS = ["device", "database", "queries", "method", "train (s)", "build (s)", "search (s)", "total (s)",
           "total / torch", "search / torch", "recall@k"]


def parse_ints(text: str) -> list:
    return [int(part) for part in text.split(",") if part]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_ints, help=f"database rows, comma-separated (default "
                        f"{','.join(map(str, FULL_SIZES))}; --quick {','.join(map(str, QUICK_SIZES))})")
    parser.add_argument("--queries", type=int, help="query rows (default 10000; --quick 2000)")
    parser.add_argument("--dim", type=int, default=512, help="feature size")
    parser.add_argument("--k", type=int, default=20, help="neighbours per query")
    parser.add_argument("--nlist", type=int, help="IVF lists (default 4096; --quick 256), at most N / 39")
    parser.add_argument("--nprobe", type=parse_ints, default=[16, 64, 256], help="IVF lists scanned per query, "
                        "comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (the median is reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and faiss CPU threads "
                        "(default: all cores)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CPU, then CUDA when present")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    args.sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    args.queries = args.queries or (2000 if args.quick else 10_000)
    args.nlist = args.nlist or (256 if args.quick else 4096)
    return args


def random_features(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Unit-norm random float32 rows, drawn in slices (no second full-size temporary)."""
    out = torch.empty(rows, dim)
    for start in range(0, rows, 65536):
        block = out[start:start + 65536]
        block.copy_(F.normalize(torch.randn(block.shape[0], dim, generator=generator), dim=1))
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(result, seconds) of one call."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def median_time(fn, repeats: int, device: torch.device):
    """(result of the last run, median seconds over repeats)."""
    times = []
    for _ in range(repeats):
        result, seconds = timed(fn, device)
        times.append(seconds)
    return result, statistics.median(times)


def recall(found: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean fraction of each row of ``reference`` (Q, k) that the same row of ``found`` holds."""
    found, reference = found.cpu(), reference.cpu()
    hits = (reference.unsqueeze(2) == found.unsqueeze(1)).any(dim=2)
    return hits.float().mean().item()


def seconds_text(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def row(device, size, queries, method, search, torch_search, found=None, reference=None, train=None, build=None):
    total = (train or 0.0) + (build or 0.0) + search
    return [device.type, f"{size:,}", f"{queries:,}", method, seconds_text(train), seconds_text(build),
            seconds_text(search), seconds_text(total),
            f"{total / torch_search:.2f}", f"{search / torch_search:.2f}",
            "reference" if found is None else f"{recall(found, reference):.4f}"]


def bench_exact(device, database, queries, k, repeats, ivf_args=None) -> list:
    """Rows of the table for one device and database size: torch, faiss flat, faiss IVF if asked."""
    size, rows = database.shape[0], []
    warm = queries[:256]
    neighbors.knn_search(warm, database, k, backend="torch")
    (_, exact), torch_search = median_time(lambda: neighbors.knn_search(queries, database, k, backend="torch"),
                                           repeats, device)
    rows.append(row(device, size, queries.shape[0], "torch (exact)", torch_search, torch_search))
    print(f"  torch search {torch_search:.3f} s", flush=True)

    if device.type == "cpu" or neighbors.faiss_gpu_available():
        neighbors.search_index(neighbors.build_flat_index(warm), warm, k)
        builds, searches = [], []
        for _ in range(repeats):
            index, build = timed(lambda: neighbors.build_flat_index(database), device)
            (_, found), search = timed(lambda: neighbors.search_index(index, queries, k), device)
            builds.append(build)
            searches.append(search)
            del index
        rows.append(row(device, size, queries.shape[0], "faiss flat (exact)", statistics.median(searches),
                        torch_search, found, exact, build=statistics.median(builds)))
        print(f"  faiss flat build {statistics.median(builds):.3f} s, search {statistics.median(searches):.3f} s",
              flush=True)

    if ivf_args is not None and (device.type == "cpu" or neighbors.faiss_gpu_available()):
        nlist, nprobes, seed = ivf_args
        index, train = timed(lambda: neighbors.build_ivf_index(database, nlist, seed=seed, add=False), device)
        _, add = timed(lambda: neighbors.add_rows(index, database), device)
        print(f"  faiss IVF nlist={nlist} train {train:.3f} s, add {add:.3f} s", flush=True)
        for nprobe in [n for n in nprobes if n <= nlist]:
            index.nprobe = nprobe
            neighbors.search_index(index, warm, k)
            (_, found), search = median_time(lambda: neighbors.search_index(index, queries, k), repeats, device)
            rows.append(row(device, size, queries.shape[0], f"faiss IVF nlist={nlist} nprobe={nprobe}", search,
                            torch_search, found, exact, train=train, build=add))
            print(f"  faiss IVF nprobe={nprobe} search {search:.3f} s", flush=True)
        del index
    return rows


def markdown(rows: list) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    args = parse_args()
    if not neighbors.faiss_available():
        raise SystemExit("faiss does not import: pip install faiss-cpu")
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device != "cuda" else []
    if args.device != "cpu" and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if not devices:
        raise SystemExit("--device cuda: no CUDA device")

    header = (f"kNN search on {machine()}; faiss {faiss.__version__}"
              f"{' (GPU)' if neighbors.faiss_gpu_available() else ''}; {args.threads} CPU threads; "
              f"d={args.dim}, k={args.k}, random unit-norm float32 rows; median of {args.repeats} runs")
    print(f"# {header}", flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    queries = random_features(args.queries, args.dim, generator)
    rows = []
    for size in args.sizes:
        database = random_features(size, args.dim, generator)
        nlist = min(args.nlist, size // 39)
        ivf_args = (nlist, args.nprobe, args.seed) if size == max(args.sizes) and nlist >= 1 else None
        for device in devices:
            print(f"{device.type}: database {size:,} x {args.dim}, {args.queries:,} queries", flush=True)
            rows += bench_exact(device, database.to(device), queries.to(device), args.k, args.repeats, ivf_args)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del database
    table = markdown(rows)
    print()
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# bench_knn\n\n{header}.\n\n{table}\n")
        print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
