"""Fused pseudo-label ops (coft_fast._C) against the best pure-torch equivalents, same process.

    python bench/bench_pseudo_label_stats.py [--sizes 50000x100,1281167x1000] [--repeats 5]
                                             [--large-repeats 3] [--k 16] [--bins 10] [--devices cpu,cuda]
                                             [--threads 1,2]

Stats (labels, confidences, class counts, confidence histograms) of (N, C) float32 logits:
  torch_softmax       softmax + max + bincount over the whole tensor
  torch_softmax_rows  the same in blocks of 16384 rows (no N x C probability tensor)
  torch_logsumexp     max + logsumexp (confidence = exp(max - lse)) + bincount
  fused               coft_fast.ops.pseudo_label_stats (one pass)
Selection (the k best confidences of every class, indices ordered by class then score):
  torch_loop          a Python loop over classes of (labels == c).nonzero() + topk, as most
                      pseudo-labelling code does it
  torch_sort2         two stable argsorts (score, then class), the reference's method
  torch_sort1         one stable sort of an int64 composite key (class << 32 | score bits)
  fused               coft_fast.ops.class_balanced_topk
Read floor: `logits.sum()`, one vectorised read of the logits by torch. No one-pass stats op can
beat it by much, so 'per-class loop / read floor' is about the most that any fused op can reach
against the loop on that machine.
Each timing is the median of the repeats after one warm-up (--large-repeats for N * C >= 1e8).
CPU cases run once per --threads value (torch.set_num_threads; default: torch's own count); GPU
cases run once.
All versions are checked against the fused one: labels, counts and selected indices must be
identical, confidences equal to 1e-5. Writes bench/results/pseudo_label_stats.{csv,md}. The last
line printed is `speedup_vs_torch=<x>`: the largest CPU case (at the largest thread count), stats +
selection, fused against the best torch stats plus the best torch selection.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from datetime import datetime, timezone

import torch

import coft_fast.ops as ops
from coft_fast.ops import _extension

from common import RESULTS, machine


# ---- pure-torch versions -----------------------------------------------------------------------
def _hist(labels, confidence, num_classes, bins):
    counts = torch.bincount(labels, minlength=num_classes)
    b = (confidence * bins).long().clamp_(0, bins - 1)
    hist = torch.bincount(labels * bins + b, minlength=num_classes * bins).view(num_classes, bins)
    return counts, hist


def stats_torch_softmax(logits, bins):
    confidence, labels = logits.softmax(dim=1).max(dim=1)
    return (labels, confidence, *_hist(labels, confidence, logits.shape[1], bins))


def stats_torch_softmax_rows(logits, bins, rows=16384):
    parts = [block.softmax(dim=1).max(dim=1) for block in logits.split(rows)]
    confidence = torch.cat([p.values for p in parts])
    labels = torch.cat([p.indices for p in parts])
    return (labels, confidence, *_hist(labels, confidence, logits.shape[1], bins))


def stats_torch_logsumexp(logits, bins):
    top, labels = logits.max(dim=1)
    confidence = torch.exp(top - torch.logsumexp(logits, dim=1))
    return (labels, confidence, *_hist(labels, confidence, logits.shape[1], bins))


def stats_fused(logits, bins):
    return tuple(ops.pseudo_label_stats(logits, bins))


def select_torch_loop(labels, scores, k, num_classes):
    chosen, counts = [], torch.zeros(num_classes, dtype=torch.int64, device=labels.device)
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        if members.numel() == 0:
            continue
        top = torch.topk(scores[members], min(k, members.numel())).indices
        chosen.append(members[top])
        counts[c] = top.numel()
    return (torch.cat(chosen) if chosen else labels.new_empty(0)), counts


def _take_first_k(order, labels, k, num_classes):
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(labels.numel(), device=labels.device) - starts[labels[order]]
    return order[rank < k], counts.clamp(max=k)


def select_torch_sort2(labels, scores, k, num_classes):
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    return _take_first_k(order, labels, k, num_classes)


def select_torch_sort1(labels, scores, k, num_classes):
    bits = (scores.float() + 0.0).view(torch.int32).long() & 0xFFFFFFFF  # -0.0 folded onto +0.0
    ascending = torch.where(bits >= 2**31, bits ^ 0xFFFFFFFF, bits | 2**31)
    key = labels * 2**32 + (0xFFFFFFFF - ascending)  # class, then descending score
    order = torch.sort(key, stable=True).indices
    return _take_first_k(order, labels, k, num_classes)


def select_fused(labels, scores, k, num_classes):
    return tuple(ops.class_balanced_topk(labels, scores, k, num_classes))


STATS = {"torch_softmax": stats_torch_softmax, "torch_softmax_rows": stats_torch_softmax_rows,
         "torch_logsumexp": stats_torch_logsumexp, "fused": stats_fused}
SELECT = {"torch_loop": select_torch_loop, "torch_sort2": select_torch_sort2, "torch_sort1": select_torch_sort1,
          "fused": select_fused}


# ---- measurement -------------------------------------------------------------------------------
def timed(fn, repeats, device):
    """Median wall-clock and median process CPU time (all threads) over the repeats, after a warm-up."""
    def once():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, time.process_time() - start_cpu, out

    _, _, out = once()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        seconds, cpu_seconds, out = once()
        wall.append(seconds)
        cpu.append(cpu_seconds)
    return statistics.median(wall), statistics.median(cpu), out


def make_logits(n, c, device, seed=0):
    """CLIP-like zero-shot logits: a common offset, unit-scale noise times 3, one class boosted per row."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.empty(n, c)
    logits.normal_(0.0, 3.0, generator=g).add_(20.0)
    boost = torch.randint(0, c, (n,), generator=g)
    logits[torch.arange(n), boost] += torch.rand(n, generator=g) * 8
    return logits.to(device)


