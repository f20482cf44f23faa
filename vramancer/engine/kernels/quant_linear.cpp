// Weight-only quantized matrix products for the CPU, AVX2 + FMA + F16C.
//
// y[r, n] = sum_k x[r, k] * W[n, k] with float32 activations and W kept quantized:
//   q4: blocks of 32 weights along k, 16 bytes of nibbles (byte j holds weight j in its low
//       nibble and weight j + 16 in its high one, as GGUF's Q4_1 does) and a float16 scale and
//       minimum per block: w = scale * q + minimum.
//   q8: int8 rows with one float32 scale per row: w = scale * q.
// Each weight block is unpacked to floats once and used for up to 4 activation rows, so a
// batch reads the weights once. Every output element is summed in the same order whatever
// the batch size, the tiling or the thread count (two accumulators, blocks in order, one
// final reduction), so results are bit-identical between those.

#include "kernels.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int kMaxRows = 4;  // activation rows per pass over a weight block

inline float reduce(__m256 a, __m256 b) {
  __m256 v = _mm256_add_ps(a, b);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 bytes_to_floats_u8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

// What a kernel needs of the activations besides the rows themselves: for q4, the sum of
// each row's 32 values in each block (the minimums multiply it), computed once per call.
struct Activations {
  const float* x;       // [M, K]
  const float* sums;    // [M, K/32] (q4) or null
  int64_t K;
};

// One 4-bit weight row. sum_k w_k x_k = sum_b scale_b (sum_i q_i x_i) + sum_b minimum_b xsum_b:
// the nibbles meet the activations as small integers, the scale once per block, and the
// minimums once per row at the end.
struct Q4Row {
  const uint8_t* nibbles;
  const uint16_t* scale;
  const uint16_t* minimum;

  // The 32 nibbles of block b as four vectors of eight floats (0..15).
  inline void block(int64_t b, __m256 q[4]) const {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(nibbles + b * (kBlock / 2)));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_and_si128(packed, mask);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    q[0] = bytes_to_floats_u8(low);
    q[1] = bytes_to_floats_u8(_mm_srli_si128(low, 8));
    q[2] = bytes_to_floats_u8(high);
    q[3] = bytes_to_floats_u8(_mm_srli_si128(high, 8));
  }

  inline void scales(int64_t b0, int64_t count, float* out) const {
    int64_t i = 0;
    for (; i + 8 <= count; i += 8)
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + b0 + i))));
    for (; i < count; ++i) out[i] = _cvtsh_ss(scale[b0 + i]);
  }

  // sum_b minimum_b * xsum_b, eight blocks at a time, then the rest in order.
  inline float finish(float sum, const Activations& a, int64_t r) const {
    const int64_t blocks = a.K / kBlock;
    const float* xs = a.sums + r * blocks;
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= blocks; b += 8)
      acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(minimum + b))),
                            _mm256_loadu_ps(xs + b), acc);
    float tail = 0.0f;
    for (; b < blocks; ++b) tail += _cvtsh_ss(minimum[b]) * xs[b];
    return sum + (reduce(acc, _mm256_setzero_ps()) + tail);
  }
};

// One int8 weight row: its scale is applied once, to the finished sum.
struct Q8Row {
  const int8_t* values;
  float scale;

  inline void block(int64_t b, __m256 w[4]) const {
    const int8_t* p = values + b * kBlock;
    for (int i = 0; i < 4; ++i) {
      const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i));
      w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight));
    }
  }

  inline void scales(int64_t, int64_t count, float* out) const {
    for (int64_t i = 0; i < count; ++i) out[i] = 1.0f;
  }

  // The columns past the last whole block, in order, then the row's scale.
  inline float finish(float sum, const Activations& a, int64_t r) const {
    const float* x = a.x + r * a.K;
    for (int64_t k = (a.K / kBlock) * kBlock; k < a.K; ++k) sum += x[k] * static_cast<float>(values[k]);
    return sum * scale;
  }
};

constexpr int64_t kChunk = 64;  // blocks whose scales are unpacked to floats at a time

