// The `coft_fast._C` extension module: an empty Python module whose import runs the static
// TORCH_LIBRARY registrations below. The ops are reached as torch.ops.coft_fast.<name>; nothing is
// bound through pybind11, so the module only uses CPython's limited API (one abi3 build per
// platform) and does not link libtorch_python.
#include <Python.h>

#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "C++/CUDA kernels of coft_fast; the ops are registered as torch.ops.coft_fast.*",
      -1,    // no per-interpreter state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

// The schemas. Kernels register per backend: CPU in pseudo_label_cpu.cpp, CUDA only in
// cuda/pseudo_label_cuda.cu (so a CPU-only build simply lacks them). Fake (meta) kernels for
// torch.compile are registered from Python in coft_fast/ops/pseudo_label.py.
TORCH_LIBRARY(coft_fast, m) {
  m.def("pseudo_label_stats(Tensor logits, int num_bins=10) -> (Tensor labels, Tensor confidence, "
        "Tensor class_counts, Tensor confidence_hist)");
  m.def("class_balanced_topk(Tensor labels, Tensor scores, int k, int num_classes) -> "
        "(Tensor indices, Tensor counts)");
  m.def("agreement_matrix(Tensor labels_a, Tensor labels_b, int num_classes, Tensor? mask=None) -> Tensor");
}
