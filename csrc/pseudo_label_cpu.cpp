// CPU kernels of the coft_fast pseudo-label ops, parallel over rows with at::parallel_for.
//
// pseudo_label_stats reads every row of the logits once: an explicit SIMD pass finds the row
// maximum (and its first index), a second pass over the same row (now in L1) sums exp(l - max)
// with a vectorised exponential (8 vector operations on AVX-512; a NaN anywhere in the row makes
// the sum NaN, so there is no separate NaN scan). While that second pass runs, it requests the
// cache lines of a row a few places ahead, one line per vector of exponentials, so that memory
// keeps streaming at an even rate during the arithmetic; per-class confidence histograms are
// counted per chunk of rows and summed at the end. The SIMD width is chosen at run time (AVX-512, AVX2+FMA or portable
// scalar code), so one build runs on any x86-64 CPU and the extension needs no -march flags.
//
// class_balanced_topk counts the classes per chunk of samples (one pass), then each chunk keeps,
// per class, a bounded heap of its k best samples (most samples are dropped by one compare
// against the class's current worst kept score), and finally every class sorts its at most
// chunks * k candidates, in parallel over classes. agreement_matrix counts label pairs per chunk of rows.
// All results are deterministic: per-row values do not depend on the chunking and the
// chunk-local counts are integers.
#include "pseudo_label.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define COFT_X86 1
#include <immintrin.h>
// GCC 12 flags the deliberately undefined vectors inside its own AVX-512 intrinsics (false positive)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace coft_fast {
namespace {

// Caps on the chunk-local count arrays (in int64 cells, all chunks together).
constexpr int64_t kLocalCellBudget = int64_t(1) << 24;  // 128 MiB
// Minimum work (in elements) per chunk before another chunk is worth a thread.
constexpr int64_t kGrainElements = int64_t(1) << 15;

int64_t num_chunks(int64_t work_items, int64_t items_per_chunk, int64_t cells_per_chunk) {
  int64_t chunks = std::min<int64_t>(at::get_num_threads(), (work_items + items_per_chunk - 1) / items_per_chunk);
  if (cells_per_chunk > 0) chunks = std::min<int64_t>(chunks, kLocalCellBudget / cells_per_chunk);
  return std::max<int64_t>(chunks, 1);
}

// ---------------------------------------------------------------------------------------------
// One row of logits -> (first arg-max, max, sum of exp(l - max)). No path scans for NaN: a NaN in
// the row makes the sum NaN (or, in the SIMD paths, possibly the maximum), and the caller rejects a
// row whose sum is NaN or whose maximum is not finite.
struct RowStat {
  int64_t label;
  float max;
  float sum;
};

// Requests every cache line of a row of C values in one burst (the row need not start on a line).
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t C) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t size = C * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t offset = 0; offset < size; offset += 64) __builtin_prefetch(bytes + offset, 0, 3);
  __builtin_prefetch(bytes + size - 1, 0, 3);
}

// Every row function takes `ahead`, a row whose cache lines it requests while it works (nullptr:
// none); the SIMD paths spread those requests over their exponential pass.
RowStat row_stat_scalar(const float* x, int64_t C, const float* ahead) {
  if (ahead) prefetch_row(ahead, C);
  float m = -std::numeric_limits<float>::infinity();
  int64_t arg = 0;
  for (int64_t j = 0; j < C; ++j) {
    if (x[j] > m) {  // strict: ties keep the lower index; a NaN never compares greater
      m = x[j];
      arg = j;
    }
  }
  double s = 0.0;  // a sequential sum: accumulate in double (this path is the slow fallback anyway)
  for (int64_t j = 0; j < C; ++j) s += std::exp(x[j] - m);
  return {arg, m, static_cast<float>(s)};
}

#ifdef COFT_X86
constexpr float kLog2e = 1.44269504088896341f;

