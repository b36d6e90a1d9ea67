"""The harness of the per-op benchmarks (bench_queue_loss.py, bench_dual_prompt.py): timing, peak
memory (GPU allocator, CPU allocator through the profiler, and CPU peak RSS in a child process),
the summary lines and the results files. bench_queue_loss.py's docstring explains the measurements.
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

from common import RESULTS, machine, results_stem

PASSES = ("fwd", "fwd+bwd", "fwd_nograd")


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


def write_op_results(op: str, title: str, device, args, rows: list, note: str) -> None:
    """bench/results/<op>_<device>[...].csv and .md of one benchmark run."""
    path = write_results(results_stem(op, device, args), rows, results_header(title, device, args.repeats, note))
    print(f"wrote {path}")