def compare_stats(ref, got):
    labels_ok = torch.equal(ref[0], got[0])
    counts_ok = torch.equal(ref[2], got[2])
    conf_err = float((ref[1] - got[1]).abs().max()) if ref[1].numel() else 0.0
    conf_ok = bool(torch.allclose(ref[1], got[1], rtol=1e-5, atol=1e-7))
    hist_diff = int((ref[3] - got[3]).abs().sum())
    return labels_ok and counts_ok and conf_ok, f"labels {labels_ok}, counts {counts_ok}, max |dconf| {conf_err:.1e}, hist cells off {hist_diff}"


def run_case(logits, device, threads, args, rows, summary):
    n, c = logits.shape
    repeats = args.large_repeats if n * c >= 1e8 else args.repeats
    print(f"\n[{device.type}, {threads} threads] N={n} C={c} k={args.k} bins={args.bins} repeats={repeats}", flush=True)
    stats_times, stats_cpu, stats_out = {}, {}, {}
    for name, fn in STATS.items():
        med, cpu, out = timed(lambda: fn(logits, args.bins), repeats, device)
        stats_times[name], stats_cpu[name], stats_out[name] = med, cpu, out
        rows.append([device.type, threads, n, c, args.k, args.bins, "stats", name, f"{med:.6f}", f"{cpu:.6f}", repeats])
        print(f"  stats     {name:<20} {med * 1e3:10.2f} ms  (CPU time {cpu * 1e3:10.2f} ms)", flush=True)
    read_floor, _, _ = timed(lambda: logits.sum(), repeats, device)
    rows.append([device.type, threads, n, c, args.k, args.bins, "read_floor", "torch_sum", f"{read_floor:.6f}", "", repeats])
    print(f"  read      torch sum (floor)    {read_floor * 1e3:10.2f} ms", flush=True)
    fused = stats_out["fused"]
    checks = {}
    for name in STATS:
        if name != "fused":
            ok, note = compare_stats(fused, stats_out[name])
            checks[f"stats {name}"] = (ok, note)
    del stats_out
    labels, scores = fused[0], fused[1]
    select_times, select_cpu, select_out = {}, {}, {}
    for name, fn in SELECT.items():
        med, cpu, out = timed(lambda: fn(labels, scores, args.k, c), repeats, device)
        select_times[name], select_cpu[name], select_out[name] = med, cpu, out
        rows.append([device.type, threads, n, c, args.k, args.bins, "selection", name, f"{med:.6f}", f"{cpu:.6f}", repeats])
        print(f"  selection {name:<20} {med * 1e3:10.2f} ms  (CPU time {cpu * 1e3:10.2f} ms)", flush=True)
    for name in SELECT:
        if name != "fused":
            same = all(torch.equal(a, b) for a, b in zip(select_out["fused"], select_out[name]))
            checks[f"selection {name}"] = (same, "indices and counts identical" if same else "DIFFERENT")
    for what, (ok, note) in checks.items():
        print(f"  check {what:<28} {'ok' if ok else 'MISMATCH'}: {note}")

    best_stats = min((t, name) for name, t in stats_times.items() if name != "fused")
    best_select = min((t, name) for name, t in select_times.items() if name != "fused")
    both_fused = stats_times["fused"] + select_times["fused"]
    both_torch = best_stats[0] + best_select[0]
    both_loop = best_stats[0] + select_times["torch_loop"]
    entry = {
        "device": device.type, "threads": threads, "n": n, "c": c, "repeats": repeats,
        "stats": (stats_times["fused"], best_stats), "select": (select_times["fused"], best_select),
        "select_loop": select_times["torch_loop"], "both": (both_fused, both_torch, both_loop),
        "checks_ok": all(ok for ok, _ in checks.values()), "read_floor": read_floor,
        "cpu_both": (stats_cpu["fused"] + select_cpu["fused"],
                     min(t for k, t in stats_cpu.items() if k != "fused") + min(t for k, t in select_cpu.items() if k != "fused"),
                     min(t for k, t in stats_cpu.items() if k != "fused") + select_cpu["torch_loop"]),
    }
    summary.append(entry)
    print(f"  stats     fused vs best torch ({best_stats[1]}): {best_stats[0] / stats_times['fused']:.2f}x")
    print(f"  selection fused vs best torch ({best_select[1]}): {best_select[0] / select_times['fused']:.2f}x, "
          f"vs per-class loop: {select_times['torch_loop'] / select_times['fused']:.1f}x")
    print(f"  both      fused vs best torch: {both_torch / both_fused:.2f}x, vs best stats + per-class loop: "
          f"{both_loop / both_fused:.1f}x")
    del fused, select_out
    return entry