// AVX-512: exp(d) = 2^y with y = d * log2(e). VREDUCEPS takes f = y - floor(y) in [0, 1), 2^f is a
// degree-5 polynomial (a relative-error fit on [0, 1] with p(0) = 1 exactly: at most 7.4e-8, 1.6e-7
// when evaluated in float32) and VSCALEFPS multiplies by 2^floor(y) itself: 8 vector operations,
// no clamp and no rounding step. y = -inf, or y far below -149, gives exactly 0; a NaN stays NaN,
// so a NaN in the row makes the sum NaN and the caller needs no separate NaN scan. d = 0 gives
// exactly 1, so a row with one finite entry has confidence exactly 1. The kernel is bound by
// vector arithmetic on the 2-core machines here (about as long as reading the row from memory),
// so every operation counts.
constexpr float kR1 = 0.69315105676651f, kR2 = 0.24016660451889038f, kR3 = 0.05579448491334915f,
                kR4 = 0.009022697806358337f, kR5 = 0.001865033758804202f;

__attribute__((target("avx512f,avx512dq"))) inline __m512 exp_avx512(__m512 d) {
  const __m512 y = _mm512_mul_ps(d, _mm512_set1_ps(kLog2e));
  const __m512 f = _mm512_reduce_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kR5), f, _mm512_set1_ps(kR4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kR3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kR2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kR1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, y);  // p * 2^floor(y)
}

__attribute__((target("avx512f,avx512dq"))) RowStat row_stat_avx512(const float* x, int64_t C, const float* ahead) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int64_t j = 0;
  for (; j + 64 <= C; j += 64) {
    const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + 16);
    const __m512 c = _mm512_loadu_ps(x + j + 32), d = _mm512_loadu_ps(x + j + 48);
    m0 = _mm512_max_ps(m0, a);
    m1 = _mm512_max_ps(m1, b);
    m2 = _mm512_max_ps(m2, c);
    m3 = _mm512_max_ps(m3, d);
  }
  for (; j + 16 <= C; j += 16) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + j));
  }
  const int64_t rest = C - j;
  const __mmask16 tail = static_cast<__mmask16>((1u << rest) - 1u);
  if (rest > 0) {
    m0 = _mm512_max_ps(m0, _mm512_mask_loadu_ps(ninf, tail, x + j));
  }
  const float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
  const __m512 vm = _mm512_set1_ps(m);

  // first index of the maximum
  int64_t arg = 0;
  bool found = false;
  for (j = 0; j + 16 <= C; j += 16) {
    const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), vm, _CMP_EQ_OQ);
    if (eq) {
      arg = j + __builtin_ctz(static_cast<unsigned>(eq));
      found = true;
      break;
    }
  }
  if (!found && rest > 0) {
    const __mmask16 eq = _mm512_mask_cmp_ps_mask(tail, _mm512_mask_loadu_ps(ninf, tail, x + j), vm, _CMP_EQ_OQ);
    if (eq) arg = j + __builtin_ctz(static_cast<unsigned>(eq));
  }

  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  for (j = 0; j + 32 <= C; j += 32) {
    if (ahead) {
      __builtin_prefetch(ahead + j, 0, 3);
      __builtin_prefetch(ahead + j + 16, 0, 3);
    }
    s0 = _mm512_add_ps(s0, exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm)));
    s1 = _mm512_add_ps(s1, exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16), vm)));
  }
  for (; j + 16 <= C; j += 16) {
    if (ahead) __builtin_prefetch(ahead + j, 0, 3);
    s0 = _mm512_add_ps(s0, exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm)));
  }
  if (rest > 0) {
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_mask_loadu_ps(vm, tail, x + j), vm));
    s1 = _mm512_mask_add_ps(s1, tail, s1, e);
  }
  if (ahead) __builtin_prefetch(ahead + C - 1, 0, 3);  // the row's last line
  const float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  return {arg, m, s};
}

// AVX2 (no VREDUCEPS / VSCALEFPS): exp(x) for x <= 0 as 2^n * 2^f with n = round(x * log2(e)),
// f = x * log2(e) - n in [-1/2, 1/2] taken with one FMA, 2^f by a degree-5 polynomial (a
// relative-error fit: at most 1.9e-7 when evaluated in float32) and 2^n built in the exponent
// field. x is clamped at -87 (exp ~1e-38, nothing against a sum >= 1) by max(-87, x), which passes
// a NaN through.
constexpr float kC1 = 0.6931470036506653f, kC2 = 0.24022242426872253f, kC3 = 0.05550733581185341f,
                kC4 = 0.009671512991189957f, kC5 = 0.001326472731307149f;

