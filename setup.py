"""Build script: the pure-Python package plus, when csrc/ holds sources, the `coft_fast._C` extension.

The extension needs torch at build time, so install with `pip install --no-build-isolation -e .`
after torch (see README). COFT_BUILD_CUDA selects the CUDA part: `auto` (default: a usable GPU and a
CUDA toolkit), `1` (force, e.g. to build on a machine without a GPU) or `0` (never).
"""
import glob
import os

from setuptools import find_packages, setup

CSRC_DIR = "csrc"


def _cuda_wanted(torch_utils) -> bool:
    choice = os.environ.get("COFT_BUILD_CUDA", "auto").lower()
    if choice not in {"auto", "0", "1"}:
        raise SystemExit(f"COFT_BUILD_CUDA must be auto, 0 or 1, got {choice!r}")
    if choice == "0":
        return False
    toolkit = torch_utils.CUDA_HOME is not None
    if choice == "1":
        if not toolkit:
            raise SystemExit("COFT_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        return True
    import torch

    return toolkit and torch.cuda.is_available()


def extension_modules():
    cpp_sources = sorted(glob.glob(os.path.join(CSRC_DIR, "*.cpp")))
    if not cpp_sources:
        return [], {}
    from torch.utils import cpp_extension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    extra = {"cxx": ["-O3", "-fopenmp"]}
    sources = list(cpp_sources)
    extension = cpp_extension.CppExtension
    if _cuda_wanted(cpp_extension):
        sources += sorted(glob.glob(os.path.join(CSRC_DIR, "cuda", "*.cu")))
        extension = cpp_extension.CUDAExtension
        extra["nvcc"] = ["-O3", "--use_fast_math"]
    module = extension(
        "coft_fast._C",
        sources,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [module], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["coft_fast", "coft_fast.*"]) + ["coft_fast.kernels"],
    package_dir={"coft_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
