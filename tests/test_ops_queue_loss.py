"""coft_fast.ops.queue_info_nce / enqueue: the chunked reference and the Triton kernel (under
TRITON_INTERPRET=1 without a GPU) against MoCo's eager formulation in fp64 (forward and the gradients
of q and k), odd shapes, fp32 / fp16 / bf16 and mixed queue dtypes, the memory property (nothing of
size N x K is kept for backward), the FIFO wrap-around, and every argument error."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import coft_fast.ops as ops
from coft_fast.ops.queue_loss import queue_info_nce_eager, queue_info_nce_reference

# max-norm error relative to the largest fp64 magnitude (after rounding the inputs to the dtype);
# the loss also gets an absolute term since it is a difference of logits of size 1 / T.
LOSS_TOL, LOSS_ATOL = 2e-6, 2e-5
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
T = 0.07


def kernels_or_skip():
    from coft_fast.kernels import triton_installed, triton_runnable

    if not triton_installed() or not (torch.cuda.is_available() or triton_runnable(torch.device("cpu"))):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def make_inputs(n, size, d, dtype, queue_dtype=None, seed=0, dev=None):
    """Unit-norm queries, positives near them, and a queue holding a few near-duplicates of the queries
    (so that some negatives compete with the positive)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(q + 0.6 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    queue = torch.randn(size, d, generator=g, dtype=torch.float64)
    near = torch.randint(0, n, (size // 4,), generator=g)
    queue[: size // 4] = q[near] + 0.7 * queue[: size // 4]
    queue = F.normalize(queue, dim=1)
    dev = dev or device()
    return q.to(dev, dtype), k.to(dev, dtype), queue.to(dev, queue_dtype or dtype)


def assert_close(actual, expected, tol, what, atol=0.0):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    err = (actual - expected).abs().max().item()
    bound = tol * max(expected.abs().max().item(), 1e-3) + atol
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def run(fn, q, k, queue, temperature=T, **kw):
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    loss = fn(q, k, queue, temperature, **kw)
    loss.backward()
    return loss, q.grad, k.grad


def eager64(q, k, queue, temperature=T):
    return run(queue_info_nce_eager, q.double(), k.double(), queue.double(), temperature)


def triton_loss(q, k, queue, temperature, splits=None):
    from coft_fast.ops.queue_loss import queue_info_nce_triton

    return queue_info_nce_triton(q, k, queue, temperature, splits=splits)


def check_against_eager(fn, q, k, queue, temperature=T, what="", **kw):
    loss, dq, dk = run(fn, q, k, queue, temperature, **kw)
    ref_loss, ref_dq, ref_dk = eager64(q, k, queue, temperature)
    assert loss.shape == ()
    assert loss.dtype == torch.promote_types(q.dtype, torch.float32)
    assert dq.dtype == q.dtype and dk.dtype == k.dtype
    tol = GRAD_TOL[q.dtype] if q.dtype != torch.float64 else GRAD_TOL[torch.float64]
    assert_close(loss, ref_loss, LOSS_TOL if q.dtype != torch.float64 else 1e-12, f"loss {what}",
                 LOSS_ATOL if q.dtype != torch.float64 else 0.0)
    assert_close(dq, ref_dq, tol, f"dq {what}")
    assert_close(dk, ref_dk, tol, f"dk {what}")


# (N, K, d): K never a multiple of the kernels' queue tile (64 under the interpreter)
SHAPES = [(1, 100, 16), (3, 333, 48), (70, 257, 64), (70, 1000, 16)]


# ------------------------------------------------------------------------------ chunked reference

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,size,d", SHAPES)
def test_reference_matches_eager(n, size, d, dtype):
    q, k, queue = make_inputs(n, size, d, dtype, seed=n + size, dev=torch.device("cpu"))
    check_against_eager(queue_info_nce_reference, q, k, queue, what=f"{dtype}")


@pytest.mark.parametrize("chunk", [1, 7, 64, 256, 5000])
def test_reference_chunk_sizes(chunk):
    q, k, queue = make_inputs(5, 300, 16, torch.float64, seed=chunk, dev=torch.device("cpu"))
    check_against_eager(queue_info_nce_reference, q, k, queue, what=f"chunk={chunk}", chunk=chunk)


def test_reference_computes_in_float32_under_autocast():
    q, k, queue = make_inputs(16, 300, 32, torch.float32, dev=torch.device("cpu"))
    expect = queue_info_nce_reference(q, k, queue, T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.queue_info_nce(q, k, queue, T, backend="reference")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expect)


# ----------------------------------------------------------------------------------- Triton parity

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,size,d", SHAPES)
def test_triton_matches_eager(n, size, d, dtype):
    kernels_or_skip()
    q, k, queue = make_inputs(n, size, d, dtype, seed=n * size)
    check_against_eager(triton_loss, q, k, queue, what=f"{dtype}")


def test_triton_bfloat16():
    kernels_or_skip()
    q, k, queue = make_inputs(70, 257, 64, torch.bfloat16, seed=2)
    check_against_eager(triton_loss, q, k, queue, what="bf16")


@pytest.mark.parametrize("fn", ["reference", "triton"])
@pytest.mark.parametrize("queue_dtype", [torch.bfloat16, torch.float16])
def test_queue_in_its_own_storage_dtype(fn, queue_dtype):
    """fp32 queries against a half-precision queue (the queue is streamed in its storage dtype)."""
    if fn == "triton":
        kernels_or_skip()
    q, k, queue = make_inputs(33, 300, 48, torch.float32, queue_dtype=queue_dtype, seed=4)
    check_against_eager(triton_loss if fn == "triton" else queue_info_nce_reference, q, k, queue,
                        what=f"queue {queue_dtype}")


@pytest.mark.parametrize("splits", [2, 3, 7, 40])
def test_triton_queue_slices_merge(splits):
    """The split over the queue with its merge: uneven slices, slices inside one tile, empty slices."""
    kernels_or_skip()
    q, k, queue = make_inputs(20, 300, 16, torch.float32, seed=splits)
    check_against_eager(triton_loss, q, k, queue, what=f"splits={splits}", splits=splits)


@pytest.mark.parametrize("temperature", [0.01, 0.2, 1.0])
@pytest.mark.parametrize("fn", ["reference", "triton"])
def test_temperatures_and_saturation(fn, temperature):
    """Low temperatures with the positive key equal to the query (logit 100): stays finite and exact."""
    if fn == "triton":
        kernels_or_skip()
    q, k, queue = make_inputs(6, 130, 32, torch.float32, seed=9)
    k = q.clone()
    check_against_eager(triton_loss if fn == "triton" else queue_info_nce_reference, q, k, queue, temperature,
                        what=f"T={temperature}")


@pytest.mark.parametrize("fn", ["reference", "triton"])
def test_gradient_to_one_input_and_none(fn):
    if fn == "triton":
        kernels_or_skip()
    impl = triton_loss if fn == "triton" else queue_info_nce_reference
    q, k, queue = make_inputs(9, 200, 16, torch.float32, seed=1)
    ref_loss, ref_dq, ref_dk = eager64(q, k, queue)
    qg = q.clone().requires_grad_(True)
    impl(qg, k, queue, T).backward()
    assert_close(qg.grad, ref_dq, GRAD_TOL[torch.float32], "dq alone")
    kg = k.clone().requires_grad_(True)
    impl(q, kg, queue, T).backward()
    assert_close(kg.grad, ref_dk, GRAD_TOL[torch.float32], "dk alone")
    with torch.no_grad():
        loss = impl(q.requires_grad_(True), k, queue, T)
    assert not loss.requires_grad
    assert_close(loss, ref_loss, LOSS_TOL, "no-grad loss", LOSS_ATOL)


def test_triton_skips_the_weighted_sum_without_grad(monkeypatch):
    """Under torch.no_grad() (evaluation) the kernel does not accumulate the softmax-weighted queue sum,
    which only the gradient of q needs (it would double the work)."""
    kernels_or_skip()
    import coft_fast.kernels.queue_loss as kernel_module
    from coft_fast.ops.queue_loss import queue_info_nce_triton

    seen = []
    original = kernel_module._queue_forward

    def spy(q, k, queue, temperature, with_o, splits=None):
        seen.append(with_o)
        return original(q, k, queue, temperature, with_o, splits)

    monkeypatch.setattr(kernel_module, "_queue_forward", spy)
    q, k, queue = make_inputs(4, 100, 16, torch.float32)
    q.requires_grad_(True)
    with torch.no_grad():
        queue_info_nce_triton(q, k, queue, T)
    queue_info_nce_triton(q, k, queue, T)
    queue_info_nce_triton(q.detach(), k.requires_grad_(True), queue, T)
    assert seen == [False, True, False]


@pytest.mark.parametrize("fn", ["reference", "triton"])
def test_queue_is_a_constant_and_nothing_of_size_n_by_k_is_saved(fn):
    """The queue gets no gradient, and the tensors kept for backward are per-row statistics: at most
    N x d elements each (MoCo's eager graph keeps N x (K + 1) logits)."""
    if fn == "triton":
        kernels_or_skip()
    n, size, d = 8, 512, 16
    q, k, queue = make_inputs(n, size, d, torch.float32, seed=6)
    q.requires_grad_(True)
    k.requires_grad_(True)
    queue.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    impl = ops.queue_info_nce if fn == "reference" else triton_loss
    kwargs = {"backend": "reference"} if fn == "reference" else {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = impl(q, k, queue, T, **kwargs)
    loss.backward()
    assert queue.grad is None
    assert saved and max(saved) <= n * d, saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        queue_info_nce_eager(q, k, queue, T)
    assert max(saved) >= n * (size + 1)  # the hook does see MoCo's logits, so the check above can fail


def test_triton_non_contiguous_inputs():
    kernels_or_skip()
    q, k, queue = make_inputs(10, 150, 32, torch.float32, seed=8)
    wide_q = torch.cat([q, torch.zeros_like(q)], dim=1)[:, :32]
    queue_cm = queue.T.contiguous().T
    loss, dq, dk = run(triton_loss, wide_q, k, queue_cm)
    ref_loss, ref_dq, ref_dk = eager64(q, k, queue)
    assert_close(loss, ref_loss, LOSS_TOL, "loss", LOSS_ATOL)
    assert_close(dq, ref_dq, GRAD_TOL[torch.float32], "dq")
    assert_close(dk, ref_dk, GRAD_TOL[torch.float32], "dk")


# ---------------------------------------------------------------------------------------- dispatch

def test_auto_uses_reference_on_cpu(monkeypatch):
    import coft_fast.kernels.queue_loss as kernel_module

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path must not run for CPU tensors under backend='auto'")

    monkeypatch.setattr(kernel_module, "queue_statistics_triton", boom)
    q, k, queue = make_inputs(5, 100, 16, torch.float32, dev=torch.device("cpu"))
    torch.testing.assert_close(ops.queue_info_nce(q, k, queue, T), queue_info_nce_reference(q, k, queue, T),
                               rtol=0, atol=0)


def test_triton_refuses_float64_and_missing_interpreter(monkeypatch):
    kernels_or_skip()
    q, k, queue = make_inputs(5, 100, 16, torch.float64)
    with pytest.raises(TypeError, match="q"):
        ops.queue_info_nce(q, k, queue, T, backend="triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            ops.queue_info_nce(q.float(), k.float(), queue.float(), T, backend="triton")


# ----------------------------------------------------------------------------------------- enqueue

def test_enqueue_writes_in_place_and_wraps_around():
    queue = torch.zeros(10, 3)
    storage = queue.data_ptr()
    keys = torch.arange(12, dtype=torch.float32).view(4, 3)
    ptr = ops.enqueue(queue, keys, 8)  # rows 8, 9, then 0, 1
    assert ptr == 2 and isinstance(ptr, int)
    assert queue.data_ptr() == storage
    torch.testing.assert_close(queue[[8, 9, 0, 1]], keys)
    assert queue[2:8].abs().sum() == 0
    ptr = ops.enqueue(queue, keys[:3] + 100, torch.tensor(ptr))  # a 0-dim int64 pointer
    assert ptr == 5
    torch.testing.assert_close(queue[2:5], keys[:3] + 100)
    ptr = ops.enqueue(queue, -torch.ones(10, 3), ptr)  # a whole queue's worth from the middle
    assert ptr == 5 and (queue == -1).all()
    assert ops.enqueue(queue, torch.ones(0, 3), 7) == 7


def test_enqueue_fifo_matches_a_list_model():
    """Many batches of varied sizes: the queue always holds the most recent keys, in ring order."""
    size = 7
    queue, ptr, history = torch.full((size, 1), -1.0), 0, []
    g = torch.Generator().manual_seed(0)
    for step in range(30):
        count = int(torch.randint(0, size + 1, (1,), generator=g))
        keys = torch.arange(len(history), len(history) + count, dtype=torch.float32)[:, None]
        history.extend(keys[:, 0].tolist())
        ptr = ops.enqueue(queue, keys, ptr)
        assert ptr == len(history) % size
        for slot in range(size):  # slot holds the latest key whose position is congruent to it
            written = [h for i, h in enumerate(history) if i % size == slot]
            assert queue[slot, 0].item() == (written[-1] if written else -1.0)


def test_enqueue_converts_to_the_queue_dtype():
    queue = torch.zeros(4, 2, dtype=torch.bfloat16)
    keys = torch.tensor([[1.0, 2.0]], dtype=torch.float32, requires_grad=True)
    assert ops.enqueue(queue, keys, 3) == 0
    assert queue.dtype == torch.bfloat16 and queue[3].tolist() == [1.0, 2.0]
    assert not queue.requires_grad


@pytest.mark.parametrize("keys,ptr,error,name", [
    (torch.ones(11, 3), 0, ValueError, "keys"),
    (torch.ones(2, 4), 0, ValueError, "keys"),
    (torch.ones(3), 0, ValueError, "keys"),
    (torch.ones(2, 3), 10, ValueError, "ptr"),
    (torch.ones(2, 3), -1, ValueError, "ptr"),
    (torch.ones(2, 3), 2.0, ValueError, "ptr"),
    (torch.ones(2, 3), True, ValueError, "ptr"),
    (torch.ones(2, 3), torch.tensor(2, dtype=torch.int32), ValueError, "ptr"),
    (torch.ones(2, 3), torch.tensor([2]), ValueError, "ptr"),
    (torch.ones(2, 3), torch.tensor(10), ValueError, "ptr"),
    (torch.empty(2, 3, device="meta"), 0, ValueError, "keys"),
])
def test_enqueue_errors(keys, ptr, error, name):
    queue = torch.zeros(10, 3)
    with pytest.raises(error, match=rf"\b{name}\b"):
        ops.enqueue(queue, keys, ptr)
    assert queue.abs().sum() == 0  # nothing written


def test_enqueue_queue_not_a_matrix():
    with pytest.raises(ValueError, match="queue"):
        ops.enqueue(torch.zeros(10), torch.ones(2, 3), 0)


# ------------------------------------------------------------------------------------------ errors

def _good():
    return make_inputs(4, 50, 16, torch.float32, dev=torch.device("cpu"))


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


ERROR_CASES = {
    "q not 2-D": (lambda q, k, u: (q[0], k, u), ValueError, "q"),
    "q not a tensor": (lambda q, k, u: (q.tolist(), k, u), TypeError, "q"),
    "q integer": (lambda q, k, u: (q.long(), k.long(), u), TypeError, "q"),
    "k shape": (lambda q, k, u: (q, k[:3], u), ValueError, "k"),
    "k columns": (lambda q, k, u: (q, k[:, :8], u), ValueError, "k"),
    "queue columns": (lambda q, k, u: (q, k, u[:, :8]), ValueError, "queue"),
    "queue not 2-D": (lambda q, k, u: (q, k, u[0]), ValueError, "queue"),
    "k dtype": (lambda q, k, u: (q, k.half(), u), TypeError, "k"),
    "queue device": (lambda q, k, u: (q, k, _meta(u)), ValueError, "queue"),
    "k device": (lambda q, k, u: (q, _meta(k), u), ValueError, "k"),
    "N = 0": (lambda q, k, u: (q[:0], k[:0], u), ValueError, "q"),
    "K = 0": (lambda q, k, u: (q, k, u[:0]), ValueError, "queue"),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_name_the_argument(case, backend):
    change, error, name = ERROR_CASES[case]
    with pytest.raises(error, match=rf"\b{name}\b"):
        ops.queue_info_nce(*change(*_good()), T, backend=backend)


@pytest.mark.parametrize("temperature", [0, -0.1, float("nan"), float("inf"), True, "0.07", None])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        ops.queue_info_nce(*_good(), temperature)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        ops.queue_info_nce(*_good(), T, backend="cuda")


def test_the_eager_backend_is_mocos_formulation():
    from coft_fast import ops

    q, k, queue = make_inputs(5, 33, 16, torch.float32, dev=torch.device("cpu"))
    got = run(lambda *a: ops.queue_info_nce(*a, backend="eager"), q, k, queue)
    want = run(queue_info_nce_eager, q, k, queue)
    for name, a, b in zip(("loss", "grad q", "grad k"), got, want):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------- GPU readiness (issue 20)

def test_enqueue_on_device_matches_enqueue():
    """enqueue_ keeps the pointer a device tensor (no host read) and writes what enqueue writes."""
    size, g = 7, torch.Generator().manual_seed(1)
    queue_a, queue_b = torch.zeros(size, 2), torch.zeros(size, 2)
    ptr_a, ptr_b = 0, torch.zeros((), dtype=torch.int64)
    for step in range(25):
        count = int(torch.randint(0, size + 1, (1,), generator=g))
        keys = torch.randn(count, 2, generator=g, dtype=torch.float64)  # converted to the queue's dtype
        ptr_a = ops.enqueue(queue_a, keys, ptr_a)
        ops.enqueue_(queue_b, keys, ptr_b)
        assert int(ptr_b) == ptr_a
        assert torch.equal(queue_a, queue_b)


@pytest.mark.parametrize("ptr,name", [(3, "ptr"), (torch.tensor(3, dtype=torch.int32), "ptr"),
                                      (torch.tensor([3]), "ptr")])
def test_enqueue_on_device_errors(ptr, name):
    queue = torch.zeros(10, 3)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        ops.enqueue_(queue, torch.ones(2, 3), ptr)
    with pytest.raises(ValueError, match="keys"):
        ops.enqueue_(queue, torch.ones(11, 3), torch.zeros((), dtype=torch.int64))
    assert queue.abs().sum() == 0


def test_triton_feature_size_spanning_several_tiles():
    """d = 100 with 32-wide tiles under the interpreter: four d-chunks of the logits and of the weighted
    sum, the last one partly masked (on a GPU the same code runs at d = 512 / 768 / 1024)."""
    kernels_or_skip()
    q, k, queue = make_inputs(37, 300, 100, torch.float32, seed=11)
    check_against_eager(triton_loss, q, k, queue, what="d=100")
    q, k, queue = make_inputs(37, 300, 100, torch.float32, queue_dtype=torch.bfloat16, seed=12)
    check_against_eager(triton_loss, q, k, queue, what="d=100, bf16 queue")


def test_triton_out_of_resources_falls_back_to_the_reference_with_one_log_line(monkeypatch, caplog):
    kernels_or_skip()
    import logging

    import coft_fast.kernels.queue_loss as kernel_module
    import coft_fast.ops.queue_loss as op_module

    def no_fit(*args, **kwargs):
        raise kernel_module.OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(kernel_module, "_queue_forward", no_fit)
    monkeypatch.setattr(op_module, "_fallbacks_logged", set())
    q, k, queue = make_inputs(9, 200, 24, torch.float32, seed=3)
    with caplog.at_level(logging.WARNING, logger="coft_fast.ops.queue_loss"):
        check_against_eager(triton_loss, q, k, queue, what="fallback")
        check_against_eager(triton_loss, q, k, queue, what="fallback again")
    lines = [r for r in caplog.records if "no Triton config fits" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]


def test_triton_deterministic_mode_repeats_bitwise():
    kernels_or_skip()
    q, k, queue = make_inputs(20, 300, 48, torch.float32, seed=5)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run(triton_loss, q, k, queue)
        second = run(triton_loss, q, k, queue)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    check_against_eager(triton_loss, q, k, queue, what="deterministic")


def test_run_numerics_switches():
    """run.tf32 reaches the kernels' fp32 dot precision; run.deterministic switches torch's mode on."""
    import subprocess
    import sys

    code = (
        "import os, torch\n"
        "os.environ.pop('TRITON_INTERPRET', None)\n"
        "from coft_fast.kernels import dot_precision\n"
        "from coft_fast.ops.numerics import set_numerics\n"
        "set_numerics(False, False)\n"
        "a = (dot_precision(torch.float32), torch.are_deterministic_algorithms_enabled())\n"
        "set_numerics(True, True)\n"
        "b = (dot_precision(torch.float32), torch.are_deterministic_algorithms_enabled(),\n"
        "     os.environ.get('CUBLAS_WORKSPACE_CONFIG'))\n"
        "set_numerics(False, False)\n"
        "c = (dot_precision(torch.float32), torch.are_deterministic_algorithms_enabled())\n"
        "print(a, b, c)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == ("('tf32x3', False) ('tf32', True, ':4096:8') ('tf32x3', True)"), out
