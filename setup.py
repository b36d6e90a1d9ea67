"""Build script: the pure-Python package plus, when csrc/ holds sources, the `coft_fast._C` extension.

The extension needs torch at build time, so install with `pip install --no-build-isolation -e .`
after torch (see README). It always holds the CPU kernels (csrc/*.cpp, parallel with
at::parallel_for / OpenMP); COFT_BUILD_CUDA selects the CUDA kernels (csrc/cuda/*.cu):
  auto (default)  only when torch sees a GPU and a CUDA toolkit (nvcc) is found, so the install
                  stays a fast CPU-only build on machines without a GPU;
  1               always (e.g. to build on a machine without a GPU): needs CUDA_HOME at a toolkit;
  0               never.
TORCH_CUDA_ARCH_LIST defaults to DEFAULT_CUDA_ARCHS (Ampere, Hopper, Blackwell, plus PTX).
The module uses only CPython's limited API (ops are reached through torch.ops.coft_fast), so
wheels are tagged abi3 and the module does not link libtorch_python.
"""
import glob
import importlib.util
import os

from setuptools import find_packages, setup

CSRC_DIR = "csrc"
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0;12.0+PTX"
PY_LIMITED_API = "cp310"  # requires-python >= 3.10; torch compiles with Py_LIMITED_API=0x030A0000


def _toolkit_found(cuda_home) -> bool:
    return bool(cuda_home) and os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")) and os.path.isfile(
        os.path.join(cuda_home, "include", "cuda_runtime.h"))


def _cuda_wanted(cpp_extension) -> bool:
    choice = os.environ.get("COFT_BUILD_CUDA", "auto").lower()
    if choice not in {"auto", "0", "1"}:
        raise SystemExit(f"COFT_BUILD_CUDA must be auto, 0 or 1, got {choice!r}")
    if choice == "0":
        return False
    toolkit = _toolkit_found(cpp_extension.CUDA_HOME)
    if choice == "1":
        if not toolkit:
            raise SystemExit(
                f"COFT_BUILD_CUDA=1 but no CUDA toolkit at CUDA_HOME={cpp_extension.CUDA_HOME!r} "
                "(need bin/nvcc and include/cuda_runtime.h): set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda")
        return True
    import torch

    return toolkit and torch.version.cuda is not None and torch.cuda.is_available()


def _nvidia_wheel_includes():
    """Header folders of the nvidia-* wheels that CUDA builds of torch depend on (cuBLAS, cuSPARSE,
    cuSOLVER, ...). ATen's CUDA headers include them, and a minimal toolkit may lack them. They go
    after the toolkit's own include folder."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    wanted = ("cublas_v2.h", "cusparse.h", "cusolverDn.h", "curand.h", "cufft.h")
    found = []
    for root in spec.submodule_search_locations:
        for folder in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if any(os.path.isfile(os.path.join(folder, header)) for header in wanted):
                found.append(folder)
    return found


def extension_modules():
    cpp_sources = sorted(glob.glob(os.path.join(CSRC_DIR, "*.cpp")))
    if not cpp_sources:
        return [], {}
    from torch.utils import cpp_extension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    extra = {"cxx": ["-O3", "-fopenmp"]}
    sources = list(cpp_sources)
    include_dirs = [os.path.abspath(CSRC_DIR)]
    extension = cpp_extension.CppExtension
    if _cuda_wanted(cpp_extension):
        sources += sorted(glob.glob(os.path.join(CSRC_DIR, "cuda", "*.cu")))
        extension = cpp_extension.CUDAExtension
        include_dirs += [os.path.join(cpp_extension.CUDA_HOME, "include")] + _nvidia_wheel_includes()
        extra["nvcc"] = ["-O3"]
    module = extension(
        "coft_fast._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],  # libgomp.so.1: at run time the copy torch loaded is reused
        py_limited_api=True,
    )
    return [module], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["coft_fast", "coft_fast.*"]) + ["coft_fast.kernels"],
    package_dir={"coft_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API}} if ext_modules else {},
)