__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // a NaN x is the second operand: it stays NaN
  const __m256 log2e = _mm256_set1_ps(kLog2e);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_fmsub_ps(x, log2e, n);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kC5), f, _mm256_set1_ps(kC4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kC1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  // 2^n through the exponent field; n is in [-126, 0], so the scale stays a normal float
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) inline float hmax_avx2(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 0x55));
  return _mm_cvtss_f32(m);
}

__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) RowStat row_stat_avx2(const float* x, int64_t C, const float* ahead) {
  const float inf = std::numeric_limits<float>::infinity();
  const __m256 ninf = _mm256_set1_ps(-inf);
  __m256 m0 = ninf, m1 = ninf;
  int64_t j = 0;
  for (; j + 16 <= C; j += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + j + 8));
  }
  for (; j + 8 <= C; j += 8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j));
  const int64_t vec_end = j;
  float m = hmax_avx2(_mm256_max_ps(m0, m1));
  for (; j < C; ++j) m = std::max(m, x[j]);  // std::max(m, NaN) keeps m; the sum catches the NaN
  const __m256 vm = _mm256_set1_ps(m);

  int64_t arg = 0;
  bool found = false;
  for (j = 0; j < vec_end; j += 8) {
    const int eq = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), vm, _CMP_EQ_OQ));
    if (eq) {
      arg = j + __builtin_ctz(static_cast<unsigned>(eq));
      found = true;
      break;
    }
  }
  for (j = vec_end; !found && j < C; ++j) {
    if (x[j] == m) {
      arg = j;
      found = true;
    }
  }

  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (j = 0; j + 16 <= vec_end; j += 16) {
    if (ahead) __builtin_prefetch(ahead + j, 0, 3);
    s0 = _mm256_add_ps(s0, exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm)));
    s1 = _mm256_add_ps(s1, exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8), vm)));
  }
  for (; j < vec_end; j += 8) {
    s0 = _mm256_add_ps(s0, exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm)));
  }
  if (ahead) {
    __builtin_prefetch(ahead + j, 0, 3);
    __builtin_prefetch(ahead + C - 1, 0, 3);
  }
  float s = hsum_avx2(_mm256_add_ps(s0, s1));
  for (j = vec_end; j < C; ++j) s += std::exp(x[j] - m);
  return {arg, m, s};
}
#endif  // COFT_X86

using RowFn = RowStat (*)(const float* row, int64_t C, const float* ahead);

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512"};

