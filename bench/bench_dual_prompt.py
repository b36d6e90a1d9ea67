"""Benchmark of coft_fast.ops.dual_prompt_loss (the phase-I head): eager baselines against the fused path.

    python bench/bench_dual_prompt.py [--quick] [--repeats R] [--config N,C,d,dtype ...]

Variants, all on the same inputs (unit-norm image features (N, d), positive and negative text
features (C, d), labels and complement labels, logit scale 100, lambda 1):
  eager      the head as DEFT-style code writes it: both full logit matrices (x @ pos.T and x @ neg.T),
             cross-entropy over the positive logits, a two-way log-softmax per class for p_clean,
             gathered at the label and the complement label; plain autograd, in the inputs' dtype;
  reference  the op's plain-torch path (float32 or wider; only the two needed negative columns);
  fused      the op's Triton kernels (GPU only: the CPU interpreter is ~1000x slower than torch).
Passes: "fwd" is the training forward (inputs require grad, graph kept), "fwd+bwd" adds backward to
the image features and both text feature sets, "fwd_nograd" is the forward under torch.no_grad().

Time and memory are measured exactly as in bench_queue_loss.py (whose harness this script uses; its
docstring has the details): GPU medians from triton.testing.do_bench and max_memory_allocated() minus
memory_allocated() before the call; CPU medians of interleaved wall-clock runs, torch's CPU allocator
peak from torch.profiler's memory events, and the process's peak RSS from a fresh subprocess.
Writes bench/results/dual_prompt_<cpu|cuda>.csv and .md; prints one line per configuration and pass.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from op_bench import child_measure, measure, pick_device, report, write_op_results
from common import machine, op_bench_parser, start_op_bench

SCALE = 100.0
CPU_CONFIGS = ["256,1000,512,float32", "64,100,512,float32"]
GPU_CONFIGS = ["256,1000,512,float32", "256,1000,512,bfloat16", "64,100,512,bfloat16", "1024,1000,768,bfloat16"]
QUICK_CONFIGS = ["64,100,128,float32"]


def deft_eager(x, pos, neg, labels, complement, scale, lam=1.0):
    """Both logit sets in full, then CE and the two-way softmax, in the inputs' dtype."""
    s_pos = scale * x @ pos.T
    s_neg = scale * x @ neg.T
    l1 = F.cross_entropy(s_pos, labels)
    log_two_way = torch.log_softmax(torch.stack([s_pos, s_neg], dim=-1), dim=-1)  # (N, C, 2)
    rows = torch.arange(x.shape[0], device=x.device)
    l2 = -(log_two_way[rows, labels, 0] + log_two_way[rows, complement, 1]).mean()
    return l1 + lam * l2, l1, l2


def variants(device: torch.device, labels, complement) -> dict:
    """name -> fn(x, pos, neg) returning the total loss (l1 and l2 come along in the same call)."""
    from coft_fast.ops import dual_prompt_loss

    found = {
        "eager": lambda x, pos, neg: deft_eager(x, pos, neg, labels, complement, SCALE)[0],
        "reference": lambda x, pos, neg: dual_prompt_loss(x, pos, neg, labels, complement, SCALE,
                                                          backend="reference")[0],
    }
    if device.type == "cuda":
        found["fused"] = lambda x, pos, neg: dual_prompt_loss(x, pos, neg, labels, complement, SCALE,
                                                              backend="triton")[0]
    return found


def make_inputs(n, c, d, dtype, device, seed=0):
    """(x, pos, neg) requiring grad, labels, complement labels."""
    g = torch.Generator().manual_seed(seed)
    pos = F.normalize(torch.randn(c, d, generator=g), dim=1)
    neg = F.normalize(pos + 0.8 * torch.randn(c, d, generator=g), dim=1)
    labels = torch.randint(0, c, (n,), generator=g)
    x = F.normalize(pos[labels] + 1.5 * torch.randn(n, d, generator=g), dim=1)
    complement = (labels + torch.randint(1, max(c, 2), (n,), generator=g)) % c
    tensors = [t.to(device, dtype).requires_grad_(True) for t in (x, pos, neg)]
    return tensors, labels.to(device), complement.to(device)


def _child_setup(spec):
    tensors, labels, complement = make_inputs(spec["n"], spec["c"], spec["d"], getattr(torch, spec["dtype"]),
                                              torch.device("cpu"))
    return variants(torch.device("cpu"), labels, complement), tensors


def main() -> None:
    args = op_bench_parser(__doc__.splitlines()[0], "N,C,d,dtype", repeats=7).parse_args()
    if start_op_bench(args, child_measure, _child_setup):
        return

    device = pick_device(args.device)
    configs = args.config or (QUICK_CONFIGS if args.quick else GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS)
    fast = "fused" if device.type == "cuda" else "reference"
    rows = []
    print(f"# dual_prompt_loss on {machine()}; logit_scale={SCALE}; fast path = {fast}")
    for text in configs:
        n, c, d, dtype_name = text.split(",")
        n, c, d = int(n), int(c), int(d)
        tensors, labels, complement = make_inputs(n, c, d, getattr(torch, dtype_name), device)
        found = measure(device, variants(device, labels, complement), tensors, args.repeats, __file__,
                        dict(n=n, c=c, d=d, dtype=dtype_name))
        del tensors, labels, complement
        report(f"dual N={n} C={c} d={d} {dtype_name}", {"device": device.type, "N": n, "C": c, "d": d,
                                                         "dtype": dtype_name}, found, fast, rows)
    write_op_results("dual_prompt", "dual_prompt_loss", device, args, rows, f"logit_scale {SCALE}, lambda 1.")


if __name__ == "__main__":
    main()
