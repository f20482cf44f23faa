// Attention of one new query per sequence (a decode step) over every cached position:
// q [B, H, 1, D], k and v [B, KVH, T, D] with KVH dividing H (grouped queries) → [B, 1, H, D].
//
// Per (sequence, head): the scores of every position, four positions' dot products at a time
// as independent chains, then the softmax-weighted sum of the values with the output row in
// registers for the usual head size of 64. Each score is one chain over the head in order and
// the values are summed position after position, whatever the batch, so a row's result has
// the same bits alone or in a batch.
//
// A ragged batch (scheduling/ragged.py) keeps each sequence's keys and values in a buffer of
// its own: `ragged_decode_attention` takes the buffers and each one's attended length, one call
// for every sequence of a layer (SDPA per sequence cost tens of microseconds each), and
// `write_columns` puts a decode step's new keys (or values) into each sequence's buffer at its
// own position, one call for all of them.

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
// size, through memory).
template <int DV8>
void attend_one(const float* qp, const float* kp, const float* vp, int64_t T, int64_t D, int64_t kt, int64_t vt,
                float scale, float* weights, float* acc, float* o) {
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
      top = std::max(top, weights[t + j]);
    }
  }
  for (; t < T; ++t) {
    __m256 dot = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) dot = _mm256_fmadd_ps(_mm256_loadu_ps(qp + d), _mm256_loadu_ps(kp + t * kt + d), dot);
    weights[t] = sum_lanes(dot) * scale;
    top = std::max(top, weights[t]);
  }
  float total = 0.0f;
  if constexpr (DV8 > 0) {
    __m256 sum[DV8];
    for (int j = 0; j < DV8; ++j) sum[j] = _mm256_setzero_ps();
    for (t = 0; t < T; ++t) {
      const float p = std::exp(weights[t] - top);
      total += p;
      const __m256 pv = _mm256_set1_ps(p);
      for (int j = 0; j < DV8; ++j) sum[j] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vp + t * vt + 8 * j), sum[j]);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / total);
    for (int j = 0; j < DV8; ++j) _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(sum[j], inv));
  } else {
    std::fill(acc, acc + D, 0.0f);
    for (t = 0; t < T; ++t) {
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

// Where one sequence's keys and values lie: its first key head, the step between heads and
// between positions, and how many positions it attends.
struct SequenceKV {
  const float *k, *v;
  int64_t k_head, v_head, kt, vt, T;
};

// Every (sequence, head) of q [B, H, 1, D] over its sequence's keys and values → [B, 1, H, D].
torch::Tensor attend_all(const torch::Tensor& q, const std::vector<SequenceKV>& seqs, int64_t KVH, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  int64_t longest = 0;
  for (const auto& s : seqs) longest = std::max(longest, s.T);
  auto out = torch::empty({B, 1, H, D}, q.options());
  const float* qd = q.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const int64_t group = H / KVH;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> weights(longest), acc(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group;
      const SequenceKV& s = seqs[b];
      const float* qp = qd + b * q.stride(0) + h * q.stride(1);
      const float* kp = s.k + g * s.k_head;
      const float* vp = s.v + g * s.v_head;
      float* o = od + (b * H + h) * D;
      if (D == 64)
        attend_one<8>(qp, kp, vp, s.T, D, s.kt, s.vt, sc, weights.data(), acc.data(), o);
      else
        attend_one<0>(qp, kp, vp, s.T, D, s.kt, s.vt, sc, weights.data(), acc.data(), o);
    }
  });
  return out;
}

void check_query(const torch::Tensor& q) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.size(3) % 8 == 0,
              "decode_attention wants one query per sequence and a head size that is a multiple of 8");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.device().is_cpu() && q.stride(3) == 1,
              "decode_attention wants float32 CPU tensors with contiguous heads");
}

