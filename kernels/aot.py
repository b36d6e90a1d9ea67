"""Compile the Triton kernels ahead of time for GPU targets, without a GPU, and report their resources.

``python -m coft_fast.kernels.aot --targets 80 90 --jobs 2 --out report.json`` compiles every kernel
of the ops, with every config the op can keep on that target (the ops' own pruning), for each
accepted dtype and the sizes that matter (d in 256, 512, 768, 1024; C up to 1000; K = 65536), and
writes one record per compiled specialisation: the shared memory Triton allocates, ptxas's register
count and spill bytes, and the shared memory the op's pruning estimated (``estimate``, where it has
one). Identical specialisations are compiled once. Run it with TRITON_INTERPRET unset (the
interpreter replaces compilation); tests/test_kernels_aot.py does, in a subprocess.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

SIZES_D = (256, 512, 768, 1024)
CI_TARGETS = (80, 90)
SPILL_BUDGET_BYTES = 16  # ptxas "bytes spill stores" a kept config may have (the old queue kernel: 1,000-25,000)
WIDE_TARGETS = (80, 86, 89, 90, 100, 120)  # the slow sweep
BATCH = 256
QUEUE = 65536
CLASSES = 1000
_TRITON_DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Case:
    """One kernel specialisation to compile: ``args`` maps every parameter to a value, pointers to
    their Triton type ("*fp32"); ints equal to 1 become constants, as at launch."""

    kernel: str
    capability: int
    args: Dict[str, object]
    num_warps: int
    num_stages: int
    what: str
    estimate: Optional[int] = None
    result: Dict[str, object] = field(default_factory=dict)

    def key(self):
        """What the compiler sees: sizes enter only through their divisibility, so d = 256 ... 1024
        with the same kept config is one specialisation."""
        signature, constexprs, attrs = _specialise(_jit_function(self.kernel), self.args)
        return (self.kernel, self.capability, tuple(signature.items()), tuple(sorted(constexprs.items())),
                tuple(sorted((k, str(v)) for k, v in attrs.items())), self.num_warps, self.num_stages)


def _jit_function(kernel: str):
    from coft_fast.kernels import dual_prompt, queue_loss

    modules = {"queue": queue_loss, "dual": dual_prompt}
    module_name, name = kernel.split(".")
    from triton.runtime.autotuner import Autotuner

    fn = getattr(modules[module_name], name)
    return fn.fn if isinstance(fn, Autotuner) else fn  # an autotuned kernel wraps its JITFunction


def _specialise(jit, args):
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(jit.params):
        name = param.name
        value = args[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, str):  # a pointer, 16-byte aligned as torch allocates
            signature[name] = value
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or isinstance(value, float):
            signature[name] = "fp32" if isinstance(value, float) else "i1"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_case(case: Case) -> Case:
    """Compile one case for its target; fills ``case.result`` (shared, registers, spills, seconds, error)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = _jit_function(case.kernel)
    signature, constexprs, attrs = _specialise(jit, case.args)
    target = GPUTarget("cuda", case.capability, 32)
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers, spill stores
    start = time.monotonic()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                    options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    except Exception as error:  # reported per case; the test fails on any
        case.result = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
        return case
    text = log.getvalue()
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", text))
    registers = max([int(x) for x in re.findall(r"Used (\d+) registers", text)] or [-1])
    static_smem = max([int(x) for x in re.findall(r"(\d+) bytes smem", text)] or [0])
    case.result = {"shared": int(kernel.metadata.shared) + static_smem, "registers": registers,
                   "spill_bytes": spills, "seconds": round(time.monotonic() - start, 2)}
    return case


# ------------------------------------------------------------------------------------------- cases

class _FakeTensor:
    """What the ops' pruning functions read from a launch argument: its element size and device."""

    def __init__(self, item: int):
        self.item = item
        self.device = "target"

    def element_size(self) -> int:
        return self.item


def _kept(module, prune_name: str, configs, capability: int, named_args: dict, constexprs: dict):
    """The configs ``module``'s pruning keeps on ``capability``, called as the autotuner calls it, with
    the module's device query answering that target's shared memory."""
    from coft_fast.kernels import shared_memory_limit

    prune = getattr(module, prune_name)
    saved = getattr(module, "device_shared_memory", None)
    if saved is not None:
        module.device_shared_memory = lambda device: shared_memory_limit(capability)
    try:
        return prune(configs, named_args, **constexprs)
    finally:
        if saved is not None:
            module.device_shared_memory = saved


def _kernel_args(jit, values: dict) -> dict:
    return {name: values[name] for name in jit.arg_names}


def module_max_splits(module) -> int:
    """The merge's largest S_PAD: the kernel module's slice cap (8 for a module without one)."""
    return getattr(module, "MAX_SPLITS", 8)


