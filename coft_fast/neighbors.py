"""Nearest neighbours over L2-normalised features (inner product = cosine similarity): exact search
(torch or a flat faiss index), faiss indexes (flat, approximate IVF), and ``knn_vote``. Results are
detached float32 scores and int64 indices by descending score."""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

from coft_fast.ops._checks import check_matrix

# backend="auto": torch up to this many database rows, faiss above. On CPUs faiss took 3.0-3.7x torch's time
# at 10k to 1M rows (bench/results/bench_knn_cpu.md); on GPUs nothing is measured yet.
TORCH_MAX_DATABASE = math.inf
TORCH_MAX_DATABASE_CUDA = math.inf

BACKENDS = ("auto", "torch", "faiss")
# elements of one query-chunk x database-chunk score block of the torch backend (64 MiB in float32)
BLOCK_ELEMENTS = 1 << 24


def _load_faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_available() -> bool:
    return _load_faiss() is not None


def faiss_gpu_available() -> bool:
    faiss = _load_faiss()
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _require_faiss():
    faiss = _load_faiss()
    if faiss is None:
        raise RuntimeError("the faiss backend needs faiss: pip install faiss-cpu (or faiss-gpu)")
    return faiss


@functools.lru_cache(maxsize=None)
def _gpu_res():
    return _require_faiss().StandardGpuResources()


def _as_faiss_array(tensor: torch.Tensor):
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()


def build_flat_index(database: torch.Tensor):
    """An exact inner-product faiss index (IndexFlatIP; on a CUDA ``database``, a GPU one if faiss has GPUs)."""
    faiss = _require_faiss()
    check_matrix("database", database)
    dim = database.shape[1]
    if database.is_cuda and faiss_gpu_available():
        config = faiss.GpuIndexFlatConfig()
        config.device = database.device.index or 0
        index = faiss.GpuIndexFlatIP(_gpu_res(), dim, config)
    else:
        index = faiss.IndexFlatIP(dim)
    add_rows(index, database)
    return index


def build_ivf_index(database: torch.Tensor, nlist: int, nprobe: int = 1, train_size: Optional[int] = None,
                    seed: int = 0, add: bool = True):
    """An approximate inner-product faiss index (IndexIVFFlat): spherical k-means on ``train_size`` random
    rows (default min(N, 64 * nlist)) makes ``nlist`` lists, a search scans the ``nprobe`` nearest. Trained
    on the CPU (then moved to a CUDA ``database``'s GPU); add=False returns it empty (see ``add_rows``)."""
    faiss = _require_faiss()
    check_matrix("database", database)
    rows, dim = database.shape
    _check_count("nlist", nlist, 1, rows, "at most the database rows")
    _check_count("nprobe", nprobe, 1, nlist, "at most nlist")
    train_size = min(rows, 64 * nlist) if train_size is None else train_size
    _check_count("train_size", train_size, nlist, rows, "at least nlist, at most the database rows")
    picked = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[:train_size]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True
    index.cp.seed = seed
    index.train(_as_faiss_array(database[picked.to(database.device)]))
    if database.is_cuda and faiss_gpu_available():
        index = faiss.index_cpu_to_gpu(_gpu_res(), database.device.index or 0, index)
    index.nprobe = nprobe
    if add:
        add_rows(index, database)
    return index


def add_rows(index, rows: torch.Tensor) -> None:
    """Append ``rows`` (n, d) to a faiss ``index`` (ids continue from ``index.ntotal``)."""
    check_matrix("rows", rows, columns=index.d)
    index.add(_as_faiss_array(rows))


def search_index(index, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scores (Q, k), indices (Q, k)) of the ``k`` best rows of a faiss ``index`` (-1 where an IVF index has fewer)."""
    check_matrix("queries", queries, columns=index.d)
    _check_count("k", k, 1, index.ntotal, "at most the rows in the index")
    scores, indices = index.search(_as_faiss_array(queries), k)
    on_gpu = isinstance(index, getattr(_load_faiss(), "GpuIndex", ()))
    device = queries.device if on_gpu else torch.device("cpu")
    return torch.from_numpy(scores).to(device), torch.from_numpy(indices).to(device)


def _check_count(name: str, value, low: int = 1, high=math.inf, bounds: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        expected = f">= {low}" if high == math.inf else f"in [{low}, {high}] ({bounds})"
        raise ValueError(f"{name} must be {expected}, got {value}")


def knn_search(queries: torch.Tensor, database: torch.Tensor, k: int, backend: str = "auto",
               chunk_size: int = 1024, database_chunk_size: Optional[int] = None,
               exclude_self: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scores (Q, k), indices (Q, k)) of the exact k nearest rows of ``database`` (N, d) for each row of
    ``queries`` (Q, d). backend: "torch" (chunked matmul + topk; ``chunk_size`` / ``database_chunk_size``
    rows per matmul), "faiss" (IndexFlatIP) or "auto" (``pick_backend``). exclude_self: queries and
    database are the same rows and each query's own row (by index) is left out."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_matrix("queries", queries)
    check_matrix("database", database, columns=queries.shape[1])
    if queries.device != database.device:
        raise ValueError(f"queries and database must be on one device, got {queries.device} and {database.device}")
    if exclude_self and queries.shape[0] != database.shape[0]:
        raise ValueError("exclude_self=True needs queries and database to be the same rows, got "
                         f"{queries.shape[0]} queries and {database.shape[0]} database rows")
    rows = database.shape[0] - int(bool(exclude_self))
    _check_count("k", k, 1, rows, "at most the database rows" + (" minus the query itself" if exclude_self else ""))
    _check_count("chunk_size", chunk_size)
    if database_chunk_size is not None:
        _check_count("database_chunk_size", database_chunk_size)
    if backend == "auto":
        backend = pick_backend(queries, database)
    if backend == "torch":
        return _torch_search(queries, database, k, chunk_size, database_chunk_size, exclude_self)
    index = build_flat_index(database)
    if not exclude_self:
        return search_index(index, queries, k)
    return drop_self(*search_index(index, queries, k + 1), k)


def pick_backend(queries: torch.Tensor, database: torch.Tensor) -> str:
    """What backend="auto" runs: torch up to the device's ``TORCH_MAX_DATABASE*``, faiss above when it is there."""
    if database.is_cuda:
        return "faiss" if database.shape[0] > TORCH_MAX_DATABASE_CUDA and faiss_gpu_available() else "torch"
    return "faiss" if database.shape[0] > TORCH_MAX_DATABASE and faiss_available() else "torch"


