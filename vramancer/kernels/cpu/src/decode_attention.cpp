// Attention of one new query per sequence (a decode step), with or without a boolean mask:
// q [B, H, 1, D], k and v [B, KVH, T, D] with KVH dividing H (grouped queries) → [B, 1, H, D].
// Without a mask every cached position counts (a lone sequence, or a batch without padding);
// a mask [B, 1 or H, 1, T] is true where a position is attended (a batch's left padding is
// false) and masked positions take no part in the softmax. One call for the whole batch: SDPA
// with a batch's mask took ~0.4 ms a layer at 8 rows.
//
// Per (sequence, head): the scores of every position, four positions' dot products at a time
// as independent chains, then the softmax-weighted sum of the attended positions' values with
// the output row in registers for the usual head size of 64. Each score is one chain over the
// head in order and the values are summed position after position, whatever the batch or the
// mask, so a row's result has the same bits alone or in a batch.

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

// One (sequence, head). DV8 = head size / 8 keeps the output row in registers (0: any head
// size, through memory); mp is null when every position counts.
template <int DV8>
void attend_one(const float* qp, const float* kp, const float* vp, const bool* mp, int64_t T, int64_t D,
                int64_t kt, int64_t vt, int64_t mt, float scale, float* weights, float* acc, float* o) {
  const auto attended = [&](int64_t t) { return mp == nullptr || mp[t * mt]; };
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
      if (attended(t + j)) top = std::max(top, weights[t + j]);
    }
  }
  for (; t < T; ++t) {
    __m256 dot = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) dot = _mm256_fmadd_ps(_mm256_loadu_ps(qp + d), _mm256_loadu_ps(kp + t * kt + d), dot);
    weights[t] = sum_lanes(dot) * scale;
    if (attended(t)) top = std::max(top, weights[t]);
  }
  float total = 0.0f;
  if constexpr (DV8 > 0) {
    __m256 sum[DV8];
    for (int j = 0; j < DV8; ++j) sum[j] = _mm256_setzero_ps();
    for (t = 0; t < T; ++t) {
      if (!attended(t)) continue;
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
      if (!attended(t)) continue;
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

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale,
                               const c10::optional<torch::Tensor>& mask) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = k.size(1), T = k.size(2);
  TORCH_CHECK(q.size(2) == 1 && D % 8 == 0 && KVH > 0 && H % KVH == 0 && v.size(2) == T && k.size(3) == D,
              "decode_attention wants one query per sequence and a head size that is a multiple of 8");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->device().is_cpu() && t->stride(3) == 1,
                "decode_attention wants float32 CPU tensors with contiguous heads");
  const bool* md = nullptr;
  int64_t mask_b = 0, mask_h = 0, mask_t = 0;
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK(m.scalar_type() == torch::kBool && m.device().is_cpu() && m.dim() == 4 && m.size(0) == B &&
                    m.size(2) == 1 && m.size(3) == T && (m.size(1) == 1 || m.size(1) == H),
                "decode_attention wants a boolean mask [B, 1 or H, 1, T]");
    md = m.data_ptr<bool>();
    mask_b = m.stride(0), mask_h = m.size(1) == 1 ? 0 : m.stride(1), mask_t = m.stride(3);
  }
  auto out = torch::empty({B, 1, H, D}, q.options());
  const float *qd = q.data_ptr<float>(), *kd = k.data_ptr<float>(), *vd = v.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const int64_t group = H / KVH;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> weights(T), acc(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group;
      const float* qp = qd + b * q.stride(0) + h * q.stride(1);
      const float* kp = kd + b * k.stride(0) + g * k.stride(1);
      const float* vp = vd + b * v.stride(0) + g * v.stride(1);
      const bool* mp = md == nullptr ? nullptr : md + b * mask_b + h * mask_h;
      float* o = od + (b * H + h) * D;
      if (D == 64)
        attend_one<8>(qp, kp, vp, mp, T, D, k.stride(2), v.stride(2), mask_t, sc, weights.data(), acc.data(), o);
      else
        attend_one<0>(qp, kp, vp, mp, T, D, k.stride(2), v.stride(2), mask_t, sc, weights.data(), acc.data(), o);
    }
  });
  return out;
}
