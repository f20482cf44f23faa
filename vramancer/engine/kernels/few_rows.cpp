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

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

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

namespace {

// One (sequence, head): scores of every position (four positions' dot products at a time, as
// independent chains), then the softmax-weighted sum of the attended positions' values with the DV8 vectors
// of the output row kept in registers (DV8 = head size / 8; 0: any size, through memory).
template <int DV8>
void attend_one(const float* qp, const float* kp, const float* vp, const bool* mp, int64_t T, int64_t D,
                int64_t kt, int64_t vt, int64_t mt, float scale, float* weights, float* acc, float* o) {
  float top = -INFINITY;
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) {
    __m256 dot[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(qp + d);
      for (int j = 0; j < 4; ++j) dot[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp + (t + j) * kt + d), dot[j]);
    }
    for (int j = 0; j < 4; ++j) {
      weights[t + j] = sum_lanes(dot[j]) * scale;
      if (mp[(t + j) * mt]) top = std::max(top, weights[t + j]);
    }
  }
  for (; t < T; ++t) {
    __m256 dot = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) dot = _mm256_fmadd_ps(_mm256_loadu_ps(qp + d), _mm256_loadu_ps(kp + t * kt + d), dot);
    weights[t] = sum_lanes(dot) * scale;
    if (mp[t * mt]) top = std::max(top, weights[t]);
  }
  float total = 0.0f;
  if constexpr (DV8 > 0) {
    __m256 sum[DV8];
    for (int j = 0; j < DV8; ++j) sum[j] = _mm256_setzero_ps();
    for (t = 0; t < T; ++t) {
      if (!mp[t * mt]) continue;
      const float p = std::exp(weights[t] - top);
      total += p;
      const __m256 pv = _mm256_set1_ps(p);
      for (int j = 0; j < DV8; ++j) sum[j] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vp + t * vt + 8 * j), sum[j]);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / total);  // no attended position: NaN, as SDPA gives
    for (int j = 0; j < DV8; ++j) _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(sum[j], inv));
  } else {
    std::fill(acc, acc + D, 0.0f);
    for (t = 0; t < T; ++t) {
      if (!mp[t * mt]) continue;
      const float p = std::exp(weights[t] - top);
      total += p;
      const __m256 pv = _mm256_set1_ps(p);
      for (int64_t d = 0; d < D; d += 8)
        _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(vp + t * vt + d), _mm256_loadu_ps(acc + d)));
    }
    const __m256 inv = _mm256_set1_ps(1.0f / total);
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(acc + d), inv));
  }
}

}  // namespace

// Attention of one new query per sequence (a batch's decode step) under a boolean mask:
// q [B, H, 1, D], k and v [B, KVH, T, D] (KVH dividing H), mask [B, 1 or H, 1, T], true where a
// position is attended (a batch's left padding is false) → [B, 1, H, D]. Masked positions take
// no part in the softmax; the whole batch is one call (SDPA with the mask took ~0.4 ms a layer).
torch::Tensor masked_decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                      const torch::Tensor& mask, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = k.size(1), T = k.size(2);
  TORCH_CHECK(q.size(2) == 1 && D % 8 == 0 && KVH > 0 && H % KVH == 0 && v.size(2) == T && k.size(3) == D,
              "masked_decode_attention wants one query per sequence and a head size that is a multiple of 8");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->device().is_cpu() && t->stride(3) == 1,
                "masked_decode_attention wants float32 CPU tensors with contiguous heads");
  TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.dim() == 4 && mask.size(0) == B && mask.size(2) == 1 &&
                  mask.size(3) == T && (mask.size(1) == 1 || mask.size(1) == H),
              "masked_decode_attention wants a boolean mask [B, 1 or H, 1, T]");
  auto out = torch::empty({B, 1, H, D}, q.options());
  const float *qd = q.data_ptr<float>(), *kd = k.data_ptr<float>(), *vd = v.data_ptr<float>();
  const bool* md = mask.data_ptr<bool>();
  float* od = out.data_ptr<float>();
  const int64_t group = H / KVH, mask_heads = mask.size(1);
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> weights(T), acc(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group;
      const float* qp = qd + b * q.stride(0) + h * q.stride(1);
      const float* kp = kd + b * k.stride(0) + g * k.stride(1);
      const float* vp = vd + b * v.stride(0) + g * v.stride(1);
      const bool* mp = md + b * mask.stride(0) + (mask_heads == 1 ? 0 : h * mask.stride(1));
      float* o = od + (b * H + h) * D;
      const float sc = static_cast<float>(scale);
      if (D == 64)
        attend_one<8>(qp, kp, vp, mp, T, D, k.stride(2), v.stride(2), mask.stride(3), sc, weights.data(), acc.data(), o);
      else
        attend_one<0>(qp, kp, vp, mp, T, D, k.stride(2), v.stride(2), mask.stride(3), sc, weights.data(), acc.data(), o);
    }
  });
  return out;
}
