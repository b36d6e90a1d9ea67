"""Nearest neighbours over L2-normalised features (inner product = cosine similarity).

- ``knn_search``: exact k nearest neighbours, by chunked matmul + topk in torch or by a flat faiss
  index; ``exclude_self`` for a search of a set against itself.
- ``build_flat_index`` / ``build_ivf_index`` + ``search_index``: faiss indexes, for timing build and
  search apart, and the approximate IVF index for very large databases.
- ``knn_vote``: refine pseudo-labels by a confidence-weighted vote of each sample's neighbours.
- ``knn_accuracy``: leave-one-out weighted kNN accuracy (the MoCo / DINO evaluation).

Results are detached. Scores are float32 and indices int64, sorted by descending score. The torch
backend returns them on the device of ``queries``; faiss returns them on the CPU, except a faiss GPU
index (a faiss build with GPU support, CUDA inputs), which returns them on the device of ``queries``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from coft_fast.ops._checks import check_matrix

# backend="auto" on CPU tensors: the torch backend up to this many database rows, a flat faiss index
# above (when faiss imports). Measured by `python bench/bench_knn.py` (bench/results/bench_knn_cpu.md:
# 10,000 queries x 512, k = 20, 2 threads, faiss-cpu 1.15.1): a flat faiss index took 3.7x, 3.0x and
# 3.2x torch's time at 10k, 100k and 1M database rows, so there is no crossover where exact search
# is concerned: auto stays on torch at every size. faiss is for backend="faiss" and the approximate
# IVF index (build_ivf_index), and on GPUs through TORCH_MAX_DATABASE_CUDA.
TORCH_MAX_DATABASE = math.inf
# backend="auto" on CUDA tensors: the torch backend up to this many database rows, a faiss GPU index
# above when faiss has GPU support. Not measured yet: exact search is one GEMM + top-k either way, so
# torch is kept everywhere until bench/bench_knn.py on a GPU says otherwise.
TORCH_MAX_DATABASE_CUDA = math.inf

BACKENDS = ("auto", "torch", "faiss")
# elements of one query-chunk x database-chunk score block of the torch backend (64 MiB in float32)
BLOCK_ELEMENTS = 1 << 24

_faiss_module = None
_gpu_resources = None


# ------------------------------------------------------------------------------------------ faiss

def _load_faiss():
    """The faiss module, or None when it does not import."""
    global _faiss_module
    if _faiss_module is None:
        try:
            import faiss
        except ImportError:
            return None
        _faiss_module = faiss
    return _faiss_module


def faiss_available() -> bool:
    return _load_faiss() is not None


def faiss_gpu_available() -> bool:
    """True on a faiss build with GPU support that sees at least one GPU."""
    faiss = _load_faiss()
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _require_faiss():
    faiss = _load_faiss()
    if faiss is None:
        raise RuntimeError("the faiss backend needs faiss: pip install faiss-cpu (or faiss-gpu)")
    return faiss


def _gpu_res():
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = _require_faiss().StandardGpuResources()
    return _gpu_resources


def _on_faiss_gpu(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and faiss_gpu_available()


def _is_gpu_index(index) -> bool:
    faiss = _load_faiss()
    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def _as_faiss_array(tensor: torch.Tensor):
    """A C-contiguous float32 numpy array on the host (no copy for a contiguous float32 CPU tensor)."""
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()


def build_flat_index(database: torch.Tensor):
    """An exact inner-product faiss index (IndexFlatIP) holding a copy of ``database`` (N, d).

    On a faiss build with GPU support and a CUDA ``database``, a GpuIndexFlatIP on its device."""
    faiss = _require_faiss()
    check_matrix("database", database)
    dim = database.shape[1]
    if _on_faiss_gpu(database):
        config = faiss.GpuIndexFlatConfig()
        config.device = database.device.index or 0
        index = faiss.GpuIndexFlatIP(_gpu_res(), dim, config)
    else:
        index = faiss.IndexFlatIP(dim)
    add_rows(index, database)
    return index


def build_ivf_index(database: torch.Tensor, nlist: int, nprobe: int = 1, train_size: Optional[int] = None,
                    seed: int = 0, add: bool = True):
    """An approximate inner-product faiss index (IndexIVFFlat) holding a copy of ``database`` (N, d).

    Spherical k-means splits the rows into ``nlist`` lists, trained on ``train_size`` rows drawn at
    random (default: min(N, 64 * nlist)); a search scans the ``nprobe`` lists nearest to each query
    (``nprobe = nlist`` scans all of them: exact). Change it later with ``index.nprobe = ...``.
    Trained on the CPU; on a faiss build with GPU support and a CUDA ``database``, moved to its GPU.
    add=False returns the trained index empty (to time training apart; fill it with ``add_rows``)."""
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
    if _on_faiss_gpu(database):
        index = faiss.index_cpu_to_gpu(_gpu_res(), database.device.index or 0, index)
    index.nprobe = nprobe
    if add:
        add_rows(index, database)
    return index


def add_rows(index, rows: torch.Tensor) -> None:
    """Append ``rows`` (n, d) to a faiss ``index`` (their ids continue from ``index.ntotal``)."""
    check_matrix("rows", rows, columns=index.d)
    index.add(_as_faiss_array(rows))


def search_index(index, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scores (Q, k) float32, indices (Q, k) int64) of the ``k`` best rows of a faiss ``index``.

    On the CPU, or on the device of ``queries`` for a faiss GPU index. An IVF index returns index -1
    (score -inf) where its probed lists held fewer than k rows."""
    check_matrix("queries", queries, columns=index.d)
    _check_count("k", k, 1, index.ntotal, "at most the rows in the index")
    scores, indices = index.search(_as_faiss_array(queries), k)
    device = queries.device if _is_gpu_index(index) else torch.device("cpu")
    return torch.from_numpy(scores).to(device), torch.from_numpy(indices).to(device)