bool isa_supported(int isa) {
  if (isa == kScalar) return true;
#ifdef COFT_X86
  __builtin_cpu_init();
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

int best_isa() {
  for (int isa : {kAvx512, kAvx2}) {
    if (isa_supported(isa)) return isa;
  }
  return kScalar;
}

std::atomic<int>& active_isa() {
  static std::atomic<int> isa{best_isa()};
  return isa;
}

RowFn row_fn() {
  switch (active_isa().load()) {
#ifdef COFT_X86
    case kAvx512:
      return row_stat_avx512;
    case kAvx2:
      return row_stat_avx2;
#endif
    default:
      return row_stat_scalar;
  }
}

// _cpu_isa(request): the SIMD path of the CPU stats kernel. "" asks, "auto" picks the widest the
// CPU has, "avx512" / "avx2" / "scalar" force one (tests use this to cover every path).
std::string cpu_isa(const std::string& request) {
  if (!request.empty()) {
    int isa = -1;
    if (request == "auto") isa = best_isa();
    for (int i = 0; i < 3; ++i) {
      if (request == kIsaNames[i]) isa = i;
    }
    TORCH_CHECK_VALUE(isa >= 0, "isa must be one of '', 'auto', 'avx512', 'avx2', 'scalar', got '", request, "'");
    TORCH_CHECK_VALUE(isa_supported(isa), "this CPU does not support the ", request, " kernel");
    active_isa().store(isa);
  }
  return kIsaNames[active_isa().load()];
}

// ---------------------------------------------------------------------------------------------
// A row as float32: float rows are used in place, other dtypes are converted (computed in float32,
// as the reference does with `logits.float()`).
inline const float* float_row(const float* row, int64_t, std::vector<float>&) { return row; }

template <typename scalar_t>
const float* float_row(const scalar_t* row, int64_t C, std::vector<float>& buffer) {
  for (int64_t j = 0; j < C; ++j) buffer[j] = static_cast<float>(row[j]);
  return buffer.data();
}

// How many rows ahead of the current one the row functions request cache lines: the SIMD passes
// over a row are compute-bound and the hardware prefetcher does not run far enough ahead on its
// own, so without this the memory sits idle while a row's exponentials run. Float rows pass the
// row to the row function, which spreads the requests over its exponential pass (one burst of
// requests at the start of each row was slower); converted rows (half, bfloat16, double) are
// requested in one burst here.
#ifndef COFT_PREFETCH_ROWS
#define COFT_PREFETCH_ROWS 2
#endif
constexpr int64_t kPrefetchRows = COFT_PREFETCH_ROWS;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pseudo_label_stats_cpu(const at::Tensor& logits_in,
                                                                                  int64_t num_bins) {
  check_logits(logits_in, num_bins);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t N = logits.size(0), C = logits.size(1), B = num_bins;
  const auto long_opts = logits.options().dtype(at::kLong);
  at::Tensor labels = at::empty({N}, long_opts);
  at::Tensor confidence = at::empty({N}, logits.options().dtype(at::kFloat));
  const int64_t cells = C * B;
  const int64_t chunks = num_chunks(N, std::max<int64_t>(1, kGrainElements / C), cells);
  at::Tensor local = at::zeros({chunks, C, B}, long_opts);
  std::vector<int64_t> first_bad(chunks, N);
  const RowFn fn = row_fn();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "pseudo_label_stats_cpu", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    int64_t* out_labels = labels.data_ptr<int64_t>();
    float* out_conf = confidence.data_ptr<float>();
    int64_t* counts = local.data_ptr<int64_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      std::vector<float> buffer(std::is_same_v<scalar_t, float> ? 0 : C);
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        int64_t* hist = counts + chunk * cells;
        const int64_t row_end = N * (chunk + 1) / chunks;
        for (int64_t r = N * chunk / chunks; r < row_end; ++r) {
          const float* ahead = nullptr;
          if (r + kPrefetchRows < row_end) {
            if constexpr (std::is_same_v<scalar_t, float>) {
              ahead = reinterpret_cast<const float*>(x + (r + kPrefetchRows) * C);
            } else {
              prefetch_row(x + (r + kPrefetchRows) * C, C);
            }
          }
          const RowStat st = fn(float_row(x + r * C, C, buffer), C, ahead);
          if (std::isnan(st.sum) || !std::isfinite(st.max)) {
            if (first_bad[chunk] == N) first_bad[chunk] = r;
            out_labels[r] = 0;
            out_conf[r] = std::numeric_limits<float>::quiet_NaN();
            continue;
          }
          const float conf = 1.0f / st.sum;
          out_labels[r] = st.label;
          out_conf[r] = conf;
          hist[st.label * B + confidence_bin(conf, B)] += 1;
        }
      }
    });
  });
  const int64_t bad = *std::min_element(first_bad.begin(), first_bad.end());
  TORCH_CHECK_VALUE(bad == N, "logits must be finite (no NaN or +inf, and not a row of only -inf); row ", bad,
                    " is not");
  at::Tensor hist = chunks == 1 ? local[0] : local.sum(0);
  return {labels, confidence, hist.sum(1), hist};
}

// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct Entry {
  acc_t score;
  int64_t index;
};