def queue_cases(capability: int, sizes_d=SIZES_D) -> List[Case]:
    """The queue InfoNCE kernels: (q, queue) dtypes fp32/fp32, bf16/bf16, fp16/fp16, fp32/bf16, with and
    without the weighted sum (a gradient to q or not), every config the op keeps on the target."""
    from coft_fast.kernels import next_power_of_2
    from coft_fast.kernels import queue_loss as module

    partial = _jit_function("queue._queue_partial_kernel")
    merge = _jit_function("queue._queue_merge_kernel")
    estimate = getattr(module, "partial_shared_memory", None)
    cases = []
    for q_dtype, queue_dtype in (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "bf16")):
        q_item, queue_item = _TRITON_DTYPES[q_dtype], _TRITON_DTYPES[queue_dtype]
        upcast = q_dtype != queue_dtype
        precision = "tf32" if (upcast or q_dtype == "fp32") else "ieee"
        for d in sizes_d:
            for with_o in (False, True):
                values = {
                    "q_ptr": f"*{q_dtype}", "k_ptr": f"*{q_dtype}", "queue_ptr": f"*{queue_dtype}",
                    "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_o_ptr": "*fp32", "pos_ptr": "*fp32",
                    "N": BATCH, "K": QUEUE, "D": d, "SPLITS": 8, "stride_q": d, "stride_k": d, "stride_queue": d,
                    "rows_per_split": 2048, "inv_t": 1 / 0.07, "N_KEY": BATCH, "K_KEY": QUEUE,
                    "D_PAD": max(16, next_power_of_2(d)), "WITH_O": with_o, "UPCAST": upcast, "PRECISION": precision,
                }
                named = {**values, "q_ptr": _FakeTensor(q_item), "k_ptr": _FakeTensor(q_item),
                         "queue_ptr": _FakeTensor(queue_item)}
                constexprs = {p.name: values[p.name] for p in partial.params
                              if p.is_constexpr and p.name in values}
                for config in _kept(module, "_prune_partial", module._partial_configs(), capability, named,
                                    constexprs):
                    args = _kernel_args(partial, {**values, **config.kwargs})
                    cases.append(Case("queue._queue_partial_kernel", capability, args, config.num_warps,
                                      config.num_stages, f"{q_dtype}/{queue_dtype} d={d} grad={with_o} "
                                      f"{config.kwargs} w{config.num_warps} s{config.num_stages}",
                                      estimate(config, q_item, queue_item, with_o) if estimate else None))
        for d in sizes_d:
            d_pad = next_power_of_2(d)
            values = {"part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_o_ptr": "*fp32", "pos_ptr": "*fp32",
                      "k_ptr": f"*{q_dtype}", "loss_rows_ptr": "*fp32", "w0m1_ptr": "*fp32", "r_ptr": "*fp32",
                      "N": BATCH, "D": d, "SPLITS": 100, "stride_k": d, "S_PAD": module_max_splits(module),
                      "WITH_O": True, "BLOCK_M": 32, "BLOCK_D": min(128, d_pad)}
            cases.append(Case("queue._queue_merge_kernel", capability, _kernel_args(merge, values), 4, 3,
                              f"merge {q_dtype} d={d}"))
    return cases


def dual_cases(capability: int, sizes_d=SIZES_D) -> List[Case]:
    """The dual-prompt kernels at N = 256, C = 1000, every config the op keeps, fp32 / bf16 / fp16."""
    from coft_fast.kernels import dual_prompt as module

    jits = {name: _jit_function(f"dual.{name}") for name in (
        "_dual_partial_kernel", "_dual_logit_grad_kernel", "_dual_rows_kernel", "_clean_probability_kernel",
        "_dual_finalize_kernel")}
    estimate = getattr(module, "tile_shared_memory", None)
    cases = []
    for dtype in ("fp32", "bf16", "fp16"):
        item = _TRITON_DTYPES[dtype]
        upcast = dtype == "fp32"
        for d in sizes_d:
            values = {
                "x_ptr": f"*{dtype}", "pos_ptr": f"*{dtype}", "neg_ptr": f"*{dtype}", "y_ptr": "*i64",
                "yc_ptr": "*i64", "scale_ptr": "*fp32", "scale_val": 1.0, "part_m_ptr": "*fp32",
                "part_l_ptr": "*fp32", "part_sy_ptr": "*fp32", "part_sc_ptr": "*fp32", "neg_y_ptr": "*fp32",
                "neg_c_ptr": "*fp32", "lse_ptr": "*fp32", "p_y_ptr": "*fp32", "p_c_ptr": "*fp32",
                "g_loss_ptr": "*fp32", "g_l1_ptr": "*fp32", "g_l2_ptr": "*fp32", "lam": 1.0, "grad_ptr": f"*{dtype}",
                "dx_ptr": f"*{dtype}", "dneg_ptr": "*fp32", "out_ptr": "*fp32", "loss_ptr": "*fp32", "l1_ptr": "*fp32",
                "l2_ptr": "*fp32", "N": BATCH, "C": CLASSES, "D": d, "SPLITS": 8, "stride_x": d, "stride_p": d,
                "stride_n": d, "cols_per_split": 128, "N_KEY": BATCH, "C_KEY": 1024, "SCALE_FROM_PTR": True,
                "UPCAST": upcast, "PRECISION": "tf32" if upcast else "ieee", "DETACH_POS": False, "NEED_DX": True,
                "NEED_DNEG": True, "S_PAD": 8, "BLOCK_N": 16, "BLOCK_D": module._block_d(d),
            }
            named = {**values, "x_ptr": _FakeTensor(item), "pos_ptr": _FakeTensor(item), "neg_ptr": _FakeTensor(item)}
            for config in _kept(module, "_prune_tiles", module._tile_configs(), capability, named, {}):
                for name in ("_dual_partial_kernel", "_dual_logit_grad_kernel"):
                    args = _kernel_args(jits[name], {**values, **config.kwargs})
                    cases.append(Case(f"dual.{name}", capability, args, config.num_warps, config.num_stages,
                                      f"{name} {dtype} d={d} {config.kwargs} w{config.num_warps} s{config.num_stages}",
                                      estimate(config, item, upcast) if estimate else None))
            cases.append(Case("dual._dual_rows_kernel", capability, _kernel_args(jits["_dual_rows_kernel"], values),
                              4, 3, f"rows {dtype} d={d}"))
            clean = _kernel_args(jits["_clean_probability_kernel"], {**values, "BLOCK_N": 32})
            cases.append(Case("dual._clean_probability_kernel", capability, clean, 4, 3, f"clean {dtype} d={d}"))
        finalize = _kernel_args(jits["_dual_finalize_kernel"],
                                {**values, "BLOCK_N": 128, "S_PAD": getattr(module, "MAX_SPLITS", 8)})
        cases.append(Case("dual._dual_finalize_kernel", capability, finalize, 4, 3, "finalize"))
    return cases


