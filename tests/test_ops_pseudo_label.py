"""coft_fast.ops pseudo-label ops: the C++/CUDA kernels (coft_fast._C) against the plain-torch
references below and against NumPy.

Tolerances: labels, counts, histograms and indices must be identical; confidences (float32) agree
to rtol 1e-5, atol 1e-7 (different but equally accurate summation orders and exp implementations).
A histogram may differ from the reference only by rows whose confidence lies within 1e-5 of a bin
edge (a 1-ulp difference can move such a row); it must always equal the histogram of the kernel's
own confidences exactly.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import coft_fast.ops as ops
from coft_fast.ops import _extension
from coft_fast.ops._checks import check_labels
from coft_fast.ops.pseudo_label import PseudoLabelStats, _check_logits, _check_topk_args

RTOL, ATOL = 1e-5, 1e-7
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

CUDA_SKIP = pytest.mark.skipif(
    not torch.cuda.is_available() or not _extension.has_cuda_kernels(),
    reason="needs a GPU and coft_fast._C built with its CUDA kernels (COFT_BUILD_CUDA=1 or auto with a GPU)",
)
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_SKIP)]


# the references: plain torch, the kernels' ground truth
def pseudo_label_stats_reference(logits: torch.Tensor, num_bins: int = 10) -> PseudoLabelStats:
    _check_logits(logits, num_bins)
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one class column, got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    x = logits.float()
    probabilities = x.softmax(dim=1)
    if probabilities.isnan().any():
        raise ValueError("logits must be finite (no NaN or +inf, and not a row of only -inf)")
    # the logits' own arg-max: no ties that rounding of the probabilities could create
    labels = x.argmax(dim=1) if x.shape[0] else torch.zeros(0, dtype=torch.int64, device=x.device)
    confidence = probabilities.gather(1, labels[:, None]).squeeze(1)
    counts = torch.bincount(labels, minlength=num_classes)
    bins = (confidence * num_bins).long().clamp_(0, num_bins - 1)
    hist = torch.bincount(labels * num_bins + bins, minlength=num_classes * num_bins).view(num_classes, num_bins)
    return PseudoLabelStats(labels, confidence, counts, hist)


def class_balanced_topk_reference(labels: torch.Tensor, scores: torch.Tensor, k: int,
                                  num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per class the indices of its k best-scoring samples (ties: lower index first), ordered by class
    then by descending score; and the (C,) count each class got."""
    _check_topk_args(labels, scores, k, num_classes)
    check_labels("labels", labels, num_classes=num_classes)
    if scores.isnan().any():
        raise ValueError("scores must not contain NaN")
    # sort by (class, -score, index): stable sorts, least significant key first
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    sorted_labels = labels[order]
    counts_all = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts_all, 0) - counts_all
    rank = torch.arange(labels.numel(), device=labels.device) - starts[sorted_labels]
    chosen = order[rank < k]
    return chosen, torch.clamp(counts_all, max=k)


def agreement_matrix_reference(labels_a: torch.Tensor, labels_b: torch.Tensor, num_classes: int,
                               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(C, C) int64 counts of (labels_a[i], labels_b[i]) pairs, over the rows where ``mask`` is true."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    check_labels("labels_a", labels_a, num_classes=num_classes)
    check_labels("labels_b", labels_b, labels_a.shape[0], num_classes)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != labels_a.shape:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(labels_a.shape)}")
        labels_a, labels_b = labels_a[mask], labels_b[mask]
    pairs = labels_a * num_classes + labels_b
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


def cpu_isas():
    """The CPU SIMD paths this machine can run (the stats kernel picks one at run time)."""
    names = []
    for isa in ("scalar", "avx2", "avx512"):
        try:
            torch.ops.coft_fast._cpu_isa(isa)
            names.append(isa)
        except ValueError:
            pass
    torch.ops.coft_fast._cpu_isa("auto")
    return names


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def cpu_isa(request):
    if request.param not in cpu_isas():
        pytest.skip(f"this CPU cannot run the {request.param} path")
    torch.ops.coft_fast._cpu_isa(request.param)
    yield request.param
    torch.ops.coft_fast._cpu_isa("auto")


