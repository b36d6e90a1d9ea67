// Shared by the CPU (csrc/*.cpp) and CUDA (csrc/cuda/*.cu) implementations of the coft_fast
// pseudo-label ops: argument checks on metadata (dtype, shape, device, scalar arguments), so
// that both backends raise the same errors, each naming the argument. Value checks (labels in
// range, no NaN) happen inside the kernels' own pass over the data.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace coft_fast {

// Schema of the three ops (registered in csrc/module.cpp).
//   pseudo_label_stats(Tensor logits, int num_bins=10) -> (labels, confidence, class_counts, confidence_hist)
//   class_balanced_topk(Tensor labels, Tensor scores, int k, int num_classes) -> (indices, counts)
//   agreement_matrix(Tensor labels_a, Tensor labels_b, int num_classes, Tensor? mask=None) -> Tensor

inline void check_logits(const at::Tensor& logits, int64_t num_bins) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be a 2-D (N, C) tensor, got shape ", logits.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), "logits must be floating point, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "logits must have at least one class column, got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(num_bins >= 1, "num_bins must be >= 1, got ", num_bins);
}

inline void check_num_classes(int64_t num_classes) {
  TORCH_CHECK_VALUE(num_classes >= 1, "num_classes must be >= 1, got ", num_classes);
}

inline void check_label_tensor(const char* name, const at::Tensor& labels) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong && labels.dim() == 1, name,
                   " must be a 1-D int64 tensor, got ", labels.scalar_type(), " of shape ", labels.sizes());
}

inline void check_same_device(const char* name, const at::Tensor& tensor, const char* ref_name,
                              const at::Tensor& ref) {
  TORCH_CHECK_VALUE(tensor.device() == ref.device(), name, " must be on the same device as ", ref_name,
                    " (", ref.device(), "), got ", tensor.device());
}

inline void check_topk_args(const at::Tensor& labels, const at::Tensor& scores, int64_t k, int64_t num_classes) {
  check_num_classes(num_classes);
  check_label_tensor("labels", labels);
  TORCH_CHECK_VALUE(at::isFloatingType(scores.scalar_type()) && scores.sizes() == labels.sizes(),
                    "scores must be a float tensor of shape ", labels.sizes(), ", got ", scores.scalar_type(),
                    " of shape ", scores.sizes());
  check_same_device("scores", scores, "labels", labels);
  TORCH_CHECK_VALUE(k >= 0, "k must be >= 0, got ", k);
}

inline void check_agreement_args(const at::Tensor& labels_a, const at::Tensor& labels_b, int64_t num_classes,
                                 const std::optional<at::Tensor>& mask) {
  check_num_classes(num_classes);
  check_label_tensor("labels_a", labels_a);
  check_label_tensor("labels_b", labels_b);
  TORCH_CHECK_VALUE(labels_b.size(0) == labels_a.size(0), "labels_b must have ", labels_a.size(0),
                    " entries (as labels_a), got ", labels_b.size(0));
  check_same_device("labels_b", labels_b, "labels_a", labels_a);
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->scalar_type() == at::kBool && mask->sizes() == labels_a.sizes(),
                      "mask must be a bool tensor of shape ", labels_a.sizes(), ", got ", mask->scalar_type(),
                      " of shape ", mask->sizes());
    check_same_device("mask", *mask, "labels_a", labels_a);
  }
}

// Equal-width confidence bins on [0, 1]; a confidence of exactly 1.0 falls in the last bin.
// The product is taken in float32, as the reference does (`(confidence * num_bins).long()`).
template <typename F>
C10_HOST_DEVICE inline int64_t confidence_bin(F confidence, int64_t num_bins) {
  const float scaled = static_cast<float>(confidence) * static_cast<float>(num_bins);
  int64_t bin = static_cast<int64_t>(scaled);
  bin = bin < 0 ? 0 : bin;
  return bin >= num_bins ? num_bins - 1 : bin;
}

}  // namespace coft_fast