@torch.no_grad()
def _torch_search(queries, database, k, chunk_size, database_chunk_size, exclude_self):
    """Exact search: per chunk of queries, matmul + topk over database chunks, merging the running best k."""
    compute = torch.float64 if torch.float64 in (queries.dtype, database.dtype) else torch.float32
    rows, device = database.shape[0], queries.device
    db_chunk = database_chunk_size or max(k, BLOCK_ELEMENTS // chunk_size)
    scores = torch.empty(queries.shape[0], k, dtype=torch.float32, device=device)
    indices = torch.empty(queries.shape[0], k, dtype=torch.int64, device=device)
    db_blocks = [(start, database[start:start + db_chunk].to(compute)) for start in range(0, rows, db_chunk)]
    for q_start in range(0, queries.shape[0], chunk_size):
        block_queries = queries[q_start:q_start + chunk_size].to(compute)
        best_scores = best_indices = None
        for db_start, block_db in db_blocks:
            block = block_queries @ block_db.T
            own_start = max(q_start, db_start)
            own_stop = min(q_start + block.shape[0], db_start + block.shape[1])
            if exclude_self and own_start < own_stop:  # own rows get -inf: never picked while k <= rows - 1
                own = torch.arange(own_start, own_stop, device=device)
                block[own - q_start, own - db_start] = -math.inf
            top_scores, top_positions = block.topk(min(k, block.shape[1]), dim=1)
            top_indices = top_positions + db_start
            if best_scores is not None:
                top_scores = torch.cat([best_scores, top_scores], dim=1)
                top_indices = torch.cat([best_indices, top_indices], dim=1)
                top_scores, picked = top_scores.topk(min(k, top_scores.shape[1]), dim=1)
                top_indices = top_indices.gather(1, picked)
            best_scores, best_indices = top_scores, top_indices
        scores[q_start:q_start + chunk_size] = best_scores
        indices[q_start:q_start + chunk_size] = best_indices
    return scores, indices


def drop_self(scores, indices, k):
    """From k + 1 results of a set searched against itself, drop each query's own row (by index), else the last."""
    own = torch.arange(indices.shape[0], device=indices.device).unsqueeze(1)
    drop = indices == own
    drop[:, -1] |= ~drop.any(dim=1)
    keep = ~drop
    return scores[keep].view(-1, k), indices[keep].view(-1, k)


def knn_vote(probabilities: torch.Tensor, features: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """(N, C) float32 vote shares of each sample's k nearest neighbours (itself excluded), each voting for its
    argmax class with weight max_c p_jc; a sample whose neighbours all have confidence 0 keeps its own."""
    check_matrix("features", features)
    check_matrix("probabilities", probabilities)
    if probabilities.shape[0] != features.shape[0]:
        raise ValueError(f"probabilities must have one row per feature row ({features.shape[0]}), got shape "
                         f"{tuple(probabilities.shape)}")
    _, neighbours = knn_search(features, features, k, backend=backend, exclude_self=True)
    probabilities = probabilities.detach().float()
    neighbours = neighbours.to(probabilities.device)
    confidence, label = probabilities.max(dim=1)
    votes = torch.zeros_like(probabilities).scatter_add_(1, label[neighbours], confidence[neighbours])
    mass = votes.sum(dim=1, keepdim=True)
    return torch.where(mass > 0, votes / mass.clamp_min(torch.finfo(votes.dtype).tiny), probabilities)


__all__ = ["BACKENDS", "TORCH_MAX_DATABASE", "TORCH_MAX_DATABASE_CUDA", "add_rows", "build_flat_index",
           "build_ivf_index", "faiss_available", "faiss_gpu_available", "knn_search", "knn_vote", "pick_backend",
           "search_index"]