# ------------------------------------------------------------------------------------------ checks

def _check_count(name: str, value, low: int, high: int, bounds: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}] ({bounds}), got {value}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_search_args(queries, database, k, backend, chunk_size, database_chunk_size, exclude_self) -> None:
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
    _check_positive("chunk_size", chunk_size)
    if database_chunk_size is not None:
        _check_positive("database_chunk_size", database_chunk_size)


def _check_probabilities(probabilities, rows: int) -> None:
    check_matrix("probabilities", probabilities)
    if probabilities.shape[0] != rows:
        raise ValueError(f"probabilities must have one row per feature row ({rows}), got shape "
                         f"{tuple(probabilities.shape)}")


# ------------------------------------------------------------------------------------------ search

def pick_backend(queries: torch.Tensor, database: torch.Tensor) -> str:
    """What backend="auto" runs: torch up to the size threshold of the device, faiss above it (when
    faiss imports, and for CUDA tensors when faiss has GPU support). Both thresholds are infinite:
    torch at every size, as measured (see ``TORCH_MAX_DATABASE``)."""
    if database.is_cuda:
        large = database.shape[0] > TORCH_MAX_DATABASE_CUDA
        return "faiss" if large and faiss_gpu_available() else "torch"
    return "faiss" if database.shape[0] > TORCH_MAX_DATABASE and faiss_available() else "torch"


@torch.no_grad()
def _torch_search(queries, database, k, chunk_size, database_chunk_size, exclude_self):
    """Exact search: for each chunk of queries, matmul + topk over chunks of the database, merging
    the running best k (memory O(chunk_size * database_chunk_size))."""
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


def _drop_self(scores, indices, k):
    """From k + 1 results of a set searched against itself, drop each query's own row (matched by
    index, so ties keep their order); where it is missing (duplicates tied above it), the last one."""
    own = torch.arange(indices.shape[0], device=indices.device).unsqueeze(1)
    drop = indices == own
    drop[:, -1] |= ~drop.any(dim=1)
    keep = ~drop
    return scores[keep].view(-1, k), indices[keep].view(-1, k)


