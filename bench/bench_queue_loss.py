"""Benchmark of coft_fast.ops.queue_info_nce: MoCo's eager InfoNCE against the fused path, one process.

    python bench/bench_queue_loss.py [--quick] [--repeats R] [--config N,K,d,dtype ...]

Variants, all on the same inputs (unit-norm q, k (N, d) and queue (K, d), T = 0.07):
  eager      MoCo's loss as written: einsum for the positive and the queue logits, cat, / T, cross-entropy,
             in the inputs' dtype (plain autograd; it holds several N x (K + 1) tensors);
  reference  the op's plain-torch path: chunked over the queue with an online log-sum-exp, as one
             torch.library custom op with a registered backward (O(N * chunk) memory);
  fused      the op's Triton kernel (GPU only: the CPU interpreter is ~1000x slower than torch).
Passes: "fwd" is the training forward (q and k require grad, so eager keeps its graph), "fwd+bwd" is
that plus backward to q and k, "fwd_nograd" the forward under torch.no_grad() (evaluation).

Time: on GPU the median of triton.testing.do_bench; on CPU the median of --repeats wall-clock runs
(perf_counter) after one warm-up, the variants interleaved run by run so that a noisy neighbour on the
machine hits all of them alike.
Peak memory above what the inputs already hold (the call's outputs and gradients count):
  GPU  peak_mib: max_memory_allocated() during the call minus memory_allocated() just before it.
  CPU  peak_mib: the same quantity for torch's CPU allocator, which keeps no statistics of its own:
       the call runs under torch.profiler with profile_memory=True, whose allocation events carry the
       running total of allocated bytes; peak = the highest running total minus the total before the
       call's first event (one warm-up run of the same call first).
  CPU  rss_peak_mib, a cross-check at the process level (library buffers included): each (variant, pass)
       runs in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536, so glibc serves every allocation of
       64 KiB or more with mmap and returns it to the OS when freed; after the inputs are built and one
       warm-up run of the same call (thread pools, BLAS packing buffers: a training loop's steady state),
       writing "5" to /proc/self/clear_refs resets the kernel's peak-RSS counter, the call runs again,
       and peak = VmHWM - VmRSS before it. Allocations under 64 KiB can reuse freed heap unseen, so this
       column under-counts small configurations; torch's CPU allocator caches nothing, so large
       tensors show up exactly.
Writes bench/results/queue_loss_<cpu|cuda>.csv and .md; prints one line per configuration and pass.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from common import machine, op_bench_parser, start_op_bench
from op_bench import child_measure, measure, pick_device, report, write_op_results

TEMPERATURE = 0.07
CPU_CONFIGS = ["256,65536,512,float32", "64,16384,256,float32", "256,65536,512,bfloat16"]
GPU_CONFIGS = ["256,65536,512,bfloat16", "256,65536,512,float32", "64,16384,256,bfloat16", "256,16384,128,float16"]
QUICK_CONFIGS = ["32,4096,128,float32"]


def moco_eager(q, k, queue, temperature):
    """MoCo v1/v2's loss as written (einsum + cat + cross-entropy), in the inputs' dtype."""
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,kc->nk", q, queue.detach())
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=q.device))


def variants(device: torch.device) -> dict:
    """name -> fn(q, k, queue) returning the loss."""
    from coft_fast.ops import queue_info_nce

    found = {
        "eager": lambda q, k, queue: moco_eager(q, k, queue, TEMPERATURE),
        "reference": lambda q, k, queue: queue_info_nce(q, k, queue, TEMPERATURE, backend="reference"),
    }
    if device.type == "cuda":
        found["fused"] = lambda q, k, queue: queue_info_nce(q, k, queue, TEMPERATURE, backend="triton")
    return found


def parse_config(text: str):
    n, size, d, dtype = text.split(",")
    return int(n), int(size), int(d), getattr(torch, dtype)


def make_inputs(n, size, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1)
    k = F.normalize(q + 0.5 * torch.randn(n, d, generator=g), dim=1)
    queue = torch.empty(size, d, dtype=dtype, device=device)
    for start in range(0, size, 8192):  # built in slices: no full-size fp32 temporary
        block = torch.randn(min(8192, size - start), d, generator=g)
        queue[start:start + block.shape[0]] = F.normalize(block, dim=1).to(device, dtype)
    q = q.to(device, dtype).requires_grad_(True)
    k = k.to(device, dtype).requires_grad_(True)
    return q, k, queue


def _child_setup(spec):
    n, size, d, dtype = spec["n"], spec["size"], spec["d"], getattr(torch, spec["dtype"])
    return variants(torch.device("cpu")), make_inputs(n, size, d, dtype, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- main

def main() -> None:
    args = op_bench_parser(__doc__.splitlines()[0], "N,K,d,dtype", repeats=5).parse_args()
    if start_op_bench(args, child_measure, _child_setup):
        return

    device = pick_device(args.device)
    configs = args.config or (QUICK_CONFIGS if args.quick else GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS)
    fns = variants(device)
    fast = "fused" if device.type == "cuda" else "reference"
    rows = []
    print(f"# queue_info_nce on {machine()}; T={TEMPERATURE}; fast path = {fast}")
    for text in configs:
        n, size, d, dtype = parse_config(text)
        dtype_name = str(dtype).replace("torch.", "")
        tensors = make_inputs(n, size, d, dtype, device)
        found = measure(device, fns, tensors, args.repeats, __file__, dict(n=n, size=size, d=d, dtype=dtype_name))
        del tensors
        report(f"queue N={n} K={size} d={d} {dtype_name}", {"device": device.type, "N": n, "K": size, "d": d,
                                                             "dtype": dtype_name}, found, fast, rows)
    write_op_results("queue_loss", "queue_info_nce", device, args, rows, f"Temperature {TEMPERATURE}.")


if __name__ == "__main__":
    main()