CONTENTION_NOTE = ("At 2 threads a CPU time close to the wall-clock time means only one core was actually free "
                   "(the other was running other jobs): OpenMP threads then wait for each other, so those rows "
                   "measure contention more than the ops.")


def write_results(rows, summary, args, load_before):
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "pseudo_label_stats.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "threads", "N", "C", "k", "num_bins", "task", "impl", "median_s", "median_cpu_s", "repeats"])
        w.writerows(rows)
    lines = [
        "# Pseudo-label stats and class-balanced selection: fused C++/CUDA ops vs pure torch",
        "",
        f"Machine: {machine()}; CPU kernel path "
        f"{torch.ops.coft_fast._cpu_isa()}; {datetime.now(timezone.utc):%Y-%m-%d}.",
        f"Command: `python bench/bench_pseudo_label_stats.py --sizes {args.sizes} --repeats {args.repeats} "
        f"--large-repeats {args.large_repeats} --k {args.k} --bins {args.bins} --devices {args.devices}"
        f"{' --threads ' + args.threads if args.threads else ''}`.",
        f"1-minute load average of the machine (shared with other jobs): {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after the run; on a loaded machine the 2-thread figures suffer most.",
        "Wall-clock medians in ms (raw numbers, with process CPU time, in pseudo_label_stats.csv). Best torch = the fastest pure-torch version of each task "
        "(stats: softmax, row-blocked softmax or logsumexp; selection: per-class topk loop, two argsorts or one "
        "composite-key sort). 'both' = stats + selection; its loop column = best torch stats + the per-class loop.",
        "",
        "| device | threads | N | C | task | fused | best torch (which) | per-class loop | vs best torch | vs loop | outputs identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
        fs, (ts, tname) = e["stats"]
        fsel, (tsel, selname) = e["select"]
        bf, bt, bl = e["both"]
        same = "yes" if e["checks_ok"] else "NO (see log)"
        where = f"{e['device']} | {e['threads']}"
        lines.append(f"| {where} | {e['n']} | {e['c']} | stats | {ms(fs)} | {ms(ts)} ({tname}) | - | {ts / fs:.2f}x | - | {same} |")
        lines.append(f"| {where} | {e['n']} | {e['c']} | selection | {ms(fsel)} | {ms(tsel)} ({selname}) | "
                     f"{ms(e['select_loop'])} | {tsel / fsel:.2f}x | {e['select_loop'] / fsel:.1f}x | {same} |")
        lines.append(f"| {where} | {e['n']} | {e['c']} | both | {ms(bf)} | {ms(bt)} | {ms(bl)} | {bt / bf:.2f}x | "
                     f"{bl / bf:.1f}x | {same} |")
    lines += [
        "",
        "The same 'both' ratios from process CPU time (all threads; with 1 thread this is the op's own cost and "
        "does not suffer when other jobs take the cores). " + CONTENTION_NOTE,
        "",
        "| device | threads | N | C | fused CPU s | best torch CPU s | torch stats + loop CPU s | vs best torch | vs loop |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        f, t, l = e["cpu_both"]
        lines.append(f"| {e['device']} | {e['threads']} | {e['n']} | {e['c']} | {f:.3f} | {t:.3f} | {l:.3f} | {t / f:.2f}x | {l / f:.1f}x |")
    lines += [
        "",
        "How close the fused stats come to one plain read of the logits (`logits.sum()`, wall clock): the "
        "last column is about the largest 'vs loop' ratio that any one-pass op could reach here.",
        "",
        "| device | threads | N | C | read floor ms | fused stats ms | fused stats / read | (best torch stats + loop) / read |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        floor, (fs, _), (_, _, bl) = e["read_floor"], e["stats"], e["both"]
        lines.append(f"| {e['device']} | {e['threads']} | {e['n']} | {e['c']} | {floor * 1e3:.1f} | {fs * 1e3:.1f} | "
                     f"{fs / floor:.2f} | {bl / floor:.1f}x |")
    (RESULTS / "pseudo_label_stats.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50000x100,1281167x1000", help="comma-separated NxC")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large-repeats", type=int, default=3, help="repeats when N * C >= 1e8")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--devices", default="cpu,cuda", help="cuda is skipped (and said so) without a GPU")
    parser.add_argument("--threads", default="", help="comma-separated CPU thread counts (default: torch's)")
    args = parser.parse_args()
    _extension.require("pseudo_label_stats", torch.device("cpu"))
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    devices = []
    for name in args.devices.split(","):
        if name == "cuda" and not (torch.cuda.is_available() and _extension.has_cuda_kernels()):
            print("cuda: skipped (no GPU, or coft_fast._C built without its CUDA kernels)")
            continue
        devices.append(torch.device(name))
    print(machine(), f"| torch threads {torch.get_num_threads()} | CPU kernel path {torch.ops.coft_fast._cpu_isa()}")
    load_before = os.getloadavg()[0]
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    rows, summary = [], []
    for n, c in sizes:
        logits = make_logits(n, c, torch.device("cpu"))
        for device in devices:
            data = logits.to(device)
            for threads in (thread_counts if device.type == "cpu" else [torch.get_num_threads()]):
                torch.set_num_threads(threads)
                run_case(data, device, threads, args, rows, summary)
            del data
        del logits
    write_results(rows, summary, args, load_before)
    cpu = [e for e in summary if e["device"] == "cpu"]
    if cpu:
        largest = max(cpu, key=lambda e: (e["n"] * e["c"], e["threads"]))
        fused, torch_best, _ = largest["both"]
        print(f"speedup_vs_torch={torch_best / fused:.2f}")


if __name__ == "__main__":
    main()
