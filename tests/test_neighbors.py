"""coft_fast.neighbors: knn_search (torch and faiss) against a float64 brute-force reference on odd
shapes, chunking, exclude_self (duplicated rows too), the auto backend, IVF with every list probed,
knn_vote on hand-built examples, and the argument errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coft_fast import neighbors
from coft_fast.neighbors import build_ivf_index, knn_search, knn_vote, search_index

SCORE_TOL = 1e-5
Q, N, D, K = 37, 1001, 33, 7


def backends():
    return ["torch", "faiss"] if neighbors.faiss_available() else ["torch"]


def faiss_or_skip():
    if not neighbors.faiss_available():
        pytest.skip("faiss is not installed")


def unit_rows(rows, dim=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g), dim=1)


def reference_search(queries, database, k, exclude_self=False):
    """float64 brute force: full similarity matrix + topk."""
    sims = queries.double() @ database.double().T
    if exclude_self:
        sims.fill_diagonal_(-math.inf)
    scores, indices = sims.topk(k, dim=1)
    return scores, indices


def assert_valid_top_k(scores, indices, queries, database, k, exclude_self=False):
    """Tie-proof check: shapes and dtypes, distinct indices, scores that are the true similarities of
    the returned rows, sorted, and equal to the reference's k best scores."""
    assert scores.shape == indices.shape == (queries.shape[0], k)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    scores, indices = scores.cpu(), indices.cpu()
    sims = queries.double() @ database.double().T
    assert all(len(set(r.tolist())) == k for r in indices), "repeated neighbour"
    torch.testing.assert_close(scores.double(), sims.gather(1, indices), rtol=0, atol=SCORE_TOL)
    assert (scores[:, :-1] >= scores[:, 1:]).all(), "scores not descending"
    ref_scores, _ = reference_search(queries, database, k, exclude_self)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=0, atol=SCORE_TOL)
    if exclude_self:
        assert not (indices == torch.arange(queries.shape[0]).unsqueeze(1)).any(), "query's own row returned"


# ------------------------------------------------------------------------------------------ search

@pytest.mark.parametrize("backend", backends())
def test_search_matches_brute_force(backend):
    queries, database = unit_rows(Q, seed=1), unit_rows(N, seed=2)
    scores, indices = knn_search(queries, database, K, backend=backend)
    ref_scores, ref_indices = reference_search(queries, database, K)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=0, atol=SCORE_TOL)
    assert_valid_top_k(scores, indices, queries, database, K)