# ------------------------------------------------------------------------------------------------
# NumPy references (independent of torch)
def numpy_stats(logits: torch.Tensor, num_bins: int):
    x = logits.float().cpu().numpy().astype(np.float64)
    n, c = x.shape
    labels = np.argmax(x, axis=1) if n else np.zeros(0, dtype=np.int64)  # first maximal index
    m = x.max(axis=1, keepdims=True) if n else np.zeros((0, 1))
    confidence = 1.0 / np.exp(x - m).sum(axis=1)
    counts = np.bincount(labels, minlength=c)
    return labels, confidence, counts


def numpy_topk(labels: torch.Tensor, scores: torch.Tensor, k: int, num_classes: int):
    lab = labels.cpu().numpy()
    sc = scores.double().cpu().numpy()
    idx = np.arange(lab.size)
    order = np.lexsort((idx, -sc, lab))  # last key is primary: class, then score desc, then index
    class_counts = np.bincount(lab, minlength=num_classes)
    rank = np.arange(lab.size) - (np.cumsum(class_counts) - class_counts)[lab[order]]
    return order[rank < k].astype(np.int64), np.minimum(class_counts, k)


def numpy_agreement(a: torch.Tensor, b: torch.Tensor, num_classes: int, mask=None):
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    keep = np.ones(a.numel(), dtype=bool) if mask is None else mask.cpu().numpy()
    np.add.at(out, (a.cpu().numpy()[keep], b.cpu().numpy()[keep]), 1)
    return out


# ------------------------------------------------------------------------------------------------
def hist_of(labels, confidence, num_classes, num_bins):
    bins = (confidence.float() * num_bins).long().clamp_(0, num_bins - 1)
    return torch.bincount(labels * num_bins + bins, minlength=num_classes * num_bins).view(num_classes, num_bins)


def assert_stats_match(got, logits, num_bins):
    ref = pseudo_label_stats_reference(logits.cpu(), num_bins)
    n, c = logits.shape
    assert got.labels.dtype == torch.int64 and got.labels.shape == (n,)
    assert got.confidence.dtype == torch.float32 and got.confidence.shape == (n,)
    assert got.class_counts.dtype == torch.int64 and got.class_counts.shape == (c,)
    assert got.confidence_hist.dtype == torch.int64 and got.confidence_hist.shape == (c, num_bins)
    labels, conf = got.labels.cpu(), got.confidence.cpu()
    assert torch.equal(labels, ref.labels)
    torch.testing.assert_close(conf, ref.confidence, rtol=RTOL, atol=ATOL)
    assert torch.equal(got.class_counts.cpu(), ref.class_counts)
    hist = got.confidence_hist.cpu()
    assert torch.equal(hist, hist_of(labels, conf, c, num_bins))
    assert torch.equal(hist.sum(1), got.class_counts.cpu())
    scaled = ref.confidence.double() * num_bins
    near_edge = int(((scaled - scaled.round()).abs() < 1e-5 * num_bins).sum())
    assert int((hist - ref.confidence_hist).abs().sum()) <= 2 * near_edge
    # NumPy, in float64
    np_labels, np_conf, np_counts = numpy_stats(logits, num_bins)
    assert np.array_equal(labels.numpy(), np_labels)
    np.testing.assert_allclose(conf.numpy(), np_conf, rtol=RTOL, atol=ATOL)
    assert np.array_equal(got.class_counts.cpu().numpy(), np_counts)


def assert_topk_match(got, labels, scores, k, num_classes):
    indices, counts = got
    ref_indices, ref_counts = class_balanced_topk_reference(labels.cpu(), scores.cpu(), k, num_classes)
    assert indices.dtype == torch.int64 and counts.dtype == torch.int64 and counts.shape == (num_classes,)
    assert torch.equal(indices.cpu(), ref_indices)
    assert torch.equal(counts.cpu(), ref_counts)
    np_indices, np_counts = numpy_topk(labels, scores, k, num_classes)
    assert np.array_equal(indices.cpu().numpy(), np_indices)
    assert np.array_equal(counts.cpu().numpy(), np_counts)


# ------------------------------------------------------------------------------------------------
def test_extension_loaded_and_ops_registered():
    assert _extension.available(), _extension.BUILD_HINT
    for name in ("pseudo_label_stats", "class_balanced_topk", "agreement_matrix"):
        assert hasattr(torch.ops.coft_fast, name)
        assert _extension.has_kernel(name, "CPU")


