// CUDA kernels of the coft_fast pseudo-label ops. They register for the CUDA dispatch key here
// and only here, so a CPU-only build of coft_fast._C simply has no CUDA kernels.
//
// pseudo_label_stats: one warp per row (grid-stride over rows). Each lane keeps an online
//   softmax state (running max, sum of exp(l - max), first arg-max) over its strided columns, so
//   the row is read once, kUnroll columns per lane at a time: their loads are issued together and
//   the state is updated once per chunk, so a warp keeps kUnroll 128 B requests in flight instead of
//   one (the per-element branches used to serialise the loads); the warp merges the 32 states with
//   shuffles (ties to the lower class).
//   Per-class confidence histograms are counted in a per-block shared-memory histogram and merged
//   into the global one with one atomic per non-zero cell (global atomics when C * num_bins does
//   not fit in shared memory).
// class_balanced_topk: a segmented sort done as one stable radix sort (cub) on a composite key
//   (class << 32 | descending score bits), ties keep the index order; then each sorted position
//   knows its rank in its class from the exclusive scan of the class counts, and the first k of
//   every class are scattered to the output. No loop over classes anywhere. Double scores take two
//   stable passes (score, then class).
// agreement_matrix: shared-memory (C, C) histogram per block merged with atomics (global atomics
//   for large C).
// Integer atomics commute, the sort is stable and per-row values do not depend on the launch
// configuration, so all results are deterministic. Value errors (labels out of range, NaN) are
// flagged on the device and raised after one synchronisation; the selection needs that
// synchronisation anyway to size its output.
#include "pseudo_label.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/clamp_max.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace coft_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kUnroll = 8;  // columns per lane loaded together by the stats kernel

// grid for a grid-stride kernel: enough blocks for the work, at most what fits on the GPU at once
template <typename Kernel>
int grid_size(Kernel kernel, int64_t blocks_needed, size_t smem) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) *
                           at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks_needed, resident)));
}

// Whether `bytes` of dynamic shared memory can be used by `kernel` (opting in above 48 KiB).
template <typename Kernel>
bool use_shared_histogram(Kernel kernel, int64_t bytes) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        at::cuda::current_device()));
  if (bytes > optin / 2) return false;  // keep two blocks per SM at least
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  return true;
}

using ull = unsigned long long;

