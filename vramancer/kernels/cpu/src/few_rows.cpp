// y[M, N] = x[M, K] @ W[N, K].T (+ bias) with float32 W, for the few rows of a decode batch.
//
// torch's float32 products either read the weights more than once for 2-8 rows (x @ W.T
// through MKL's matrix product) or want their output transposed back (W @ x.T). Here each
// weight row is loaded from memory once and multiplied, eight columns at a time, by every
// activation row while it sits in registers; the outputs are written row-major.
// benchmarks/few_rows.py measures it against both.
//
// Every output element is computed the same way whatever M, the tiling or the thread count:
// one vector accumulator over the columns in order (fused multiply-adds), one fixed horizontal
// reduction, the columns past the last multiple of 8 in order, then the bias. So a row's
// result is bit-identical alone or in any batch.

#include "kernels.h"
#include "simd.h"

#include <torch/types.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct Problem {
  const float* x;       // [M, K]
  const float* packed;  // x's first K8 columns as [K8 / 8][M][8]: a step's M vectors side by side
  const float* w;       // [N, K]
  const float* bias;    // [N] or null
  float* y;             // [M, N]
  int64_t M, K, K8, N;
};

// How far ahead of its loads a weight row is prefetched: 1-2 KiB ahead read the weights 10-50 %
// faster than the hardware prefetcher alone here; 4-16 KiB were no better.
constexpr int64_t kPrefetchFloats = 512;

// Weight row n against activation rows [r0, r0 + RT): RT independent accumulators, one weight
// vector loaded once for all of them. One weight row at a time: measured against 2-6 rows at
// a time (more accumulators per weight load), a single sequential stream through the weights
// read memory fastest at every row count.
template <int RT>
inline void tile(const Problem& p, int64_t n, int64_t r0) {
  const int64_t K = p.K, step = p.M * 8;
  const float* w = p.w + n * K;
  const float* xk = p.packed + r0 * 8;
  __m256 acc[RT];
#pragma GCC unroll 8
  for (int r = 0; r < RT; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < p.K8; k += 8, xk += step) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchFloats), _MM_HINT_T0);
    const __m256 wv = _mm256_loadu_ps(w + k);
#pragma GCC unroll 8
    for (int r = 0; r < RT; ++r) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xk + r * 8), acc[r]);
  }
  // Reduced in a fully unrolled loop, so the accumulators never live in memory.
  float sums[RT];
#pragma GCC unroll 8
  for (int r = 0; r < RT; ++r) sums[r] = sum_lanes(acc[r]);
  for (int r = 0; r < RT; ++r) {
    float s = sums[r];
    const float* x = p.x + (r0 + r) * K;
    for (int64_t k = p.K8; k < K; ++k) s = std::fma(w[k], x[k], s);
    if (p.bias) s += p.bias[n];
    p.y[(r0 + r) * p.N + n] = s;
  }
}

// Weight rows [n0, n1) against activation rows [r0, r0 + RT).
template <int RT>
inline void span(const Problem& p, int64_t n0, int64_t n1, int64_t r0) {
  for (int64_t n = n0; n < n1; ++n) tile<RT>(p, n, r0);
}

// All M rows against weight rows [n0, n1). Up to 8 rows go in one pass, so each weight is
// read from memory once; more rows take further passes over a slice of weight rows that is
// still in the cache.
void rows_against(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t M = p.M, slice = M <= 8 ? n1 - n0 : 8;
  for (int64_t s = n0; s < n1; s += slice) {
    const int64_t s1 = std::min(n1, s + slice);
    for (int64_t r = 0; r < M; r += 8) {
      switch (std::min<int64_t>(8, M - r)) {
        case 1: span<1>(p, s, s1, r); break;
        case 2: span<2>(p, s, s1, r); break;
        case 3: span<3>(p, s, s1, r); break;
        case 4: span<4>(p, s, s1, r); break;
        case 5: span<5>(p, s, s1, r); break;
        case 6: span<6>(p, s, s1, r); break;
        case 7: span<7>(p, s, s1, r); break;
        default: span<8>(p, s, s1, r); break;
      }
    }
  }
}

}  // namespace

// x [M, K] float32, weight [N, K] float32, bias [N] float32 or None → [M, N] float32.
torch::Tensor few_rows_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == torch::kFloat32 && weight.dim() == 2 &&
                  weight.is_contiguous(),
              "few_rows_linear wants a contiguous float32 weight on the CPU");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.size(1) == K &&
                  x.is_contiguous(),
              "few_rows_linear wants contiguous float32 rows of ", K);
  const float* b = nullptr;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
                "few_rows_linear wants a float32 bias of ", N);
    b = bias->data_ptr<float>();
  }
  const int64_t M = x.size(0), K8 = K & ~int64_t{7};
  auto y = torch::empty({M, N}, x.options());
  // The activations interleaved by 8 columns (M * K floats: microseconds, and from then on in L1/L2).
  std::vector<float> packed(M * K8);
  const float* xd = x.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r)
    for (int64_t k = 0; k < K8; k += 8) std::copy(xd + r * K + k, xd + r * K + k + 8, packed.data() + k * M + r * 8);
  const Problem p{xd, packed.data(), weight.data_ptr<float>(), b, y.data_ptr<float>(), M, K, K8, N};
  // Chunks of at least ~256 KiB of weights: smaller layers are not worth waking a second thread.
  const int64_t grain = std::max<int64_t>(8, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rows_against(p, n0, n1); });
  return y;
}