template <typename acc_t>
inline bool better(const Entry<acc_t>& a, const Entry<acc_t>& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

// A bounded heap of a class's best samples so far: the root (heap[0]) is the worst kept one.
template <typename acc_t>
struct HeapState {
  acc_t worst;     // heap[0].score once the heap is full (+inf before: nothing is displaced yet)
  int64_t size;    // entries held
  int64_t cap;     // min(k, samples of the class in this chunk)
  int64_t offset;  // where the heap lives in the storage
};

// Replace the root (the worst kept entry) by `entry`, which is better, and restore the heap.
template <typename acc_t>
void replace_worst(Entry<acc_t>* heap, int64_t n, Entry<acc_t> entry) {
  int64_t hole = 0;
  while (true) {
    int64_t child = 2 * hole + 1;
    if (child >= n) break;
    // the worse of the two children moves up, if it is worse than the entry
    if (child + 1 < n && better(heap[child], heap[child + 1])) ++child;
    if (!better(entry, heap[child])) break;
    heap[hole] = heap[child];
    hole = child;
  }
  heap[hole] = entry;
}

std::tuple<at::Tensor, at::Tensor> class_balanced_topk_cpu(const at::Tensor& labels_in, const at::Tensor& scores_in,
                                                           int64_t k, int64_t num_classes) {
  check_topk_args(labels_in, scores_in, k, num_classes);
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor scores = scores_in.contiguous();
  const int64_t N = labels.size(0), C = num_classes;
  const auto long_opts = labels.options();
  const int64_t chunks = num_chunks(N, kGrainElements, C);
  const int64_t* lab = labels.const_data_ptr<int64_t>();

  at::Tensor taken = at::empty({C}, long_opts);
  at::Tensor indices;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "class_balanced_topk_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* sc = scores.const_data_ptr<scalar_t>();

    // pass 1: per-chunk class counts, and the value checks
    std::vector<int64_t> counts(chunks * C, 0);
    std::vector<int64_t> bad_label(chunks, N), bad_score(chunks, N);
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        int64_t* cnt = counts.data() + chunk * C;
        const int64_t end = N * (chunk + 1) / chunks;
        for (int64_t i = N * chunk / chunks; i < end; ++i) {
          const int64_t l = lab[i];
          if (l < 0 || l >= C) {
            if (bad_label[chunk] == N) bad_label[chunk] = i;
            continue;
          }
          if (std::isnan(static_cast<acc_t>(sc[i])) && bad_score[chunk] == N) bad_score[chunk] = i;
          cnt[l] += 1;
        }
      }
    });
    const int64_t bl = *std::min_element(bad_label.begin(), bad_label.end());
    TORCH_CHECK_VALUE(bl == N, "labels must lie in [0, ", C - 1, "], got ", bl < N ? lab[bl] : 0, " at index ", bl);
    const int64_t bs = *std::min_element(bad_score.begin(), bad_score.end());
    TORCH_CHECK_VALUE(bs == N, "scores must not contain NaN, found one at index ", bs);

    // Storage for one bounded heap per (class, chunk): min(k, members of the class in the chunk)
    // entries, class-major, so a class's candidates from all chunks are contiguous (at most N).
    std::vector<int64_t> heap_start(chunks * C), class_start(C + 1, 0), out_start(C + 1, 0);
    int64_t* tk = taken.data_ptr<int64_t>();
    int64_t offset = 0;
    for (int64_t c = 0; c < C; ++c) {
      class_start[c] = offset;
      int64_t members = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        heap_start[chunk * C + c] = offset;
        offset += std::min<int64_t>(k, counts[chunk * C + c]);
        members += counts[chunk * C + c];
      }
      tk[c] = std::min<int64_t>(members, k);
      out_start[c + 1] = out_start[c] + tk[c];
    }
    class_start[C] = offset;

    // pass 2: each chunk keeps, per class, its k best samples in a heap whose root is the worst
    // kept one; a sample is dropped with one compare against that root's score (samples come in
    // index order, so an equal score never displaces a kept one: ties go to the lower index)
    std::vector<Entry<acc_t>> storage(offset);
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      std::vector<HeapState<acc_t>> state(C);  // one cache line access per sample
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        for (int64_t c = 0; c < C; ++c) {
          state[c] = {std::numeric_limits<acc_t>::infinity(), 0, std::min<int64_t>(k, counts[chunk * C + c]),
                      heap_start[chunk * C + c]};
        }
        const int64_t end = N * (chunk + 1) / chunks;
        for (int64_t i = N * chunk / chunks; i < end; ++i) {
          HeapState<acc_t>& st = state[lab[i]];
          const acc_t score = static_cast<acc_t>(sc[i]);
          if (st.size == st.cap) {
            if (!(score > st.worst)) continue;  // the common case once a heap is full
            Entry<acc_t>* heap = storage.data() + st.offset;
            replace_worst(heap, st.cap, {score, i});
            st.worst = heap[0].score;
          } else {
            Entry<acc_t>* heap = storage.data() + st.offset;
            heap[st.size++] = {score, i};
            if (st.size == st.cap) {
              std::make_heap(heap, heap + st.cap, better<acc_t>);
              st.worst = heap[0].score;
            }
          }
        }
      }
    });

    // pass 3, per class: the k best of its candidates (score descending, index ascending)
    indices = at::empty({out_start[C]}, long_opts);
    int64_t* out = indices.data_ptr<int64_t>();
    const int64_t class_grain = std::max<int64_t>(1, C * kGrainElements / std::max<int64_t>(offset, 1));
    at::parallel_for(0, C, class_grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t t = tk[c];
        if (t == 0) continue;
        Entry<acc_t>* first = storage.data() + class_start[c];
        Entry<acc_t>* last = storage.data() + class_start[c + 1];
        if (first + t < last) std::nth_element(first, first + t, last, better<acc_t>);
        std::sort(first, first + t, better<acc_t>);
        for (int64_t i = 0; i < t; ++i) out[out_start[c] + i] = first[i].index;
      }
    });
  });
  return {indices, taken};
}