def test_cuda_kernels_only_in_cuda_builds():
    # a CPU-only build lacks the CUDA kernels entirely; a CUDA build has all three
    cuda = [_extension.has_kernel(name, "CUDA") for name in ("pseudo_label_stats", "class_balanced_topk", "agreement_matrix")]
    assert all(cuda) or not any(cuda)


def test_missing_extension_raises_import_error_with_build_hint(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "_load_error", ImportError("No module named 'coft_fast._C'"))
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e"):
        ops.pseudo_label_stats(torch.zeros(2, 3))
    with pytest.raises(ImportError, match="coft_fast._C"):
        ops.class_balanced_topk(torch.zeros(2, dtype=torch.int64), torch.zeros(2), 1, 3)


# ---- pseudo_label_stats ------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,c", [(0, 5), (1, 1), (7, 1), (100, 3), (33, 16), (257, 1000), (1000, 17), (64, 129)])
@pytest.mark.parametrize("num_bins", [1, 10, 7])
def test_stats_parity(device, n, c, num_bins):
    g = torch.Generator().manual_seed(n * 1000 + c)
    logits = (torch.randn(n, c, generator=g) * 3).to(device)
    got = ops.pseudo_label_stats(logits, num_bins)
    assert isinstance(got, ops.PseudoLabelStats)
    assert got.labels.device == logits.device
    assert_stats_match(got, logits, num_bins)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_stats_dtypes_are_computed_in_float32(dtype, device):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(300, 50, generator=g) * 4).to(dtype).to(device)
    assert_stats_match(ops.pseudo_label_stats(logits, 10), logits, 10)


def test_stats_every_cpu_simd_path(cpu_isa):
    g = torch.Generator().manual_seed(2)
    for c in (1, 2, 7, 8, 15, 16, 17, 31, 33, 64, 65, 100, 1000):  # every tail length of 8/16/64 lanes
        logits = torch.randn(50, c, generator=g) * 5
        logits[::7, -1] = logits[::7].max(dim=1).values + 1  # the maximum in the tail
        if c > 1:
            logits[1::7, 0] = float("-inf")  # a masked class
        assert_stats_match(ops.pseudo_label_stats(logits, 10), logits, 10)