// ---------------------------------------------------------------------------------------------
// merge the online-softmax state (m2, s2, i2) into (m, s, i): s is sum exp(l - m) over its columns
__device__ __forceinline__ void merge_state(float& m, float& s, int& i, float m2, float s2, int i2) {
  if (m2 == -INFINITY) return;  // the other side saw no finite column
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    i = i2;
  } else if (m2 > m) {
    s = s * expf(m - m2) + s2;
    m = m2;
    i = i2;
  } else if (m2 < m) {
    s += s2 * expf(m2 - m);
  } else {
    s += s2;
    i = min(i, i2);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) pseudo_label_stats_kernel(
    const scalar_t* __restrict__ logits, int64_t N, int64_t C, int64_t B, int64_t* __restrict__ labels,
    float* __restrict__ confidence, ull* __restrict__ hist, bool shared_hist, ull* __restrict__ bad_row) {
  extern __shared__ unsigned int block_hist[];
  const int64_t cells = C * B;
  if (shared_hist) {
    for (int64_t c = threadIdx.x; c < cells; c += blockDim.x) block_hist[c] = 0u;
    __syncthreads();
  }
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = blockDim.x / kWarp;
  for (int64_t row = blockIdx.x * warps + threadIdx.x / kWarp; row < N; row += gridDim.x * warps) {
    const scalar_t* x = logits + row * C;
    float m = -INFINITY, s = 0.0f;
    int arg = 0;
    bool nan = false;
    for (int64_t base = 0; base < C; base += kWarp * kUnroll) {
      // all kUnroll loads of the chunk first (kUnroll coalesced requests in flight per warp), then
      // branch-free arithmetic: the next load never waits on the branches of the previous element
      float v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = base + u * kWarp + lane;
        v[u] = j < C ? static_cast<float>(x[j]) : -INFINITY;
      }
      float chunk_max = -INFINITY;
      int chunk_arg = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        nan |= isnan(v[u]);
        const bool larger = v[u] > chunk_max;  // strict, in column order: the chunk's first maximum
        chunk_max = larger ? v[u] : chunk_max;
        chunk_arg = larger ? static_cast<int>(base + u * kWarp + lane) : chunk_arg;
      }
      if (chunk_max == -INFINITY) continue;  // no finite column here (NaNs are flagged above)
      const float m_new = fmaxf(m, chunk_max);
      float add = 0.0f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) add += isnan(v[u]) ? 0.0f : expf(v[u] - m_new);
      s = s * expf(m - m_new) + add;  // (s = 0 and expf(-inf) = 0 before the first finite chunk)
      arg = chunk_max > m ? chunk_arg : arg;  // an equal later maximum keeps the earlier column
      m = m_new;
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
      const int i2 = __shfl_xor_sync(0xffffffffu, arg, offset);
      merge_state(m, s, arg, m2, s2, i2);
    }
    nan = __any_sync(0xffffffffu, nan);
    if (lane == 0) {
      if (nan || !isfinite(m)) {
        atomicMin(bad_row, static_cast<ull>(row));
        labels[row] = 0;
        confidence[row] = NAN;
      } else {
        const float conf = 1.0f / s;
        labels[row] = arg;
        confidence[row] = conf;
        const int64_t cell = arg * B + confidence_bin(conf, B);
        if (shared_hist) {
          atomicAdd(&block_hist[cell], 1u);
        } else {
          atomicAdd(&hist[cell], 1ull);
        }
      }
    }
  }
  if (shared_hist) {
    __syncthreads();
    for (int64_t c = threadIdx.x; c < cells; c += blockDim.x) {
      const unsigned int count = block_hist[c];
      if (count) atomicAdd(&hist[c], static_cast<ull>(count));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pseudo_label_stats_cuda(const at::Tensor& logits_in,
                                                                                   int64_t num_bins) {
  check_logits(logits_in, num_bins);
  TORCH_CHECK_VALUE(logits_in.size(1) <= std::numeric_limits<int>::max(), "logits has too many classes: ",
                    logits_in.size(1));
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t N = logits.size(0), C = logits.size(1), B = num_bins;
  const auto long_opts = logits.options().dtype(at::kLong);
  at::Tensor labels = at::empty({N}, long_opts);
  at::Tensor confidence = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor hist = at::zeros({C, B}, long_opts);
  if (N > 0) {
    at::Tensor bad_row = at::full({1}, N, long_opts);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "pseudo_label_stats_cuda", [&] {
      auto kernel = pseudo_label_stats_kernel<scalar_t>;
      const int64_t bytes = C * B * static_cast<int64_t>(sizeof(unsigned int));
      const bool shared = use_shared_histogram(kernel, bytes);
      const size_t smem = shared ? static_cast<size_t>(bytes) : 0;
      const int grid = grid_size(kernel, (N + kThreads / kWarp - 1) / (kThreads / kWarp), smem);
      kernel<<<grid, kThreads, smem, stream>>>(
          logits.const_data_ptr<scalar_t>(), N, C, B, labels.data_ptr<int64_t>(), confidence.data_ptr<float>(),
          reinterpret_cast<ull*>(hist.data_ptr<int64_t>()), shared, reinterpret_cast<ull*>(bad_row.data_ptr<int64_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const int64_t bad = bad_row.item<int64_t>();
    TORCH_CHECK_VALUE(bad == N, "logits must be finite (no NaN or +inf, and not a row of only -inf); row ", bad,
                      " is not");
  }
  return {labels, confidence, hist.sum(1), hist};
}

// ---------------------------------------------------------------------------------------------
// Order-preserving keys: larger score -> smaller key, so an ascending sort is by descending score.
// -0.0 is folded onto +0.0 (they compare equal, so they must tie).
__device__ __forceinline__ uint32_t descending_key(float s) {
  const uint32_t u = __float_as_uint(s + 0.0f);
  return ~((u & 0x80000000u) ? ~u : (u | 0x80000000u));
}

__device__ __forceinline__ uint64_t descending_key(double s) {
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(s + 0.0));
  return ~((u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull));
}

// Checks labels and scores, counts the classes and writes the sort keys (composite for float
// scores, score-only for double) and the identity permutation.
template <typename scalar_t, typename key_t>
__global__ void __launch_bounds__(kThreads) topk_keys_kernel(const int64_t* __restrict__ labels,
                                                             const scalar_t* __restrict__ scores, int64_t N, int64_t C,
                                                             key_t* __restrict__ keys, int64_t* __restrict__ order,
                                                             ull* __restrict__ class_counts, ull* __restrict__ bad) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t l = labels[i];
    const bool ok = l >= 0 && l < C;
    if (!ok) atomicMin(&bad[0], static_cast<ull>(i));
    if constexpr (sizeof(key_t) == 8 && !std::is_same_v<scalar_t, double>) {
      const float s = static_cast<float>(scores[i]);
      if (isnan(s)) atomicMin(&bad[1], static_cast<ull>(i));
      keys[i] = ok ? (static_cast<uint64_t>(l) << 32) | descending_key(s) : ~0ull;
    } else {
      const double s = static_cast<double>(scores[i]);
      if (isnan(s)) atomicMin(&bad[1], static_cast<ull>(i));
      keys[i] = descending_key(s);
    }
    order[i] = i;
    if (ok) atomicAdd(&class_counts[l], 1ull);
  }
}

__global__ void __launch_bounds__(kThreads) label_keys_kernel(const int64_t* __restrict__ labels,
                                                              const int64_t* __restrict__ order, int64_t N,
                                                              uint32_t* __restrict__ keys) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < N;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    keys[p] = static_cast<uint32_t>(labels[order[p]]);
  }
}

