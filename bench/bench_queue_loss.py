"""Benchmark of coft_fast.ops.queue_info_nce: MoCo's eager InfoNCE against the fused path, one process.

    python bench/bench_queue_loss.py [--quick] [--repeats R] [--config N,K,d,dtype ...]

Variants, all on the same inputs (unit-norm q, k (N, d) and queue (K, d), T = 0.07):
  eager      MoCo's loss as written: einsum for the positive and the queue logits, cat, / T, cross-entropy,
             in the inputs' dtype (plain autograd; it holds several N x (K + 1) tensors);
  reference  the op's plain-torch path: chunked over the queue with an online log-sum-exp inside an
             autograd.Function (O(N * chunk) memory);
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

import csv
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import RESULTS, machine, op_bench_parser, results_stem, start_op_bench

TEMPERATURE = 0.07
CPU_CONFIGS = ["256,65536,512,float32", "64,16384,256,float32", "256,65536,512,bfloat16"]
GPU_CONFIGS = ["256,65536,512,bfloat16", "256,65536,512,float32", "64,16384,256,bfloat16", "256,16384,128,float16"]
QUICK_CONFIGS = ["32,4096,128,float32"]
PASSES = ("fwd", "fwd+bwd", "fwd_nograd")


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
    if which == "fwd_nograd":
        with torch.no_grad():
            return fn(*tensors)
    loss = fn(*tensors)
    if which == "fwd+bwd":
        loss.backward()
    return loss


def time_gpu(fn, tensors, which) -> float:
    import triton

    call(fn, tensors, which)  # first call outside the timing: Triton compiles and autotunes here
    torch.cuda.synchronize()
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


def peak_cpu_allocated(fn, tensors, which) -> int:
    """Peak bytes held by torch's CPU allocator during the call, above the total before it."""
    from torch.profiler import ProfilerActivity, profile

    warm = call(fn, tensors, which)  # warm-up
    del warm
    for t in tensors:
        t.grad = None
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = call(fn, tensors, which)
    del out
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"]
                  if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    for t in tensors:
        t.grad = None
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(0, max(e["Total Allocated"] for e in events) - start)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M).group(1))


def child_measure(spec: dict, setup) -> None:
    """Runs in a fresh process: prints {"peak_bytes": ...} for one variant and pass, measured on the
    second of two identical calls (the steady state of a training loop). ``setup(spec)`` returns
    (variants, tensors) on the CPU."""
    torch.set_num_threads(spec["threads"])
    fns, tensors = setup(spec)
    fn = fns[spec["variant"]]
    out = call(fn, tensors, spec["pass"])  # warm-up, same call: thread pools, BLAS buffers, lazy imports
    del out
    for t in tensors:
        t.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _proc_status_kib("VmRSS")
    out = call(fn, tensors, spec["pass"])
    peak = _proc_status_kib("VmHWM")
    del out
    print(json.dumps({"peak_bytes": 1024 * (peak - before)}))


def peak_cpu_rss(script: str, spec: dict) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child failed for {spec}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def _child_setup(spec):
    n, size, d, dtype = spec["n"], spec["size"], spec["d"], getattr(torch, spec["dtype"])
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
    for name, m in found.items():
        parts.append(f"{name} {m['ms']:.3f} ms {m['peak'] / 2**20:.1f} MiB")
    eager, quick = found["eager"], found[fast]
    parts.append(f"| time eager/{fast} {eager['ms'] / quick['ms']:.2f}x, peak {fast}/eager "
                 f"{quick['peak'] / max(eager['peak'], 1):.3f}")
    if "reference" in found and fast != "reference":
        ref = found["reference"]
        parts.append(f"(reference/eager time {ref['ms'] / eager['ms']:.2f}x, "
                     f"peak {ref['peak'] / max(eager['peak'], 1):.3f})")
    return " ".join(parts)


def measure(device, fns: dict, tensors, repeats: int, script: str, spec: dict) -> dict:
    """{(variant, pass): {"ms", "peak", "rss"}} for one configuration."""
    found = {}
    if device.type == "cuda":
        for name, fn in fns.items():
            for which in PASSES:
                found[(name, which)] = {"ms": time_gpu(fn, tensors, which), "peak": peak_gpu(fn, tensors, which),
                                        "rss": None}
        return found
    timings = time_cpu(fns, tensors, repeats)
    for name, fn in fns.items():
        for which in PASSES:
            found[(name, which)] = {
                "ms": timings[(name, which)],
                "peak": peak_cpu_allocated(fn, tensors, which),
                "rss": peak_cpu_rss(script, dict(spec, variant=name, threads=torch.get_num_threads(),
                                                 **{"pass": which})),
            }
    return found


def report(label: str, columns: dict, found: dict, fast: str, rows: list) -> None:
    names = sorted({name for name, _ in found}, key=["eager", "reference", "fused"].index)
    for which in PASSES:
        per = {name: found[(name, which)] for name in names}
        print(summary_line(label, which, per, fast), flush=True)
        eager = per["eager"]
        for name, m in per.items():
            rows.append({
                **columns, "pass": which, "variant": name, "median_ms": round(m["ms"], 4),
                "peak_mib": round(m["peak"] / 2**20, 3),
                "rss_peak_mib": "" if m["rss"] is None else round(m["rss"] / 2**20, 3),
                "time_vs_eager": round(m["ms"] / eager["ms"], 3),
                "peak_vs_eager": round(m["peak"] / max(eager["peak"], 1), 4),
            })


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def results_header(title: str, device, repeats: int, extra: str) -> str:
    timing = "triton.testing.do_bench" if device.type == "cuda" else f"{repeats} interleaved runs"
    return (f"# {title} benchmark ({device.type})\n\nMachine: {machine()}; {torch.get_num_threads()} torch threads. "
            f"{extra} Times are medians ({timing}); peak memory is above what the inputs hold (peak_mib: torch's "
            "allocator; rss_peak_mib: process resident size, CPU only; see bench_queue_loss.py's docstring). "
            "time_vs_eager < 1 and peak_vs_eager < 1 favour the variant.")


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
    stem = results_stem("queue_loss", device, args)
    path = write_results(stem, rows, results_header("queue_info_nce", device, args.repeats,
                                                    f"Temperature {TEMPERATURE}."))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