@pytest.mark.parametrize("device", DEVICES)
def test_stats_ties_go_to_the_lower_class(device):
    logits = torch.zeros(6, 40)
    logits[1, [3, 7, 39]] = 2.0
    logits[2, [38, 39]] = 1.0
    logits[3, 17:] = 5.0
    logits[4] = -3.0
    logits[5, 20] = 1.0
    got = ops.pseudo_label_stats(logits.to(device), 4)
    assert got.labels.tolist() == [0, 3, 38, 17, 0, 20]
    torch.testing.assert_close(got.confidence[0].cpu(), torch.tensor(1 / 40))  # all equal: 1 / C
    assert_stats_match(got, logits, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_stats_confidence_one_falls_in_the_last_bin(device):
    one_class = torch.randn(9, 1)
    got = ops.pseudo_label_stats(one_class.to(device), 5)
    assert torch.equal(got.confidence.cpu(), torch.ones(9))
    assert got.confidence_hist.cpu().tolist() == [[0, 0, 0, 0, 9]]
    certain = torch.tensor([[0.0, -200.0, -300.0], [-500.0, 0.0, float("-inf")]])
    got = ops.pseudo_label_stats(certain.to(device), 10)
    assert got.confidence.cpu().tolist() == [1.0, 1.0]
    assert got.confidence_hist.cpu()[:, 9].tolist() == [1, 1, 0]
    half = ops.pseudo_label_stats(torch.zeros(3, 2, device=device), 2)  # confidence 0.5: bin 1 of 2
    assert half.confidence_hist.cpu().tolist() == [[0, 3], [0, 0]]


@pytest.mark.parametrize("device", DEVICES)
def test_stats_empty_classes_and_empty_input(device):
    logits = torch.full((5, 6), -1.0)
    logits[:, 2] = 3.0
    got = ops.pseudo_label_stats(logits.to(device))
    assert got.class_counts.cpu().tolist() == [0, 0, 5, 0, 0, 0]
    assert int(got.confidence_hist.sum()) == 5
    empty = ops.pseudo_label_stats(torch.zeros(0, 4, device=device), 3)
    assert empty.labels.shape == (0,) and empty.confidence.shape == (0,)
    assert empty.class_counts.tolist() == [0] * 4 and empty.confidence_hist.shape == (4, 3)
    assert int(empty.confidence_hist.abs().sum()) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_stats_non_contiguous_and_requires_grad(device):
    base = torch.randn(40, 30, device=device, requires_grad=True)
    logits = base.t()  # (30, 40), transposed view
    got = ops.pseudo_label_stats(logits, 10)
    assert not got.confidence.requires_grad
    assert_stats_match(got, logits.detach(), 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_stats_rejects_nan_and_positive_inf(device, bad):
    logits = torch.randn(10, 4)
    logits[6, 2] = bad
    with pytest.raises(ValueError, match="logits must be finite.*row 6"):
        ops.pseudo_label_stats(logits.to(device))
    with pytest.raises(ValueError, match="logits must be finite"):
        pseudo_label_stats_reference(logits)
    all_masked = torch.zeros(3, 4)
    all_masked[1] = float("-inf")
    with pytest.raises(ValueError, match="row 1"):
        ops.pseudo_label_stats(all_masked.to(device))


@pytest.mark.parametrize("num_classes", [7, 70, 1000])
def test_stats_every_cpu_simd_path_finds_a_nan_anywhere(cpu_isa, num_classes):
    """The SIMD kernels find a NaN through the sum (or a NaN maximum), not a separate scan: a NaN
    in the unrolled body, in the one-vector loop or in the masked tail, in a row of finite values
    or of -inf values, must still reject the row by its number; -inf entries stay allowed."""
    for column in sorted({0, 17, 63, num_classes // 2, num_classes - 1} & set(range(num_classes))):
        for rest_of_row in ("finite", "-inf"):
            logits = torch.randn(5, num_classes)
            if rest_of_row == "-inf":
                logits[3] = float("-inf")
            logits[3, column] = float("nan")
            with pytest.raises(ValueError, match="logits must be finite.*row 3"):
                ops.pseudo_label_stats(logits)
    clean = torch.randn(6, num_classes)
    clean[:, 0] = float("-inf")
    assert_stats_match(ops.pseudo_label_stats(clean, 10), clean, 10)


@pytest.mark.parametrize("num_classes", [7, 70, 1000])
def test_stats_every_cpu_simd_path_handles_values_far_below_the_max(cpu_isa, num_classes):
    """Entries far below the row maximum (where exp underflows to subnormals or to 0, and where the
    AVX-512 exponential has no clamp) add nothing wrong: confidences match the reference, and a row
    whose other entries all underflow has confidence exactly 1."""
    g = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(8, num_classes, generator=g) * 3
    far = torch.tensor([-88.0, -95.0, -103.0, -110.0, -150.0, -1e4, -1e30, float("-inf")])
    for row in range(8):  # each row gets the far values at spread-out columns, as offsets from its max
        columns = torch.randperm(num_classes, generator=g)[: min(num_classes - 1, 8)]
        logits[row, columns] = logits[row].max() + 10.0 + far[: len(columns)]
    assert_stats_match(ops.pseudo_label_stats(logits, 10), logits, 10)
    lonely = torch.full((3, num_classes), -1e30)
    lonely[:, 1] = torch.tensor([0.0, 50.0, -7.5])
    lonely[1, 2:] = float("-inf")
    lonely[2, 2:] = torch.linspace(-7.5 - 104.0, -7.5 - 200.0, num_classes - 2)  # all below exp's range
    got = ops.pseudo_label_stats(lonely, 10)
    assert got.labels.tolist() == [1, 1, 1]
    assert got.confidence.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("device", DEVICES)
def test_stats_validation_names_the_argument(device):
    with pytest.raises(ValueError, match="logits must be a 2-D"):
        ops.pseudo_label_stats(torch.zeros(5, device=device))
    with pytest.raises(TypeError, match="logits must be floating point"):
        ops.pseudo_label_stats(torch.zeros(5, 3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="at least one class"):
        ops.pseudo_label_stats(torch.zeros(5, 0, device=device))
    with pytest.raises(ValueError, match="num_bins must be >= 1"):
        ops.pseudo_label_stats(torch.zeros(5, 3, device=device), 0)
    with pytest.raises(TypeError, match="logits must be a tensor"):
        ops.pseudo_label_stats([[0.0, 1.0]])


def test_stats_deterministic_across_thread_counts():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(20000, 100, generator=g) * 4
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.pseudo_label_stats(logits, 10)
        torch.set_num_threads(max(2, threads))
        many = ops.pseudo_label_stats(logits, 10)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# ---- class_balanced_topk -----------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,c,k", [(0, 3, 4), (1, 1, 1), (50, 1, 10), (50, 1, 100), (200, 7, 0), (200, 7, 5),
                                   (200, 7, 1000), (5000, 100, 16), (3000, 1000, 2)])
def test_topk_parity(device, n, c, k):
    g = torch.Generator().manual_seed(n + c + k)
    labels = torch.randint(0, c, (n,), generator=g)
    scores = torch.rand(n, generator=g)
    got = ops.class_balanced_topk(labels.to(device), scores.to(device), k, c)
    assert got[0].device == labels.to(device).device
    assert_topk_match(got, labels, scores, k, c)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_empty_classes_ties_and_ordering(device):
    labels = torch.tensor([2, 0, 2, 2, 0, 4, 2, 2])
    scores = torch.tensor([0.5, 0.1, 0.9, 0.5, 0.1, 0.3, -0.0, 0.0])
    indices, counts = ops.class_balanced_topk(labels.to(device), scores.to(device), 3, 6)
    # class 0: equal scores -> lower index first; class 2: 0.9, then the tie 0.5/0.5 by index
    assert indices.tolist() == [1, 4, 2, 0, 3, 5]
    assert counts.tolist() == [2, 0, 3, 0, 1, 0]
    equal = torch.full((9,), 0.25)
    indices, counts = ops.class_balanced_topk(torch.zeros(9, dtype=torch.int64, device=device), equal.to(device), 4, 1)
    assert indices.tolist() == [0, 1, 2, 3] and counts.tolist() == [4]
    zeros = torch.tensor([0.0, -0.0, 0.0, -0.0])  # -0.0 == 0.0: ties, by index
    indices, _ = ops.class_balanced_topk(torch.zeros(4, dtype=torch.int64, device=device), zeros.to(device), 3, 1)
    assert indices.tolist() == [0, 1, 2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["ascending", "descending", "sawtooth", "constant"])
def test_topk_adversarial_score_orders(device, order):
    # large enough for several CPU chunks; ascending scores make every sample displace a kept one
    n, c, k = 120000, 37, 50
    labels = torch.arange(n) % c
    i = torch.arange(n, dtype=torch.float64)
    scores = {"ascending": i, "descending": -i, "sawtooth": i % 1000, "constant": torch.zeros(n, dtype=torch.float64)}[order]
    scores = scores.float()
    got = ops.class_balanced_topk(labels.to(device), scores.to(device), k, c)
    assert_topk_match(got, labels, scores, k, c)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_topk_score_dtypes_with_many_ties(dtype, device):
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 13, (2000,), generator=g)
    scores = (torch.randint(0, 8, (2000,), generator=g) / 8).to(dtype)  # exact in every dtype: many ties
    scores[::11] = float("-inf")
    scores[5::17] = float("inf")
    got = ops.class_balanced_topk(labels.to(device), scores.to(device), 9, 13)
    assert_topk_match(got, labels, scores, 9, 13)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_validation_names_the_argument(device):
    labels = torch.tensor([0, 1, 2], device=device)
    scores = torch.rand(3, device=device)
    with pytest.raises(TypeError, match="labels must be a 1-D int64"):
        ops.class_balanced_topk(labels.int(), scores, 1, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\], got 2 at index 2"):
        ops.class_balanced_topk(labels, scores, 1, 2)
    with pytest.raises(ValueError, match="labels must lie"):
        ops.class_balanced_topk(torch.tensor([0, -1, 0], device=device), scores, 1, 3)
    with pytest.raises(ValueError, match="scores must be a float tensor of shape"):
        ops.class_balanced_topk(labels, scores[:2], 1, 3)
    with pytest.raises(ValueError, match="scores must be a float tensor"):
        ops.class_balanced_topk(labels, labels, 1, 3)
    with pytest.raises(ValueError, match="k must be >= 0"):
        ops.class_balanced_topk(labels, scores, -1, 3)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        ops.class_balanced_topk(labels, scores, 1, 0)
    with pytest.raises(ValueError, match="scores must not contain NaN"):
        ops.class_balanced_topk(labels, torch.tensor([0.1, float("nan"), 0.2], device=device), 1, 3)


@CUDA_SKIP
def test_topk_and_agreement_device_mismatch_is_an_error():
    with pytest.raises(ValueError, match="scores must be on the same device as labels"):
        ops.class_balanced_topk(torch.zeros(2, dtype=torch.int64, device="cuda"), torch.zeros(2), 1, 1)
    with pytest.raises(ValueError, match="labels_b must be on the same device as labels_a"):
        ops.agreement_matrix(torch.zeros(2, dtype=torch.int64, device="cuda"), torch.zeros(2, dtype=torch.int64), 1)


def test_topk_deterministic_across_thread_counts():
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 50, (100000,), generator=g)
    scores = torch.randint(0, 100, (100000,), generator=g).float()  # many ties
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.class_balanced_topk(labels, scores, 40, 50)
        torch.set_num_threads(max(2, threads))
        many = ops.class_balanced_topk(labels, scores, 40, 50)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    assert_topk_match(many, labels, scores, 40, 50)


# ---- agreement_matrix --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,c", [(0, 4), (1, 1), (100, 1), (500, 7), (100000, 30), (2000, 300)])
@pytest.mark.parametrize("masked", [False, True])
def test_agreement_parity(device, n, c, masked):
    g = torch.Generator().manual_seed(n + c)
    a = torch.randint(0, c, (n,), generator=g)
    b = torch.where(torch.rand(n, generator=g) < 0.7, a, torch.randint(0, c, (n,), generator=g))
    mask = torch.rand(n, generator=g) < 0.6 if masked else None
    got = ops.agreement_matrix(a.to(device), b.to(device), c, None if mask is None else mask.to(device))
    assert got.dtype == torch.int64 and got.shape == (c, c) and got.device == a.to(device).device
    assert torch.equal(got.cpu(), agreement_matrix_reference(a, b, c, mask))
    assert np.array_equal(got.cpu().numpy(), numpy_agreement(a, b, c, mask))


@pytest.mark.parametrize("device", DEVICES)
def test_agreement_mask_all_false_and_validation(device):
    a = torch.tensor([0, 1, 2, 2], device=device)
    b = torch.tensor([0, 2, 2, 1], device=device)
    assert int(ops.agreement_matrix(a, b, 3, torch.zeros(4, dtype=torch.bool, device=device)).abs().sum()) == 0
    assert ops.agreement_matrix(a, b, 3).cpu().tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    with pytest.raises(ValueError, match="labels_b must have 4 entries"):
        ops.agreement_matrix(a, b[:3], 3)
    with pytest.raises(TypeError, match="labels_a must be a 1-D int64"):
        ops.agreement_matrix(a.float(), b, 3)
    with pytest.raises(ValueError, match=r"labels_b must lie in \[0, 1\], got 2 at index 1"):
        ops.agreement_matrix(torch.tensor([0, 1, 1, 1], device=device), b, 2)
    with pytest.raises(ValueError, match="labels_a must lie"):
        # out-of-range labels are errors even on rows the mask drops
        ops.agreement_matrix(torch.tensor([0, 1, 2, 5], device=device), b, 3, torch.tensor([True, True, True, False], device=device))
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        ops.agreement_matrix(a, b, 3, torch.ones(4, device=device))
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        ops.agreement_matrix(a, b, 0)


# ---- properties over random shapes (hypothesis) -------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 300), c=st.integers(1, 70), num_bins=st.integers(1, 12), k=st.integers(0, 12),
       levels=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(FLOAT_DTYPES))