// NT weight rows against RT activation rows: NT * RT accumulators in registers. Per block,
// the products of one weight row and one activation row are summed in a vector and then
// scaled into the accumulator: the same operations in the same order for every element.
template <int NT, int RT, class Row>
inline void tile(const Row* rows, const Activations& a, int64_t r0, float* y, int64_t N) {
  const int64_t K = a.K, blocks = K / kBlock;
  const float* x = a.x + r0 * K;
  __m256 acc[NT][RT];
  for (int j = 0; j < NT; ++j)
    for (int r = 0; r < RT; ++r) acc[j][r] = _mm256_setzero_ps();
  float d[NT][kChunk];
  for (int64_t c = 0; c < blocks; c += kChunk) {
    const int64_t count = std::min(kChunk, blocks - c);
    for (int j = 0; j < NT; ++j) rows[j].scales(c, count, d[j]);
    for (int64_t b = c; b < c + count; ++b) {
      for (int j = 0; j < NT; ++j) {
        __m256 q[4];
        rows[j].block(b, q);
        const __m256 scale = _mm256_broadcast_ss(&d[j][b - c]);
        for (int r = 0; r < RT; ++r) {
          const float* xr = x + r * K + b * kBlock;
          __m256 p = _mm256_mul_ps(q[0], _mm256_loadu_ps(xr));
          p = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xr + 8), p);
          p = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xr + 16), p);
          p = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xr + 24), p);
          acc[j][r] = _mm256_fmadd_ps(p, scale, acc[j][r]);
        }
      }
    }
  }
  for (int j = 0; j < NT; ++j)
    for (int r = 0; r < RT; ++r) y[r * N + j] = rows[j].finish(reduce(acc[j][r], _mm256_setzero_ps()), a, r0 + r);
}

// Weight rows [n0, n1) against activation rows [r0, r0 + RT), NT weight rows at a time.
template <int NT, int RT, class MakeRow>
inline void span(const MakeRow& make_row, int64_t n0, int64_t n1, const Activations& a, int64_t r0, float* y,
                 int64_t N) {
  int64_t n = n0;
  for (; n + NT <= n1; n += NT) {
    decltype(make_row(0)) rows[NT];
    for (int j = 0; j < NT; ++j) rows[j] = make_row(n + j);
    tile<NT, RT>(rows, a, r0, y + r0 * N + n, N);
  }
  for (; n < n1; ++n) {
    decltype(make_row(0)) row[1] = {make_row(n)};
    tile<1, RT>(row, a, r0, y + r0 * N + n, N);
  }
}

// More weight rows per pass when there are fewer activation rows: enough independent
// accumulator chains to hide the FMA latency without running out of the 16 registers.
template <class MakeRow>
void matmul(const MakeRow& make_row, const Activations& a, int64_t M, float* y, int64_t N) {
  const int64_t grain = std::max<int64_t>(16, 16384 / std::max<int64_t>(a.K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    // Weight rows in slices that stay in L1 while every group of activation rows uses them.
    constexpr int64_t kSlice = 16;
    for (int64_t s = n0; s < n1; s += kSlice) {
      const int64_t s1 = std::min(n1, s + kSlice);
      for (int64_t r = 0; r < M; r += kMaxRows) {
        switch (std::min<int64_t>(kMaxRows, M - r)) {
          case 1: span<4, 1>(make_row, s, s1, a, r, y, N); break;
          case 2: span<2, 2>(make_row, s, s1, a, r, y, N); break;
          case 3: span<2, 3>(make_row, s, s1, a, r, y, N); break;
          default: span<1, 4>(make_row, s, s1, a, r, y, N); break;
        }
      }
    }
  });
}

void check_activations(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32, "activations must be float32 on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), "activations must be contiguous rows of ", K);
}

}  // namespace

// x [M, K] float32, nibbles [N, K/2] uint8, scale and minimum [N, K/32] float16 → [M, N] float32.
torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& nibbles, const torch::Tensor& scale,
                        const torch::Tensor& minimum) {
  const int64_t N = nibbles.size(0), K = nibbles.size(1) * 2;
  TORCH_CHECK(K % kBlock == 0, "q4 weights need whole blocks of 32 columns");
  TORCH_CHECK(nibbles.scalar_type() == torch::kUInt8 && nibbles.is_contiguous(), "nibbles must be contiguous uint8");
  for (const auto* t : {&scale, &minimum})
    TORCH_CHECK(t->scalar_type() == torch::kFloat16 && t->is_contiguous() && t->size(0) == N && t->size(1) == K / kBlock,
                "q4 scales and minimums must be contiguous float16 [N, K/32]");
  check_activations(x, K);
  auto y = torch::empty({x.size(0), N}, x.options());
  const auto* q = nibbles.data_ptr<uint8_t>();
  const auto* d = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const auto* m = reinterpret_cast<const uint16_t*>(minimum.data_ptr<at::Half>());
  const int64_t blocks = K / kBlock;
  std::vector<float> sums(x.size(0) * blocks);  // each activation row's sum per block
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < x.size(0) * blocks; ++i) {
    const float* v = xp + i * kBlock;
    const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8)),
                                   _mm256_add_ps(_mm256_loadu_ps(v + 16), _mm256_loadu_ps(v + 24)));
    sums[i] = reduce(s, _mm256_setzero_ps());
  }
  auto make_row = [=](int64_t n) { return Q4Row{q + n * (K / 2), d + n * blocks, m + n * blocks}; };
  matmul(make_row, Activations{xp, sums.data(), K}, x.size(0), y.data_ptr<float>(), N);
  return y;
}