@pytest.mark.parametrize("chunk_size, database_chunk_size", [(1, None), (5, 3), (8, 100), (64, 1000)])
def test_chunking_gives_identical_results(chunk_size, database_chunk_size):
    queries, database = unit_rows(Q, seed=1), unit_rows(N, seed=2)
    expected = knn_search(queries, database, K, backend="torch")
    found = knn_search(queries, database, K, backend="torch", chunk_size=chunk_size,
                       database_chunk_size=database_chunk_size)
    assert torch.equal(found[1], expected[1])
    torch.testing.assert_close(found[0], expected[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("chunks", [(1024, None), (6, 11)])
def test_exclude_self(backend, chunks):
    features = unit_rows(N, seed=3)
    scores, indices = knn_search(features, features, K, backend=backend, exclude_self=True,
                                 chunk_size=chunks[0], database_chunk_size=chunks[1])
    _, ref_indices = reference_search(features, features, K, exclude_self=True)
    assert torch.equal(indices, ref_indices)
    assert_valid_top_k(scores, indices, features, features, K, exclude_self=True)


@pytest.mark.parametrize("backend", backends())
def test_exclude_self_with_duplicated_rows(backend):
    """Rows repeated 1 to 3 times: a query's exact copies tie with it, yet only its own index goes."""
    base = unit_rows(60, seed=4)
    features = torch.cat([base, base[:30], base[:10]])[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    for k in (1, 2, 5, 99):
        scores, indices = knn_search(features, features, k, backend=backend, exclude_self=True,
                                     chunk_size=7, database_chunk_size=9)
        assert_valid_top_k(scores, indices, features, features, k, exclude_self=True)
        copies = (features @ features.T > 1 - 1e-6).sum(dim=1) - 1
        has_copy = copies > 0
        torch.testing.assert_close(scores[has_copy, 0], torch.ones(int(has_copy.sum())), rtol=0, atol=SCORE_TOL)


def test_cpu_torch_results_stay_on_cpu_and_half_inputs_work():
    queries, database = unit_rows(Q, seed=1), unit_rows(N, seed=2)
    scores, indices = knn_search(queries.double(), database.double(), K, backend="torch")
    assert scores.dtype == torch.float32 and scores.device.type == "cpu"
    _, ref_indices = reference_search(queries, database, K)
    assert torch.equal(indices, ref_indices)
    scores, indices = knn_search(queries.bfloat16(), database.bfloat16(), K, backend="torch")
    assert scores.dtype == torch.float32 and indices.shape == (Q, K)


def test_auto_backend(monkeypatch):
    queries, database = unit_rows(5, seed=1), unit_rows(50, seed=2)
    huge = torch.empty(10**9, 8, device="meta")  # a flat faiss index never beat torch (bench_knn_cpu.md)
    assert neighbors.pick_backend(queries, huge) == "torch"
    monkeypatch.setattr(neighbors, "TORCH_MAX_DATABASE", 49)
    assert neighbors.pick_backend(queries, database) == ("faiss" if neighbors.faiss_available() else "torch")
    ref = knn_search(queries, database, 3, backend="torch")
    assert torch.equal(knn_search(queries, database, 3)[1], ref[1])
    monkeypatch.setattr(neighbors, "TORCH_MAX_DATABASE", 50)
    assert neighbors.pick_backend(queries, database) == "torch"
    monkeypatch.setattr(neighbors, "TORCH_MAX_DATABASE", 0)
    monkeypatch.setattr(neighbors, "_load_faiss", lambda: None)
    assert neighbors.pick_backend(queries, database) == "torch"
    assert torch.equal(knn_search(queries, database, 3)[1], ref[1])


def test_ivf_with_every_list_probed_is_exact():
    faiss_or_skip()
    queries, database = unit_rows(Q, seed=1), unit_rows(N, seed=2)
    index = build_ivf_index(database, nlist=8, nprobe=8, train_size=400)
    scores, indices = search_index(index, queries, K)
    _, ref_indices = reference_search(queries, database, K)
    assert torch.equal(indices, ref_indices)
    assert_valid_top_k(scores, indices, queries, database, K)
    index.nprobe = 1  # approximate now: still valid rows, sorted
    scores, indices = search_index(index, queries, K)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_faiss_search_index_and_empty_ivf():
    faiss_or_skip()
    database = unit_rows(200, seed=2)
    index = build_ivf_index(database, nlist=4, nprobe=4, add=False)
    assert index.ntotal == 0
    neighbors.add_rows(index, database)
    assert torch.equal(search_index(index, database[:5], 1)[1].squeeze(1), torch.arange(5))


# ------------------------------------------------------------------------------------------ vote

def test_knn_vote_flips_a_mislabelled_point_and_keeps_an_agreed_one():
    # two tight clusters on the unit circle (d = 2): points 0-3 around angle 0, points 4-7 around pi/2
    angles = torch.tensor([0.0, 0.05, -0.05, 0.1, 1.57, 1.62, 1.52, 1.67])
    features = torch.stack([angles.cos(), angles.sin()], dim=1)
    probabilities = torch.tensor([
        [0.9, 0.1], [0.8, 0.2], [0.7, 0.3],
        [0.2, 0.8],  # point 3 sits in cluster 0 but says class 1
        [0.1, 0.9], [0.3, 0.7], [0.4, 0.6], [0.05, 0.95],
    ])
    refined = knn_vote(probabilities, features, k=3, backend="torch")
    assert refined.shape == probabilities.shape
    torch.testing.assert_close(refined.sum(dim=1), torch.ones(8))
    assert refined.argmax(dim=1).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # point 3's neighbours are 0, 1, 2 (confidences 0.9, 0.8, 0.7), all class 0
    torch.testing.assert_close(refined[3], torch.tensor([1.0, 0.0]))
    # point 0's neighbours are 1, 2 (class 0, 0.8 + 0.7) and 3 (class 1, 0.8)
    torch.testing.assert_close(refined[0], torch.tensor([1.5, 0.8]) / 2.3)


@pytest.mark.parametrize("backend", backends())
def test_knn_vote_backends_agree_and_zero_votes_fall_back(backend):
    features = unit_rows(120, dim=8, seed=5)
    probabilities = torch.softmax(torch.randn(120, 4, generator=torch.Generator().manual_seed(6)), dim=1)
    refined = knn_vote(probabilities, features, k=5, backend=backend)
    torch.testing.assert_close(refined, knn_vote(probabilities, features, k=5, backend="torch"))
    torch.testing.assert_close(refined.sum(dim=1), torch.ones(120))
    zero = torch.zeros(120, 4)
    zero[0] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # only sample 0 has confidence: others' votes have weight 0
    refined = knn_vote(zero, features, k=5, backend=backend)
    votes_for_0 = (knn_search(features, features, 5, exclude_self=True)[1] == 0).any(dim=1)
    assert torch.equal(refined[~votes_for_0], zero[~votes_for_0])
    assert (refined[votes_for_0 & (torch.arange(120) > 0)].argmax(dim=1) == 3).all()


# ------------------------------------------------------------------------------------------ errors

def test_argument_errors():
    queries, database = unit_rows(4), unit_rows(10)
    with pytest.raises(ValueError, match="k must be in \\[1, 10\\]"):
        knn_search(queries, database, 11)
    with pytest.raises(ValueError, match="k must be in \\[1, 9\\].*minus the query itself"):
        knn_search(database, database, 10, exclude_self=True)
    with pytest.raises(ValueError, match="k must be"):
        knn_search(queries, database, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        knn_search(queries, database, 2.0)
    with pytest.raises(ValueError, match="database must have 33 columns"):
        knn_search(queries, unit_rows(10, dim=8), 2)
    with pytest.raises(ValueError, match="queries must be 2-D"):
        knn_search(queries[0], database, 2)
    with pytest.raises(ValueError, match="database must be 2-D"):
        knn_search(queries, database[0], 2)
    with pytest.raises(TypeError, match="queries must be one of .*float32.*, got torch.int64"):
        knn_search(queries.long(), database, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        knn_search(queries, database, 2, backend="annoy")
    with pytest.raises(ValueError, match="exclude_self=True needs"):
        knn_search(queries, database, 2, exclude_self=True)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        knn_search(queries, database, 2, chunk_size=0)
    with pytest.raises(ValueError, match="probabilities must have one row per feature row"):
        knn_vote(torch.ones(3, 2), database, 2)
    with pytest.raises(ValueError, match="features must be 2-D"):
        knn_vote(torch.ones(10, 2), database[0], 2)
    if neighbors.faiss_available():
        with pytest.raises(ValueError, match="nprobe must be in \\[1, 2\\]"):
            build_ivf_index(database, nlist=2, nprobe=3)
        with pytest.raises(ValueError, match="nlist must be in \\[1, 10\\]"):
            build_ivf_index(database, nlist=11)