// sorted position p -> rank in its class; the first k of each class go to the output
__global__ void __launch_bounds__(kThreads) topk_gather_kernel(const int64_t* __restrict__ order,
                                                               const int64_t* __restrict__ labels, int64_t N,
                                                               const int64_t* __restrict__ class_start,
                                                               const int64_t* __restrict__ out_start, int64_t k,
                                                               int64_t* __restrict__ out) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < N;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = order[p];
    const int64_t l = labels[i];
    const int64_t rank = p - class_start[l];
    if (rank < k) out[out_start[l] + rank] = i;
  }
}

int bits_for(int64_t value) {  // bits needed to hold 0..value
  int bits = 0;
  while (value > 0) {
    ++bits;
    value >>= 1;
  }
  return bits;
}

template <typename key_t>
void radix_sort_pairs(const key_t* keys_in, key_t* keys_out, const int64_t* values_in, int64_t* values_out, int64_t n,
                      int begin_bit, int end_bit, const at::TensorOptions& opts) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int items = static_cast<int>(n);
  size_t workspace_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, workspace_bytes, keys_in, keys_out, values_in, values_out,
                                                 items, begin_bit, end_bit, stream));
  at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, opts.dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(workspace.data_ptr(), workspace_bytes, keys_in, keys_out, values_in,
                                                 values_out, items, begin_bit, end_bit, stream));
}