def all_cases(targets) -> List[Case]:
    """Every case for ``targets`` (capabilities such as 80, 90); identical specialisations once, their
    descriptions joined."""
    cases: Dict[tuple, Case] = {}
    for capability in targets:
        for case in queue_cases(capability) + dual_cases(capability):
            key = case.key()
            if key in cases:
                cases[key].what += " | " + case.what
            else:
                cases[key] = case
    return list(cases.values())


def violations(cases: List[Case]) -> List[str]:
    """One line per compiled case that would fail on its target: a compile error, shared memory above
    the target's limit or above the op's own estimate (its pruning would be wrong), spills above the budget."""
    from coft_fast.kernels import shared_memory_limit

    found = []
    for case in cases:
        result, where = case.result, f"sm_{case.capability} {case.kernel} [{case.what}]"
        if "error" in result:
            found.append(f"{where}: {result['error']}")
            continue
        limit = shared_memory_limit(case.capability)
        if result["shared"] > limit:
            found.append(f"{where}: {result['shared']} B of shared memory > the target's {limit} B")
        if case.estimate is not None and result["shared"] > case.estimate:
            found.append(f"{where}: {result['shared']} B of shared memory > the op's estimate {case.estimate} B")
        if result["spill_bytes"] > SPILL_BUDGET_BYTES:
            found.append(f"{where}: {result['spill_bytes']} B of spill stores > the budget {SPILL_BUDGET_BYTES} B")
    return found


def _use_queue_kernel(path: Optional[str]) -> None:
    """Load ``path`` as coft_fast.kernels.queue_loss (to check another version of the kernel, e.g. an old
    one from git history)."""
    if not path:
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("coft_fast.kernels.queue_loss", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["coft_fast.kernels.queue_loss"] = module
    spec.loader.exec_module(module)
    import coft_fast.kernels

    coft_fast.kernels.queue_loss = module


def _worker_init(cache_dir: str, queue_kernel: Optional[str]) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # a fresh cache: every compile runs ptxas and logs
    _use_queue_kernel(queue_kernel)


def run(targets, jobs: int = 2, queue_kernel: Optional[str] = None) -> List[Case]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: under the interpreter Triton does not compile")
    _use_queue_kernel(queue_kernel)
    cases = all_cases(targets)
    with tempfile.TemporaryDirectory() as cache, ProcessPoolExecutor(jobs, initializer=_worker_init,
                                                                     initargs=(cache, queue_kernel)) as pool:
        return list(pool.map(compile_case, cases))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, nargs="+", default=list(CI_TARGETS),
                        help="compute capabilities, e.g. 80 90")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes")
    parser.add_argument("--queue-kernel", help="check this file instead of coft_fast.kernels.queue_loss")
    parser.add_argument("--out", help="JSON report")
    args = parser.parse_args(argv)
    start = time.monotonic()
    cases = run(args.targets, args.jobs, args.queue_kernel)
    found = violations(cases)
    report = {"seconds": round(time.monotonic() - start, 1), "compiled": len(cases), "violations": found,
              "cases": [asdict(case) for case in cases]}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)
    print(f"{len(cases)} specialisations compiled for sm_{', sm_'.join(map(str, args.targets))} in "
          f"{report['seconds']} s; {len(found)} violations")
    for line in found:
        print("  " + line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