// x [M, K] float32, values [N, K] int8, scale [N] float32 → [M, N] float32.
torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& scale) {
  const int64_t N = values.size(0), K = values.size(1);
  TORCH_CHECK(values.scalar_type() == torch::kInt8 && values.is_contiguous(), "values must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N,
              "q8 scales must be float32, one per row");
  check_activations(x, K);
  auto y = torch::empty({x.size(0), N}, x.options());
  const auto* q = values.data_ptr<int8_t>();
  const auto* s = scale.data_ptr<float>();
  auto make_row = [=](int64_t n) { return Q8Row{q + n * K, s[n]}; };
  matmul(make_row, Activations{x.data_ptr<float>(), nullptr, K}, x.size(0), y.data_ptr<float>(), N);
  return y;
}

// RMSNorm in one pass per row: y = weight * (x / sqrt(mean(x^2) + eps)), x [..., H] float32.
// Eager torch spends five ops and ~40 us on a decode step's row; this is one call.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const int64_t H = weight.numel();
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.size(-1) == H,
              "rms_norm wants contiguous float32 rows of ", H);
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.is_contiguous(), "rms_norm wants a float32 weight");
  auto y = torch::empty_like(x);
  const float* w = weight.data_ptr<float>();
  const int64_t rows = H ? x.numel() / H : 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = x.data_ptr<float>() + r * H;
    float* out = y.data_ptr<float>() + r * H;
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= H; k += 8) {
      const __m256 v = _mm256_loadu_ps(in + k);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float squares = reduce(acc, _mm256_setzero_ps());
    for (; k < H; ++k) squares += in[k] * in[k];
    const float inv = 1.0f / std::sqrt(squares / static_cast<float>(H) + static_cast<float>(eps));
    const __m256 vinv = _mm256_set1_ps(inv);
    for (k = 0; k + 8 <= H; k += 8)
      _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_loadu_ps(w + k), _mm256_mul_ps(_mm256_loadu_ps(in + k), vinv)));
    for (; k < H; ++k) out[k] = w[k] * (in[k] * inv);
  }
  return y;
}

// Attention of one new query per sequence (a decode step): q [B, H, 1, D], k and v [B, KVH, T, D]
// with KVH dividing H (grouped queries) → [B, 1, H, D]. No mask: every cached position counts.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = k.size(1), T = k.size(2);
  TORCH_CHECK(q.size(2) == 1 && D % 8 == 0 && KVH > 0 && H % KVH == 0 && v.size(2) == T && k.size(3) == D,
              "decode_attention wants one query per sequence and a head size that is a multiple of 8");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->device().is_cpu() && t->stride(3) == 1,
                "decode_attention wants float32 CPU tensors with contiguous heads");
  auto out = torch::empty({B, 1, H, D}, q.options());
  const float *qd = q.data_ptr<float>(), *kd = k.data_ptr<float>(), *vd = v.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const int64_t group = H / KVH;
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> weights(T), acc(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group;
      const float* qp = qd + b * q.stride(0) + h * q.stride(1);
      const float* kp = kd + b * k.stride(0) + g * k.stride(1);
      const float* vp = vd + b * v.stride(0) + g * v.stride(1);
      float top = -INFINITY;
      for (int64_t t = 0; t < T; ++t) {
        const float* kr = kp + t * k.stride(2);
        __m256 dot = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) dot = _mm256_fmadd_ps(_mm256_loadu_ps(qp + d), _mm256_loadu_ps(kr + d), dot);
        weights[t] = reduce(dot, _mm256_setzero_ps()) * static_cast<float>(scale);
        top = std::max(top, weights[t]);
      }
      float total = 0.0f;
      for (int64_t t = 0; t < T; ++t) total += (weights[t] = std::exp(weights[t] - top));
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = 0; t < T; ++t) {
        const float* vr = vp + t * v.stride(2);
        const __m256 p = _mm256_set1_ps(weights[t]);
        for (int64_t d = 0; d < D; d += 8)
          _mm256_storeu_ps(acc.data() + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + d), _mm256_loadu_ps(acc.data() + d)));
      }
      float* o = od + (b * H + h) * D;
      const __m256 inv = _mm256_set1_ps(1.0f / total);
      for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(acc.data() + d), inv));
    }
  });
  return out;
}