// ---------------------------------------------------------------------------------------------
at::Tensor agreement_matrix_cpu(const at::Tensor& labels_a_in, const at::Tensor& labels_b_in, int64_t num_classes,
                                const std::optional<at::Tensor>& mask_in) {
  check_agreement_args(labels_a_in, labels_b_in, num_classes, mask_in);
  const at::Tensor labels_a = labels_a_in.contiguous();
  const at::Tensor labels_b = labels_b_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const int64_t N = labels_a.size(0), C = num_classes, cells = C * C;
  const int64_t chunks = num_chunks(N, kGrainElements, cells);
  at::Tensor local = at::zeros({chunks, C, C}, labels_a.options());
  const int64_t* a = labels_a.const_data_ptr<int64_t>();
  const int64_t* b = labels_b.const_data_ptr<int64_t>();
  const bool* keep = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  int64_t* counts = local.data_ptr<int64_t>();
  std::vector<int64_t> bad_a(chunks, N), bad_b(chunks, N);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      int64_t* cnt = counts + chunk * cells;
      const int64_t end = N * (chunk + 1) / chunks;
      for (int64_t i = N * chunk / chunks; i < end; ++i) {
        const int64_t la = a[i], lb = b[i];
        const bool ok_a = la >= 0 && la < C, ok_b = lb >= 0 && lb < C;
        if (!ok_a && bad_a[chunk] == N) bad_a[chunk] = i;
        if (!ok_b && bad_b[chunk] == N) bad_b[chunk] = i;
        if (ok_a && ok_b && (keep == nullptr || keep[i])) cnt[la * C + lb] += 1;
      }
    }
  });
  const int64_t ba = *std::min_element(bad_a.begin(), bad_a.end());
  TORCH_CHECK_VALUE(ba == N, "labels_a must lie in [0, ", C - 1, "], got ", ba < N ? a[ba] : 0, " at index ", ba);
  const int64_t bb = *std::min_element(bad_b.begin(), bad_b.end());
  TORCH_CHECK_VALUE(bb == N, "labels_b must lie in [0, ", C - 1, "], got ", bb < N ? b[bb] : 0, " at index ", bb);
  return chunks == 1 ? local[0] : local.sum(0);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(coft_fast, m) {
  m.def("_cpu_isa(str request='') -> str", &cpu_isa);
}

TORCH_LIBRARY_IMPL(coft_fast, CPU, m) {
  m.impl("pseudo_label_stats", &pseudo_label_stats_cpu);
  m.impl("class_balanced_topk", &class_balanced_topk_cpu);
  m.impl("agreement_matrix", &agreement_matrix_cpu);
}

}  // namespace coft_fast