std::tuple<at::Tensor, at::Tensor> class_balanced_topk_cuda(const at::Tensor& labels_in, const at::Tensor& scores_in,
                                                            int64_t k, int64_t num_classes) {
  check_topk_args(labels_in, scores_in, k, num_classes);
  const c10::cuda::CUDAGuard guard(labels_in.device());
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor scores = scores_in.contiguous();
  const int64_t N = labels.size(0), C = num_classes;
  TORCH_CHECK_VALUE(N < std::numeric_limits<int>::max(), "class_balanced_topk on CUDA takes fewer than 2^31 samples, got ", N);
  TORCH_CHECK_VALUE(C <= std::numeric_limits<uint32_t>::max(), "num_classes must be < 2^32, got ", C);
  const auto opts = labels.options();
  if (N == 0) return {at::empty({0}, opts), at::zeros({C}, opts)};

  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor counts = at::zeros({C}, opts);
  at::Tensor bad = at::full({2}, N, opts);
  at::Tensor order = at::empty({N}, opts), sorted_order = at::empty({N}, opts);
  const bool double_scores = scores.scalar_type() == at::kDouble;
  at::Tensor keys = at::empty({N}, opts), sorted_keys = at::empty({N}, opts);  // 64-bit keys
  const int blocks = grid_size(topk_gather_kernel, (N + kThreads - 1) / kThreads, 0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "class_balanced_topk_cuda", [&] {
    topk_keys_kernel<scalar_t, uint64_t><<<blocks, kThreads, 0, stream>>>(
        labels.const_data_ptr<int64_t>(), scores.const_data_ptr<scalar_t>(), N, C,
        reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()), order.data_ptr<int64_t>(),
        reinterpret_cast<ull*>(counts.data_ptr<int64_t>()), reinterpret_cast<ull*>(bad.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // exclusive scans: where each class starts among the sorted samples and in the output
  const at::Tensor taken = at::clamp_max(counts, k);
  const at::Tensor class_start = at::sub(at::cumsum(counts, 0), counts);
  const at::Tensor out_start = at::sub(at::cumsum(taken, 0), taken);
  const at::Tensor host = at::cat({bad, taken.sum().view({1})}).cpu();  // the one synchronisation
  const int64_t* h = host.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(h[0] == N, "labels must lie in [0, ", C - 1, "], got ", h[0] < N ? labels[h[0]].item<int64_t>() : 0,
                    " at index ", h[0]);
  TORCH_CHECK_VALUE(h[1] == N, "scores must not contain NaN, found one at index ", h[1]);
  at::Tensor out = at::empty({h[2]}, opts);
  if (h[2] == 0) return {out, taken};

  const auto* keys_in = reinterpret_cast<const uint64_t*>(keys.const_data_ptr<int64_t>());
  auto* keys_out = reinterpret_cast<uint64_t*>(sorted_keys.data_ptr<int64_t>());
  if (!double_scores) {
    radix_sort_pairs(keys_in, keys_out, order.const_data_ptr<int64_t>(), sorted_order.data_ptr<int64_t>(), N, 0,
                     32 + bits_for(C - 1), opts);
  } else {
    // by descending score, then (stable) by class
    radix_sort_pairs(keys_in, keys_out, order.const_data_ptr<int64_t>(), sorted_order.data_ptr<int64_t>(), N, 0, 64,
                     opts);
    at::Tensor label_keys = at::empty({N}, opts.dtype(at::kInt)), sorted_label_keys = at::empty({N}, opts.dtype(at::kInt));
    label_keys_kernel<<<blocks, kThreads, 0, stream>>>(labels.const_data_ptr<int64_t>(),
                                                       sorted_order.const_data_ptr<int64_t>(), N,
                                                       reinterpret_cast<uint32_t*>(label_keys.data_ptr<int>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    radix_sort_pairs(reinterpret_cast<const uint32_t*>(label_keys.const_data_ptr<int>()),
                     reinterpret_cast<uint32_t*>(sorted_label_keys.data_ptr<int>()), sorted_order.const_data_ptr<int64_t>(),
                     order.data_ptr<int64_t>(), N, 0, std::max(1, bits_for(C - 1)), opts);
    std::swap(order, sorted_order);
  }
  topk_gather_kernel<<<blocks, kThreads, 0, stream>>>(sorted_order.const_data_ptr<int64_t>(),
                                                      labels.const_data_ptr<int64_t>(), N,
                                                      class_start.const_data_ptr<int64_t>(),
                                                      out_start.const_data_ptr<int64_t>(), k, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, taken};
}

// ---------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) agreement_kernel(const int64_t* __restrict__ a,
                                                             const int64_t* __restrict__ b,
                                                             const bool* __restrict__ mask, int64_t N, int64_t C,
                                                             ull* __restrict__ out, bool shared_hist,
                                                             ull* __restrict__ bad) {
  extern __shared__ unsigned int block_hist[];
  const int64_t cells = C * C;
  if (shared_hist) {
    for (int64_t c = threadIdx.x; c < cells; c += blockDim.x) block_hist[c] = 0u;
    __syncthreads();
  }
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t la = a[i], lb = b[i];
    const bool ok_a = la >= 0 && la < C, ok_b = lb >= 0 && lb < C;
    if (!ok_a) atomicMin(&bad[0], static_cast<ull>(i));
    if (!ok_b) atomicMin(&bad[1], static_cast<ull>(i));
    if (ok_a && ok_b && (mask == nullptr || mask[i])) {
      if (shared_hist) {
        atomicAdd(&block_hist[la * C + lb], 1u);
      } else {
        atomicAdd(&out[la * C + lb], 1ull);
      }
    }
  }
  if (shared_hist) {
    __syncthreads();
    for (int64_t c = threadIdx.x; c < cells; c += blockDim.x) {
      const unsigned int count = block_hist[c];
      if (count) atomicAdd(&out[c], static_cast<ull>(count));
    }
  }
}

at::Tensor agreement_matrix_cuda(const at::Tensor& labels_a_in, const at::Tensor& labels_b_in, int64_t num_classes,
                                 const std::optional<at::Tensor>& mask_in) {
  check_agreement_args(labels_a_in, labels_b_in, num_classes, mask_in);
  const c10::cuda::CUDAGuard guard(labels_a_in.device());
  const at::Tensor a = labels_a_in.contiguous();
  const at::Tensor b = labels_b_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const int64_t N = a.size(0), C = num_classes;
  at::Tensor out = at::zeros({C, C}, a.options());
  if (N == 0) return out;
  at::Tensor bad = at::full({2}, N, a.options());
  const int64_t bytes = C * C * static_cast<int64_t>(sizeof(unsigned int));
  const bool shared = use_shared_histogram(agreement_kernel, bytes);
  const size_t smem = shared ? static_cast<size_t>(bytes) : 0;
  const int grid = grid_size(agreement_kernel, (N + kThreads - 1) / kThreads, smem);
  agreement_kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      a.const_data_ptr<int64_t>(), b.const_data_ptr<int64_t>(), mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
      N, C, reinterpret_cast<ull*>(out.data_ptr<int64_t>()), shared, reinterpret_cast<ull*>(bad.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor host = bad.cpu();
  const int64_t* h = host.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(h[0] == N, "labels_a must lie in [0, ", C - 1, "], got ", h[0] < N ? a[h[0]].item<int64_t>() : 0,
                    " at index ", h[0]);
  TORCH_CHECK_VALUE(h[1] == N, "labels_b must lie in [0, ", C - 1, "], got ", h[1] < N ? b[h[1]].item<int64_t>() : 0,
                    " at index ", h[1]);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(coft_fast, CUDA, m) {
  m.impl("pseudo_label_stats", &pseudo_label_stats_cuda);
  m.impl("class_balanced_topk", &class_balanced_topk_cuda);
  m.impl("agreement_matrix", &agreement_matrix_cuda);
}

}  // namespace coft_fast
