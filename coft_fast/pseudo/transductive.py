"""Transductive labels: TransCLIP's zero-shot solver (Zanella, Gérin, Ben Ayed, NeurIPS 2024).

Each class is a Gaussian (unit-norm mean, one shared diagonal variance); block updates as in the
paper (z by ``inner_iterations`` Jacobi steps, the means, the variance; ``outer_iterations`` times):

    z_i ∝ ŷ_i^λ · exp( log N(x_i; μ, Σ) / T + Σ_j (w_ij + w_ji) z_j / (2k) )

with the public code's T = 50 and w_ij = cos(x_i, x_j) over i's k nearest neighbours. Memory is linear
in N (chunked passes, the graph as sparse CSR row blocks); bench/bench_transductive.py holds the dense reference.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

NEIGHBOURS = 3  # k of the affinity graph
OUTER_ITERATIONS = 10
INNER_ITERATIONS = 5
LAMBDA = 1.0  # weight of the KL tie to the prior (zero-shot: 1)
CONFIDENT_PER_CLASS = 8  # rows that start each class mean
LIKELIHOOD_TEMPERATURE = 50.0  # the public code's 1/50 on the Gaussian log-likelihood
EXACT_GRAPH_MAX_ROWS = 100_000  # exact neighbour search up to this many rows; a faiss IVF index above
CHUNK_ELEMENTS = 1 << 22  # elements per chunk of every (N, C) pass

# A prior: (N, C) log-probabilities, or a function giving the log-probabilities of rows [start, stop).
Prior = Union[torch.Tensor, Callable[[int, int], torch.Tensor]]


@dataclass
class TransductiveResult:
    log_probabilities: torch.Tensor  # (N, C) float32 log z: exact near 1 too, so it ranks where z saturates
    graph: str  # "exact", "ivf" or "none"
    seconds: float
    empty_classes: List[int] = field(default_factory=list)  # classes no row is assigned to
    timings: dict = field(default_factory=dict)  # seconds of graph, likelihood, assign (z steps), gaussians

    @property
    def probabilities(self) -> torch.Tensor:
        return self.log_probabilities.exp()

    @property
    def labels(self) -> torch.Tensor:
        return self.log_probabilities.argmax(1)


class TextPrior:
    """Zero-shot log_softmax(scale · x tᵀ), per chunk: no (N, C) prior is held (5 GB at N = 1.28M, C = 1000)."""

    def __init__(self, features: torch.Tensor, text: torch.Tensor, logit_scale: float):
        if text.ndim != 2 or text.shape[1] != features.shape[1]:
            raise ValueError(f"text embeddings must be (C, {features.shape[1]}), got {tuple(text.shape)}")
        self.features, self.scale = features, float(logit_scale)
        self.text = F.normalize(text.float(), dim=1).to(features.device)
        self.num_classes = text.shape[0]

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        features = F.normalize(self.features[start:stop].float(), dim=1)
        return torch.log_softmax(self.scale * features @ self.text.T, dim=1)


def _prior_rows(prior: Prior, start: int, stop: int) -> torch.Tensor:
    return prior[start:stop].float() if isinstance(prior, torch.Tensor) else prior(start, stop)


def _chunks(rows: int, size: int):
    for start in range(0, rows, size):
        yield start, min(start + size, rows)


def neighbour_graph(features: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """(weights (N, k), indices (N, k), kind) of each row's k nearest other rows: exact, or a faiss IVF index."""
    from coft_fast.neighbors import build_ivf_index, drop_self, faiss_available, knn_search, search_index

    rows = features.shape[0]
    if rows <= EXACT_GRAPH_MAX_ROWS or not faiss_available():
        if rows > EXACT_GRAPH_MAX_ROWS:
            log.warning("TransCLIP: faiss is not installed, so the %d-row neighbour graph is searched exactly "
                        "(quadratic time)", rows)
        weights, indices = knn_search(features, features, k, backend="torch", exclude_self=True)
        return weights, indices, "exact"
    lists = int(min(max(64, 4 * math.isqrt(rows)), rows // 39))
    index = build_ivf_index(features, nlist=lists, nprobe=min(16, lists))
    weights, indices = drop_self(*search_index(index, features, k + 1), k)
    missing = indices < 0
    return weights.masked_fill(missing, 0.0), indices.masked_fill(missing, 0), "ivf"


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """``features`` L2-normalised in float32; the tensor itself when it already is (no N x d copy)."""
    if features.dtype == torch.float32:
        norms = torch.cat([features[start:stop].norm(dim=1) for start, stop in _chunks(len(features), 1 << 16)])
        if bool(((norms - 1).abs() < 1e-4).all()):
            return features
    return F.normalize(features.float(), dim=1)


def _init_means(features: torch.Tensor, z: torch.Tensor, per_class: int) -> torch.Tensor:
    """Each class mean: the z-weighted mean of the class's ``per_class`` highest-z rows, unit norm."""
    weights, rows = z.topk(min(per_class, z.shape[0]), dim=0)  # (m, C)
    means = torch.einsum("mc,mcd->cd", weights.double(), features[rows].double())
    return F.normalize(means, dim=1)


class _Gaussians:
    """The class means (C, d) and the shared diagonal variance (d,), float64."""

    def __init__(self, means: torch.Tensor, dim: int):
        self.means = means
        self.variance = torch.full((dim,), 1.0 / dim, dtype=torch.float64, device=means.device)

    def log_likelihood(self, features: torch.Tensor) -> torch.Tensor:
        """-0.5 Σ_d (x - μ_c)² / σ_d less the row's own Σ_d x² / σ_d (it cancels in z): x (μ/σ)ᵀ - Σ_d μ_cd² / 2σ_d."""
        scaled = (self.means / self.variance).float()
        column = (0.5 * (self.means ** 2 / self.variance).sum(1)).float()
        return features @ scaled.T - column

    def update(self, features: torch.Tensor, z: torch.Tensor, chunk: int, empty: set) -> None:
        """z-weighted unit-norm means (a class whose mass underflows keeps its own) and the z-weighted
        mean of (x - μ_c)², from float64 sums of zᵀx, zᵀ1 and x²."""
        classes, dim = self.means.shape
        weighted = torch.zeros(classes, dim, dtype=torch.float64, device=features.device)
        mass = torch.zeros(classes, dtype=torch.float64, device=features.device)
        squares = torch.zeros(dim, dtype=torch.float64, device=features.device)
        for start, stop in _chunks(features.shape[0], chunk):
            x, zc = features[start:stop], z[start:stop]
            weighted += (zc.T @ x).double()
            mass += zc.double().sum(0)
            squares += (x.double() ** 2).sum(0)
        alive = mass > 1e-12 * features.shape[0]
        empty.update((~alive).nonzero().flatten().tolist())
        means = torch.where(alive[:, None], F.normalize(weighted, dim=1), self.means)
        spread = squares - 2 * (means * weighted).sum(0) + (mass[:, None] * means ** 2).sum(0)
        self.means = means
        self.variance = (spread / mass.sum()).clamp_min(1e-12)


def symmetric_blocks(weights: torch.Tensor, indices: torch.Tensor, chunk: int) -> List[Tuple[int, int, torch.Tensor]]:
    """W + Wᵀ of the k-NN graph as sparse CSR row blocks [(start, stop, block (stop - start, N))]."""
    rows, k = indices.shape
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
    coo = torch.sparse_coo_tensor(torch.stack([torch.arange(rows, device=indices.device).repeat_interleave(k),
                                               indices.reshape(-1)]), weights.reshape(-1).float(), (rows, rows),
                                  check_invariants=True)
    both = (coo + coo.t()).coalesce().to_sparse_csr()
    crow, col, values = both.crow_indices(), both.col_indices(), both.values()
    blocks = []
    for start, stop in _chunks(rows, chunk):
        first, last = int(crow[start]), int(crow[stop])
        blocks.append((start, stop, torch.sparse_csr_tensor(crow[start:stop + 1] - first, col[first:last],
                                                            values[first:last], (stop - start, rows),
                                                            check_invariants=False)))  # valid by construction
    return blocks


def _assign(unary: torch.Tensor, z: torch.Tensor, out: torch.Tensor, graph: Optional[List], neighbours: int,
            chunk: int, log_space: bool) -> torch.Tensor:
    """One Jacobi step into ``out`` (not ``z``): softmax(unary + (W + Wᵀ) z / (2k)), or its log."""
    normalise = torch.log_softmax if log_space else torch.softmax
    for start, stop, block in graph or [(start, stop, None) for start, stop in _chunks(z.shape[0], chunk)]:
        logits = unary[start:stop]
        if block is not None:  # the graph term
            logits = torch.sparse.mm(block, z).div_(2 * neighbours).add_(logits)
        out[start:stop] = normalise(logits, dim=1)
    return out


@torch.no_grad()
def transclip(features: torch.Tensor, prior: Prior, num_classes: Optional[int] = None, *,
              neighbours: int = NEIGHBOURS, outer_iterations: int = OUTER_ITERATIONS,
              inner_iterations: int = INNER_ITERATIONS, lam: float = LAMBDA,
              confident_per_class: int = CONFIDENT_PER_CLASS, chunk_rows: Optional[int] = None) -> TransductiveResult:
    """TransCLIP's labels of ``features`` (N, d; L2-normalised here) under ``prior``: (N, C) log-probabilities
    or a ``TextPrior`` (which gives ``num_classes``). ``chunk_rows``: rows per (N, C) pass (default: ~4M elements)."""
    started = time.perf_counter()
    num_classes = num_classes or getattr(prior, "num_classes", None) or prior.shape[1]
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"TransCLIP: features must be a non-empty (N, d) matrix, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"TransCLIP: features must be floating point, got {features.dtype}")
    if num_classes < 1:
        raise ValueError(f"TransCLIP: the prior must have at least one class, got {num_classes}")
    if neighbours < 1:
        raise ValueError(f"TransCLIP: neighbours must be >= 1, got {neighbours}")
    rows = features.shape[0]
    if isinstance(prior, torch.Tensor) and tuple(prior.shape) != (rows, num_classes):
        raise ValueError(f"TransCLIP: the prior must be (N, C) = ({rows}, {num_classes}), got {tuple(prior.shape)}")
    features = unit_rows(features)
    chunk = chunk_rows or max(1, CHUNK_ELEMENTS // num_classes)
    timings = dict.fromkeys(("graph", "likelihood", "assign", "gaussians"), 0.0)
    mark = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[part] += now - mark
        mark = now

    if rows <= neighbours:
        log.warning("TransCLIP: %d images, not more than the graph's %d neighbours: no neighbour term", rows, neighbours)
        blocks, graph = None, "none"
    else:
        weights, indices, graph = neighbour_graph(features, neighbours)
        blocks = symmetric_blocks(weights, indices, chunk)
        del weights, indices
    lap("graph")
    z = torch.empty(rows, num_classes, dtype=torch.float32, device=features.device)
    for start, stop in _chunks(rows, chunk):
        z[start:stop] = _prior_rows(prior, start, stop).exp()
    gaussians = _Gaussians(_init_means(features, z, confident_per_class), features.shape[1])
    unary, spare = torch.empty_like(z), torch.empty_like(z)
    empty: set = set()
    for outer in range(outer_iterations + 1):
        for start, stop in _chunks(rows, chunk):
            unary[start:stop] = (lam * _prior_rows(prior, start, stop)
                                 + gaussians.log_likelihood(features[start:stop]) / LIKELIHOOD_TEMPERATURE)
        lap("likelihood")
        for inner in range(inner_iterations):
            last = outer == outer_iterations and inner == inner_iterations - 1
            z, spare = _assign(unary, z, spare, blocks, neighbours, chunk, log_space=last), z
        lap("assign")
        if outer == outer_iterations:
            break
        gaussians.update(features, z, chunk, empty)
        lap("gaussians")
    del unary, spare
    if inner_iterations == 0:
        z = z.clamp_min(torch.finfo(z.dtype).tiny).log_()
    counts = torch.bincount(z.argmax(1), minlength=num_classes)
    unassigned = (counts == 0).nonzero().flatten().tolist()
    if empty:
        log.warning("TransCLIP: %d class(es) lost all their mass, and kept their starting means: %s",
                    len(empty), sorted(empty)[:10])
    if unassigned:
        log.warning("TransCLIP: %d class(es) get no image: %s", len(unassigned), unassigned[:10])
    return TransductiveResult(z, graph, time.perf_counter() - started, unassigned, timings)


@dataclass
class RefinedLabels:
    probabilities: torch.Tensor  # (N, C) float32: each row's refined label distribution
    ranking: torch.Tensor  # (N,) what ranks a class's rows for top-K (higher: more confident)
    details: dict  # what the refinement reports (graph, k, classes without images)


def refine_labels(mode: str, probabilities: torch.Tensor, features: torch.Tensor, knn_k: int = 10) -> RefinedLabels:
    """``probabilities`` (N, C) refined on ``features`` (N, d) by ``mode`` "knn" (the neighbour vote, ranked by
    its share times the prior's probability) or "transclip" (the probabilities as its prior; ranked by log z)."""
    if mode == "knn":
        from coft_fast.neighbors import knn_vote

        if len(features) <= knn_k:
            log.warning("pseudo.refine=knn: %d images, not more than knn_k=%d; labels left as they are",
                        len(features), knn_k)
            votes = probabilities
        else:
            votes = knn_vote(probabilities, features, knn_k)
        share, labels = votes.max(1)
        return RefinedLabels(votes, share * probabilities.gather(1, labels[:, None]).squeeze(1), {"k": knn_k})
    if mode != "transclip":
        raise ValueError(f"pseudo.refine must be none, knn or transclip, got {mode!r}")
    log_prior = probabilities.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    result = transclip(features, log_prior.to(features.device))
    log_probabilities = result.log_probabilities.cpu()
    return RefinedLabels(log_probabilities.exp(), log_probabilities.max(1).values,
                         {"graph": result.graph, "empty_classes": result.empty_classes})


__all__ = ["RefinedLabels", "TextPrior", "TransductiveResult", "neighbour_graph", "refine_labels", "transclip"]