def test_property_all_ops_match_references(n, c, num_bins, k, levels, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    # logits on a coarse grid: exact ties between classes are common
    logits = (torch.randint(0, levels + 1, (n, c), generator=g).float() * 1.5 - 3).to(dtype)
    stats = ops.pseudo_label_stats(logits, num_bins)
    assert_stats_match(stats, logits, num_bins)
    scores = stats.confidence.clone()
    scores[torch.rand(n, generator=g) < 0.3] = 0.5  # plus ties in the scores
    assert_topk_match(ops.class_balanced_topk(stats.labels, scores, k, c), stats.labels, scores, k, c)
    other = torch.randint(0, c, (n,), generator=g)
    mask = torch.rand(n, generator=g) < 0.5
    for m in (None, mask):
        got = ops.agreement_matrix(stats.labels, other, c, m)
        assert torch.equal(got, agreement_matrix_reference(stats.labels, other, c, m))


# ---- torch.library checks and torch.compile ----------------------------------------------------
def _opcheck_samples(device):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(64, 10, generator=g).to(device)
    labels = torch.randint(0, 10, (64,), generator=g).to(device)
    scores = torch.rand(64, generator=g).to(device)
    mask = (torch.rand(64, generator=g) < 0.5).to(device)
    return [
        (torch.ops.coft_fast.pseudo_label_stats.default, (logits, 10)),
        (torch.ops.coft_fast.pseudo_label_stats.default, (logits.double()[:0], 3)),
        (torch.ops.coft_fast.class_balanced_topk.default, (labels, scores, 3, 10)),
        (torch.ops.coft_fast.class_balanced_topk.default, (labels, scores, 0, 12)),
        (torch.ops.coft_fast.agreement_matrix.default, (labels, labels.flip(0), 10, mask)),
        (torch.ops.coft_fast.agreement_matrix.default, (labels, labels, 10, None)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_trace_under_torch_compile(device):
    torch._dynamo.reset()

    def select(logits, k: int):
        stats = ops.pseudo_label_stats(logits, 10)
        indices, counts = ops.class_balanced_topk(stats.labels, stats.confidence, k, logits.shape[1])
        agree = ops.agreement_matrix(stats.labels, stats.labels, logits.shape[1])
        return stats.class_counts, stats.confidence_hist, indices, counts, agree

    graphs = []

    def recording_aot_eager(gm, inputs):  # AOTAutograd runs the fake kernels
        graphs.append(str(gm.code))
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    compiled = torch.compile(select, backend=recording_aot_eager, fullgraph=True, dynamic=True)
    for n in (200, 333):
        logits = torch.randn(n, 12, device=device) * 3
        for got, want in zip(compiled(logits, 4), select(logits, 4)):
            assert torch.equal(got, want)
    assert len(graphs) == 1  # one graph, no recompilation for a new N
    for name in ("pseudo_label_stats", "class_balanced_topk", "agreement_matrix"):
        assert f"torch.ops.coft_fast.{name}" in graphs[0]


@pytest.mark.slow
def test_ops_under_inductor():
    torch._dynamo.reset()

    def select(logits):
        stats = ops.pseudo_label_stats(logits * 2.0, 5)
        indices, counts = ops.class_balanced_topk(stats.labels, stats.confidence, 3, logits.shape[1])
        return indices, counts, stats.confidence_hist

    logits = torch.randn(100, 8)
    for got, want in zip(torch.compile(select, fullgraph=True)(logits), select(logits)):
        assert torch.equal(got, want)


# ---- CUDA against CPU on a larger case ----------------------------------------------------------
@CUDA_SKIP
def test_cuda_matches_cpu_on_a_large_case():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(50000, 1000, generator=g) * 3
    cpu = ops.pseudo_label_stats(logits, 10)
    gpu = ops.pseudo_label_stats(logits.cuda(), 10)
    assert torch.equal(gpu.labels.cpu(), cpu.labels) and torch.equal(gpu.class_counts.cpu(), cpu.class_counts)
    torch.testing.assert_close(gpu.confidence.cpu(), cpu.confidence, rtol=RTOL, atol=ATOL)
    for a, b in zip(ops.class_balanced_topk(gpu.labels, gpu.confidence, 16, 1000),
                    class_balanced_topk_reference(gpu.labels.cpu(), gpu.confidence.cpu(), 16, 1000)):
        assert torch.equal(a.cpu(), b)
    # deterministic: a second run is bitwise identical
    again = ops.pseudo_label_stats(logits.cuda(), 10)
    for a, b in zip(gpu, again):
        assert torch.equal(a, b)