def knn_search(queries: torch.Tensor, database: torch.Tensor, k: int, backend: str = "auto",
               chunk_size: int = 1024, database_chunk_size: Optional[int] = None,
               exclude_self: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest rows of ``database`` (N, d) by inner product for each row of ``queries`` (Q, d).

    Returns (scores (Q, k) float32, indices (Q, k) int64), by descending score.
    backend: "torch" (chunked matmul + topk, CPU or CUDA, results on the device of ``queries``),
    "faiss" (IndexFlatIP: results on the CPU; a GPU index with its results on the device of
    ``queries`` on a faiss build with GPU support and CUDA inputs) or "auto" (``pick_backend``).
    chunk_size: queries per matmul; database_chunk_size: database rows per matmul (default: a block
    of ``BLOCK_ELEMENTS`` scores); torch backend only.
    exclude_self: ``queries`` and ``database`` are the same rows; each query's own row is left out
    (by index, so an exact duplicate of the query elsewhere is still a neighbour)."""
    _check_search_args(queries, database, k, backend, chunk_size, database_chunk_size, exclude_self)
    if backend == "auto":
        backend = pick_backend(queries, database)
    if backend == "torch":
        return _torch_search(queries, database, k, chunk_size, database_chunk_size, exclude_self)
    index = build_flat_index(database)
    if not exclude_self:
        return search_index(index, queries, k)
    return _drop_self(*search_index(index, queries, k + 1), k)


# ------------------------------------------------------------------------------------------ uses

def knn_vote(probabilities: torch.Tensor, features: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """Pseudo-labels refined by a confidence-weighted vote of each sample's k nearest neighbours.

    Each neighbour j (the sample itself excluded) votes for its argmax class with weight max_c p_jc;
    the result (N, C), float32 on the device of ``probabilities``, is each sample's vote mass per
    class normalised to sum 1: argmax = refined label, max = refined confidence. A sample whose
    neighbours all have confidence 0 keeps its own probabilities."""
    check_matrix("features", features)
    _check_probabilities(probabilities, features.shape[0])
    _, neighbours = knn_search(features, features, k, backend=backend, exclude_self=True)
    probabilities = probabilities.detach().float()
    neighbours = neighbours.to(probabilities.device)
    confidence, label = probabilities.max(dim=1)
    votes = torch.zeros_like(probabilities).scatter_add_(1, label[neighbours], confidence[neighbours])
    mass = votes.sum(dim=1, keepdim=True)
    return torch.where(mass > 0, votes / mass.clamp_min(torch.finfo(votes.dtype).tiny), probabilities)


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 backend: str = "auto") -> float:
    """Leave-one-out weighted kNN accuracy, as MoCo / DINO evaluate features.

    Over the samples with label >= 0: each is classified by its k nearest other labelled samples,
    each voting for its label with weight exp(similarity / temperature); returns the fraction
    classified right. k is capped at the number of other labelled samples."""
    check_matrix("features", features)
    if not isinstance(labels, torch.Tensor) or labels.shape != (features.shape[0],) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape ({features.shape[0]},), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    _check_positive("k", k)
    labelled = (labels >= 0).to(features.device)
    features, labels = features[labelled], labels.to(features.device)[labelled]
    if features.shape[0] < 2:
        raise ValueError(f"knn_accuracy needs at least 2 samples with label >= 0, got {features.shape[0]}")
    scores, neighbours = knn_search(features, features, min(k, features.shape[0] - 1), backend=backend,
                                    exclude_self=True)
    scores, neighbours = scores.to(labels.device), neighbours.to(labels.device)
    weights = ((scores - scores[:, :1]) / temperature).exp()  # shifted by the row max: same argmax
    votes = torch.zeros(labels.shape[0], int(labels.max()) + 1, device=labels.device)
    votes.scatter_add_(1, labels[neighbours], weights)
    return (votes.argmax(dim=1) == labels).float().mean().item()


__all__ = [
    "BACKENDS",
    "add_rows",
    "TORCH_MAX_DATABASE",
    "TORCH_MAX_DATABASE_CUDA",
    "build_flat_index",
    "build_ivf_index",
    "faiss_available",
    "faiss_gpu_available",
    "knn_accuracy",
    "knn_search",
    "knn_vote",
    "pick_backend",
    "search_index",
]
