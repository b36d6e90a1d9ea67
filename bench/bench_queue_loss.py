"""Benchmark of coft_fast.ops.queue_info_nce: MoCo's eager InfoNCE against the fused path, one process.

    python bench/bench_queue_loss.py [--quick] [--repeats R] [--config N,K,d,dtype ...]

Variants, all on the same inputs (unit-norm q, k (N, d) and queue (K, d), T = 0.07):
  eager      MoCo's loss as written: einsum for the positive and the queue logits, cat, / T, cross-entropy,
             in the inputs' dtype (plain autograd; it holds several N x (K + 1) tensors);
  reference  the op's plain-torch path: chunked over the queue with an online log-sum-exp inside an
             autograd.Function (O(N * chunk) memory);
  fused      the op's Triton kernel (GPU only: the CPU interpreter is ~1000x slower than torch).
Passes: "fwd" is the training forward (q and k require grad, so eager keeps its graph), "fwd+bwd" is
that plus backward to q and k.

Time: on GPU the median of triton.testing.do_bench; on CPU the median of --repeats wall-clock runs
(perf_counter) after one warm-up, the variants interleaved run by run so that a noisy neighbour on the
machine hits all of them alike.
Peak memory above what the inputs already hold:
  GPU: max_memory_allocated() during the call minus memory_allocated() just before it.
  CPU: torch's CPU allocator keeps no statistics, so each (variant, pass) is measured in a fresh
  subprocess: MALLOC_MMAP_THRESHOLD_=65536 makes glibc serve every large allocation with mmap and give
  it back to the OS when freed (so the resident size follows live tensors and no freed heap is reused
  unseen); after building the inputs and a small warm-up call of the same variant (thread pools, BLAS
  buffers), writing "5" to /proc/self/clear_refs resets the kernel's peak-RSS counter, the call runs, and
  peak = VmHWM - VmRSS before the call. torch's CPU allocator does not cache blocks, so this is the
  memory the call itself made resident (allocator bookkeeping and small temporaries included).
Writes bench/results/queue_loss_<cpu|cuda>.csv and .md; prints one line per configuration and pass.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import RESULTS, machine

TEMPERATURE = 0.07
CPU_CONFIGS = ["256,65536,512,float32", "64,16384,256,float32"]
GPU_CONFIGS = ["256,65536,512,bfloat16", "256,65536,512,float32", "64,16384,256,bfloat16", "256,16384,128,float16"]
QUICK_CONFIGS = ["32,4096,128,float32"]
PASSES = ("fwd", "fwd+bwd")


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


# ------------------------------------------------------------------- harness (shared with bench_dual_prompt)

def call(fn, tensors, which: str):
    """One training forward (graph kept) or forward + backward; returns what must stay alive."""
    for t in tensors:
        if t.requires_grad:
            t.grad = None
    loss = fn(*tensors)
    if which == "fwd+bwd":
        loss.backward()
    return loss


def time_gpu(fn, tensors, which) -> float:
    import triton

    return triton.testing.do_bench(lambda: call(fn, tensors, which), warmup=25, rep=200,
                                   grad_to_none=[t for t in tensors if t.requires_grad], return_mode="median")


def time_cpu(fns: dict, tensors, repeats: int) -> dict:
    """Median wall-clock ms of each (variant, pass), variants interleaved within each repeat."""
    times = {(name, which): [] for name in fns for which in PASSES}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            for which in PASSES:
                start = time.perf_counter()
                out = call(fn, tensors, which)
                elapsed = time.perf_counter() - start
                del out
                if rep:  # the first round is the warm-up
                    times[(name, which)].append(1e3 * elapsed)
    return {key: statistics.median(values) for key, values in times.items()}


def peak_gpu(fn, tensors, which) -> int:
    for t in tensors:
        t.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = call(fn, tensors, which)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    for t in tensors:
        t.grad = None
    return peak


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M).group(1))


def child_measure(spec: dict, setup) -> None:
    """Runs in a fresh process: prints {"peak_bytes": ...} for one variant and pass.
    ``setup(spec, small)`` returns (variants, tensors) on the CPU."""
    torch.set_num_threads(spec["threads"])
    fns, tensors = setup(spec, small=True)
    call(fns[spec["variant"]], tensors, spec["pass"])  # warm-up: thread pools, BLAS buffers, lazy imports
    del fns, tensors
    fns, tensors = setup(spec, small=False)
    fn = fns[spec["variant"]]
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _proc_status_kib("VmRSS")
    out = call(fn, tensors, spec["pass"])
    peak = _proc_status_kib("VmHWM")
    del out
    print(json.dumps({"peak_bytes": 1024 * (peak - before)}))


def peak_cpu(script: str, spec: dict) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child failed for {spec}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def _child_setup(spec, small):
    n, size, d, dtype = spec["n"], spec["size"], spec["d"], getattr(torch, spec["dtype"])
    if small:
        return variants(torch.device("cpu")), make_inputs(min(n, 8), min(size, 512), d, dtype, torch.device("cpu"), 1)
    return variants(torch.device("cpu")), make_inputs(n, size, d, dtype, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- main

def write_results(stem: str, rows: list, header: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stem}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [header, "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return path


def summary_line(label: str, which: str, found: dict, fast: str) -> str:
    parts = [f"{label} {which}:"]
    for name, (ms, peak) in found.items():
        parts.append(f"{name} {ms:.3f} ms {peak / 2**20:.1f} MiB")
    eager_ms, eager_peak = found["eager"]
    fast_ms, fast_peak = found[fast]
    parts.append(f"| time eager/{fast} {eager_ms / fast_ms:.2f}x, peak {fast}/eager "
                 f"{fast_peak / max(eager_peak, 1):.3f}")
    if "reference" in found and fast != "reference":
        ref_ms, ref_peak = found["reference"]
        parts.append(f"(reference/eager time {ref_ms / eager_ms:.2f}x, peak {ref_peak / max(eager_peak, 1):.3f})")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", help="N,K,d,dtype (repeatable)")
    parser.add_argument("--quick", action="store_true", help="one small configuration (a smoke run)")
    parser.add_argument("--repeats", type=int, default=5, help="CPU timing repeats (GPU uses do_bench)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        child_measure(spec, _child_setup)
        return

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    configs = args.config or (QUICK_CONFIGS if args.quick else GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS)
    fns = variants(device)
    fast = "fused" if device.type == "cuda" else "reference"
    rows = []
    print(f"# queue_info_nce on {machine()}; T={TEMPERATURE}; fast path = {fast}")
    for text in configs:
        n, size, d, dtype = parse_config(text)
        label = f"queue N={n} K={size} d={d} {str(dtype).replace('torch.', '')}"
        tensors = make_inputs(n, size, d, dtype, device)
        if device.type == "cuda":
            timings = {(name, which): time_gpu(fn, tensors, which) for name, fn in fns.items() for which in PASSES}
            peaks = {(name, which): peak_gpu(fn, tensors, which) for name, fn in fns.items() for which in PASSES}
        else:
            timings = time_cpu(fns, tensors, args.repeats)
            spec = dict(n=n, size=size, d=d, dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads())
            peaks = {(name, which): peak_cpu(__file__, dict(spec, variant=name, **{"pass": which}))
                     for name in fns for which in PASSES}
        del tensors
        for which in PASSES:
            found = {name: (timings[(name, which)], peaks[(name, which)]) for name in fns}
            print(summary_line(label, which, found, fast), flush=True)
            eager_ms, eager_peak = found["eager"]
            for name, (ms, peak) in found.items():
                rows.append({
                    "device": device.type, "N": n, "K": size, "d": d, "dtype": str(dtype).replace("torch.", ""),
                    "pass": which, "variant": name, "median_ms": round(ms, 4), "peak_mib": round(peak / 2**20, 3),
                    "time_vs_eager": round(ms / eager_ms, 3), "peak_vs_eager": round(peak / max(eager_peak, 1), 4),
                })
    stem = f"queue_loss_{device.type}" + ("_quick" if args.quick else "")
    header = (f"# queue_info_nce benchmark ({device.type})\n\nMachine: {machine()}. Temperature {TEMPERATURE}. "
              f"Times are medians ({'triton.testing.do_bench' if device.type == 'cuda' else f'{args.repeats} runs'}); "
              "peak memory is above what the inputs hold (see the script's docstring). "
              "time_vs_eager < 1 and peak_vs_eager < 1 favour the variant.")
    path = write_results(stem, rows, header)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