// A sequence's buffer [1 or B, KVH, >= T, D] (float32, on the CPU, contiguous heads) of D-wide heads.
void check_buffer(const torch::Tensor& t, int64_t KVH, int64_t T, int64_t D, const char* what) {
  TORCH_CHECK(t.dim() == 4 && t.size(1) == KVH && t.size(2) >= T && t.size(3) == D && KVH > 0,
              what, " wants keys and values [sequences, kv heads, positions, head size] that hold every attended position");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.device().is_cpu() && t.stride(3) == 1,
              what, " wants float32 CPU tensors with contiguous heads");
}

}  // namespace

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
  check_query(q);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = k.size(1), T = k.size(2);
  check_buffer(k, KVH, T, D, "decode_attention");
  check_buffer(v, KVH, T, D, "decode_attention");
  TORCH_CHECK(H % KVH == 0 && k.size(0) == B && v.size(0) == B, "decode_attention wants kv heads that divide the heads");
  std::vector<SequenceKV> seqs(B);
  for (int64_t b = 0; b < B; ++b)
    seqs[b] = {k.data_ptr<float>() + b * k.stride(0), v.data_ptr<float>() + b * v.stride(0), k.stride(1), v.stride(1),
               k.stride(2), v.stride(2), T};
  return attend_all(q, seqs, KVH, scale);
}

torch::Tensor ragged_decode_attention(const torch::Tensor& q, const std::vector<torch::Tensor>& keys,
                                      const std::vector<torch::Tensor>& values, const std::vector<int64_t>& lengths,
                                      double scale) {
  check_query(q);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == B && static_cast<int64_t>(values.size()) == B &&
                  static_cast<int64_t>(lengths.size()) == B,
              "ragged_decode_attention wants one key buffer, one value buffer and one length per query");
  const int64_t KVH = B ? keys[0].size(1) : 1;
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "ragged_decode_attention wants kv heads that divide the heads");
  std::vector<SequenceKV> seqs(B);
  for (int64_t b = 0; b < B; ++b) {
    const auto &k = keys[b], &v = values[b];
    TORCH_CHECK(lengths[b] > 0, "ragged_decode_attention wants at least one position per sequence");
    check_buffer(k, KVH, lengths[b], D, "ragged_decode_attention");
    check_buffer(v, KVH, lengths[b], D, "ragged_decode_attention");
    seqs[b] = {k.data_ptr<float>(), v.data_ptr<float>(), k.stride(1), v.stride(1), k.stride(2), v.stride(2), lengths[b]};
  }
  return attend_all(q, seqs, KVH, scale);
}

void write_columns(const std::vector<torch::Tensor>& buffers, const std::vector<int64_t>& positions,
                   const torch::Tensor& rows) {
  const int64_t B = rows.size(0), KVH = rows.size(1), D = rows.size(3);
  TORCH_CHECK(rows.dim() == 4 && rows.size(2) == 1 && rows.scalar_type() == torch::kFloat32 && rows.device().is_cpu() &&
                  rows.stride(3) == 1,
              "write_columns wants float32 CPU rows [sequences, kv heads, 1, head size] with contiguous heads");
  TORCH_CHECK(static_cast<int64_t>(buffers.size()) == B && static_cast<int64_t>(positions.size()) == B,
              "write_columns wants one buffer and one position per row");
  const float* src = rows.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const auto& buffer = buffers[b];
    TORCH_CHECK(positions[b] >= 0, "write_columns wants positions of 0 or more");
    check_buffer(buffer, KVH, positions[b] + 1, D, "write_columns");
    TORCH_CHECK(buffer.size(0) == 1, "write_columns wants one sequence's buffer [1, kv heads, positions, head size]");
    float* dst = buffer.data_ptr<float>() + positions[b] * buffer.stride(2);
    for (int64_t h = 0; h < KVH; ++h)
      std::copy_n(src + b * rows.stride(0) + h * rows.stride(1), D, dst + h * buffer.stride(1));
  }
}
