// Weight-only quantized matrix products for the CPU, AVX2 + FMA + F16C.
//
// y[r, n] = sum_k x[r, k] * W[n, k] with float32 activations and W kept quantized:
//   q4: blocks of 32 weights along k, 16 bytes of nibbles (byte j holds weight j in its low
//       nibble and weight j + 16 in its high one, as GGUF's Q4_1 does) and a float16 scale and
//       minimum per block: w = scale * q + minimum. Rows are stored in tiles of 4 (below, at
//       `q4_linear`), so the 4 rows a pass reads together are one run of bytes.
//   q8: int8 rows with one float32 scale per row: w = scale * q.
//   q8 blocks: int8 rows with a float16 scale per block of 32 (GGUF's Q8_0, kept as the file
//       stores it): w = scale_b * q.
//
// Integer dot products, as llama.cpp's CPU path does, but with 16-bit activations. Each call
// first quantizes every activation row per block of 32: x ≈ d_x * q_x, q_x int16, d_x =
// max|x| / 32767. A block then costs two `madd_epi16` (16-bit products summed in pairs into
// int32), one add, one conversion and one FMA with d_w * d_x, where unpacking the weights to
// float32 and four FMAs per row cost about twice the instructions.
//   q4: y = sum_b d_w d_x sum_i(q_w q_x) + sum_b m_w (d_x sum_i q_x): the minimums once per row.
//   q8: y = s_w (sum_b d_x sum_i(q_w q_x) + the columns past the last block in float32).
//   q8 blocks: y = sum_b d_w d_x sum_i(q_w q_x), as q4 without the minimums.
// Why int16 and not llama.cpp's int8 (Q8_1): both ran at the same speed here (the multiplies
// are as many: maddubs + madd), but int8 moved the bundled model's greedy answer. Its first
// token after "What is the capital of France?" is a near tie (0.142 vs 0.140); under int8 the
// answer became "L'Étoile, la Marseillaise, ..." (llama.cpp on the same GGUF answers that
// too), under int16 it stays "The capital of France is Paris." and the perplexity of a
// 223-token paragraph matches float32 activations to four digits (33.039 vs 33.040).
//
// Each weight block is read and unpacked once for up to 8 activation rows (a decode batch's
// step: see `matmul`), so a batch reads the weights once, and weight rows are prefetched a few KB ahead (a decode step's weights are never in
// cache). Measured on this 2-core EPYC, 1 thread, 1 row, against the float32-activation
// kernels these replace, same process, busy machine (benchmarks/kernels.py has the shapes):
// the 49152x576 q8 head out of cache 1.9-2.8x faster, a 1536x576 q8 layer 2.0-2.4x, q4 layers
// in cache 1.3-1.6x but out of cache only 1.0-1.3x (~3 GB/s, held by memory access, not by
// instructions: see the tiles at `q4_linear`); end to end, `bench --weights q8` decoded ~1.5x
// faster, `--weights q4` alike.
// A row's quantization depends on that row alone and every output element is summed in the
// same order whatever the batch size, the tiling or the thread count (blocks in order, one
// final reduction), so results are bit-identical between those.

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

constexpr int64_t kBlock = 32;
constexpr int kMaxRows = 8;       // activation rows per pass over a weight block
constexpr int64_t kTileRows = 4;  // q4 weight rows stored together: a one-row pass reads 4 at once
constexpr int64_t kChunk = 64;    // blocks whose scale products are formed at a time
constexpr float kLevels = 32767;  // the largest quantized activation
// How far ahead weight rows are prefetched, rounded up to whole tiles. Measured here, out of
// cache: 1-4 KB all far better than none (the hardware prefetcher alone leaves a decode
// step's weights at 2-3 GB/s); a few at a time as each block is read did no better than none.
constexpr int64_t kPrefetchBytes = 2048;

// The activation rows as the kernels see them, quantized once per call.
struct Activations {
  const float* x;        // [M, K] the float rows (q8: the columns past the last whole block)
  const int16_t* q;      // [M, blocks * 32]
  const float* scale;    // [M, blocks] d_x
  const float* sums;     // [M, blocks] d_x * sum(q_x): the block's sum as the products see it
  int64_t K, blocks;
};

struct ActivationBuffers {
  std::vector<int16_t> q;
  std::vector<float> scale, sums;
};

// q = round-half-even(x * (1 / (max|x| / 32767))) per row and block of 32: the same float
// operations as the torch reference in tests/unit/test_cpu_kernels.py, so the integers agree.
Activations quantize_activations(const float* x, int64_t M, int64_t K, ActivationBuffers& buf) {
  const int64_t blocks = K / kBlock;
  buf.q.resize(M * blocks * kBlock);
  buf.scale.resize(M * blocks);
  buf.sums.resize(M * blocks);
  const __m256 no_sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t i = 0; i < M * blocks; ++i) {
    const float* v = x + (i / blocks) * K + (i % blocks) * kBlock;
    __m256 f[4];
    for (int j = 0; j < 4; ++j) f[j] = _mm256_loadu_ps(v + 8 * j);
    const __m256 top = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(f[0], no_sign), _mm256_and_ps(f[1], no_sign)),
                                     _mm256_max_ps(_mm256_and_ps(f[2], no_sign), _mm256_and_ps(f[3], no_sign)));
    const float d = max_of(top) / kLevels;
    const __m256 inverse = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    __m256i q[4];
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(f[j], inverse));
    // packs works within 128-bit lanes; the permute puts the 16 values back in column order
    int16_t* out = buf.q.data() + i * kBlock;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8));
    buf.scale[i] = d;
    buf.sums[i] = d * static_cast<float>(sum_of(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]))));
  }
  return Activations{x, buf.q.data(), buf.scale.data(), buf.sums.data(), K, blocks};
}

// A block of 32 values as two vectors of sixteen int16: columns 0-15 and 16-31.
struct Block16 {
  __m256i low, high;
};

inline Block16 activation_block(const Activations& a, int64_t row, int64_t b) {
  const int16_t* p = a.q + (row * a.blocks + b) * kBlock;
  return Block16{_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16))};
}

// sum(q_w q_x) over a block, as eight partial sums in floats. Exact: a lane adds four products
// of at most 128 * 32767, under 2^24, so int32 holds it and its float conversion is exact.
inline __m256 block_dot(const Block16& w, const Block16& x) {
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(w.low, x.low), _mm256_madd_epi16(w.high, x.high)));
}

// Asks for the cache lines of [p, p + n) ahead of their use.
inline void prefetch(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < n; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
  _mm_prefetch(c + n - 1, _MM_HINT_T0);
}

// count float16 values from p + b0, as float32.
inline void halves_to_floats(const uint16_t* p, int64_t b0, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + b0 + i))));
  for (; i < count; ++i) out[i] = _cvtsh_ss(p[b0 + i]);
}

// An int8 block of 32 as two vectors of sixteen int16.
inline Block16 int8_block(const int8_t* p) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return Block16{_mm256_cvtepi8_epi16(_mm256_castsi256_si128(w)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(w, 1))};
}

// One 4-bit weight row within its tile (see `q4_linear`).
struct Q4Row {
  const uint8_t* nibbles;   // its first block's 16 bytes
  int64_t stride;           // from one of its blocks' nibbles to the next: 16 bytes per row of the tile
  const uint16_t* scale;    // its scales, one per block, float16
  const uint16_t* minimum;  // its minimums, likewise
  const uint8_t* share;     // a row's worth of bytes of its tile (blocks * 20), to prefetch

  inline Block16 block(int64_t b) const {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(nibbles + b * stride));
    const __m128i mask = _mm_set1_epi8(0x0F);
    return Block16{_mm256_cvtepu8_epi16(_mm_and_si128(packed, mask)),
                   _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), mask))};
  }

  inline void scales(int64_t b0, int64_t count, float* out) const { halves_to_floats(scale, b0, count, out); }

  inline void prefetch_row(const Activations& a) const { prefetch(share, a.blocks * 20); }

  // + sum_b minimum_b * d_x sum(q_x)_b, eight blocks at a time, then the rest in order.
  inline float finish(float sum, const Activations& a, int64_t r) const {
    const float* xs = a.sums + r * a.blocks;
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= a.blocks; b += 8)
      acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(minimum + b))),
                            _mm256_loadu_ps(xs + b), acc);
    float tail = 0.0f;
    for (; b < a.blocks; ++b) tail += _cvtsh_ss(minimum[b]) * xs[b];
    return sum + (sum_lanes(acc) + tail);
  }
};

// One int8 weight row: its scale is applied once, to the finished sum.
struct Q8Row {
  const int8_t* values;
  float scale;

  inline Block16 block(int64_t b) const { return int8_block(values + b * kBlock); }

  inline void scales(int64_t, int64_t count, float* out) const {
    for (int64_t i = 0; i < count; ++i) out[i] = 1.0f;
  }

  inline void prefetch_row(const Activations& a) const { prefetch(values, a.K); }

  // The columns past the last whole block in float32, in order, then the row's scale.
  inline float finish(float sum, const Activations& a, int64_t r) const {
    const float* x = a.x + r * a.K;
    for (int64_t k = a.blocks * kBlock; k < a.K; ++k) sum += x[k] * static_cast<float>(values[k]);
    return sum * scale;
  }
};

// One int8 weight row in blocks of 32 with a float16 scale each (GGUF's Q8_0).
struct Q8BlockRow {
  const int8_t* values;
  const uint16_t* scale;

  inline Block16 block(int64_t b) const { return int8_block(values + b * kBlock); }

  inline void scales(int64_t b0, int64_t count, float* out) const { halves_to_floats(scale, b0, count, out); }

  // The values only: prefetching the scales too (a short run of their own per row) made the
  // bundled model's 49152x576 head 1.5x slower here; the hardware prefetcher follows them.
  inline void prefetch_row(const Activations& a) const { prefetch(values, a.K); }

  inline float finish(float sum, const Activations&, int64_t) const { return sum; }
};

// NT weight rows against RT activation rows: NT * RT accumulators in registers. Per chunk of
// blocks, the products d_w * d_x are formed eight at a time; per block, one integer dot
// product, one conversion and one FMA per pair of rows: the same operations in the same
// order for every output element, whatever NT and RT.
template <int NT, int RT, class Row>
inline void tile(const Row* rows, const Activations& a, int64_t r0, float* y, int64_t N) {
  const int64_t blocks = a.blocks;
  __m256 acc[NT][RT];
  for (int j = 0; j < NT; ++j)
    for (int r = 0; r < RT; ++r) acc[j][r] = _mm256_setzero_ps();
  alignas(32) float d[NT][kChunk];
  alignas(32) float dd[NT][RT][kChunk];
  for (int64_t c = 0; c < blocks; c += kChunk) {
    const int64_t count = std::min(kChunk, blocks - c);
    for (int j = 0; j < NT; ++j) {
      rows[j].scales(c, count, d[j]);
      for (int r = 0; r < RT; ++r) {
        const float* dx = a.scale + (r0 + r) * blocks + c;
        int64_t i = 0;
        for (; i + 8 <= count; i += 8)
          _mm256_store_ps(&dd[j][r][i], _mm256_mul_ps(_mm256_load_ps(&d[j][i]), _mm256_loadu_ps(dx + i)));
        for (; i < count; ++i) dd[j][r][i] = d[j][i] * dx[i];
      }
    }
    for (int64_t b = c; b < c + count; ++b) {
      Block16 x[RT];
      for (int r = 0; r < RT; ++r) x[r] = activation_block(a, r0 + r, b);
      for (int j = 0; j < NT; ++j) {
        const Block16 w = rows[j].block(b);
        for (int r = 0; r < RT; ++r)
          acc[j][r] = _mm256_fmadd_ps(block_dot(w, x[r]), _mm256_broadcast_ss(&dd[j][r][b - c]), acc[j][r]);
      }
    }
  }
  for (int j = 0; j < NT; ++j)
    for (int r = 0; r < RT; ++r) y[r * N + j] = rows[j].finish(sum_lanes(acc[j][r]), a, r0 + r);
}

// Weight rows [n0, n1) against activation rows [r0, r0 + RT), NT weight rows at a time,
// prefetching the rows `ahead` further on (whole tiles; none past `limit`).
template <int NT, int RT, class MakeRow>
inline void span(const MakeRow& make_row, int64_t n0, int64_t n1, int64_t ahead, int64_t limit, const Activations& a,
                 int64_t r0, float* y, int64_t N) {
  using Row = decltype(make_row(0));
  ahead = ahead > 0 ? (ahead + NT - 1) / NT * NT : 0;
  int64_t n = n0;
  for (; n + NT <= n1; n += NT) {
    if (ahead > 0 && n + ahead + NT <= limit)
      for (int j = 0; j < NT; ++j) make_row(n + ahead + j).prefetch_row(a);
    Row rows[NT];
    for (int j = 0; j < NT; ++j) rows[j] = make_row(n + j);
    tile<NT, RT>(rows, a, r0, y + r0 * N + n, N);
  }
  for (; n < n1; ++n) {
    Row row[1] = {make_row(n)};
    tile<1, RT>(row, a, r0, y + r0 * N + n, N);
  }
}

// More weight rows per pass when there are fewer activation rows: enough independent
// accumulator chains to hide the FMA latency without running out of the 16 registers.
template <class MakeRow>
void matmul(const MakeRow& make_row, const Activations& a, int64_t M, float* y, int64_t N, int64_t row_bytes) {
  const int64_t grain = std::max<int64_t>(16, 16384 / std::max<int64_t>(a.K, 1));
  const int64_t ahead = (kPrefetchBytes + row_bytes - 1) / row_bytes;
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    // Weight rows in slices that stay in L1 while every group of activation rows uses them.
    constexpr int64_t kSlice = 16;
    for (int64_t s = n0; s < n1; s += kSlice) {
      const int64_t s1 = std::min(n1, s + kSlice);
      for (int64_t r = 0; r < M; r += kMaxRows) {
        const int64_t fetch = r == 0 ? ahead : 0;  // later groups of rows find the slice in cache
        // Up to 8 rows in one pass: each weight block read and unpacked once for all of a
        // decode batch's rows. Two passes of 4 (the second from L1) cost the same CPU time
        // here (1536x576 at 8 rows: 257 us either way): a batch is bound by the integer
        // multiply-adds, two per row and block, not by reading or unpacking the weights.
        switch (std::min<int64_t>(kMaxRows, M - r)) {
          case 1: span<4, 1>(make_row, s, s1, fetch, n1, a, r, y, N); break;
          case 2: span<2, 2>(make_row, s, s1, fetch, n1, a, r, y, N); break;
          case 3: span<2, 3>(make_row, s, s1, fetch, n1, a, r, y, N); break;
          case 4: span<1, 4>(make_row, s, s1, fetch, n1, a, r, y, N); break;
          case 5: span<1, 5>(make_row, s, s1, fetch, n1, a, r, y, N); break;
          case 6: span<1, 6>(make_row, s, s1, fetch, n1, a, r, y, N); break;
          case 7: span<1, 7>(make_row, s, s1, fetch, n1, a, r, y, N); break;
          default: span<1, 8>(make_row, s, s1, fetch, n1, a, r, y, N); break;
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

// x [M, K] float32, tiles [N, K/32 * 20] uint8 → [M, N] float32.
//
// The weight's N rows in tiles of 4 (the last holds the 1-3 left over), each tile one run of
// 20 bytes per block per row, in the order the kernel reads them:
//   the scales of its rows (row after row, float16), then the nibbles block after block (its
//   rows' 16 bytes in turn: a block of 4 rows is one cache line), then the minimums (as the scales).
// Why: a decode step reads a row and its 3 neighbours at once (`span<4, 1>`). Stored as three
// arrays (nibbles [N, K/2], scales and minimums [N, K/32]) that is twelve streams at a time,
// and out of cache the long rows (576x1536, the MLP's down_proj) ran at a third of their
// in-cache speed. Same process, alternating, 1 thread, medians of 3-5 rounds in four runs
// (load 4-7 on the 2 cores): 576x1536 out of cache 2.0-3.0 GB/s as three arrays, 4.3-5.4 in
// tiles (1.7-2.2x); 1536x576 out of cache 0.98-1.17x; in cache alike within the noise.
// GGUF's own interleaving (20-byte records of scale, minimum and nibbles per block, row after
// row) was 0.8-1.1x out of cache and a third slower in cache (its scales cannot be loaded 8
// at a time); one run of bytes per row [scales, nibbles, minimums] came between (1.2x on
// 576x1536). Prefetching 1, 2, 4 or 8 KB ahead made no clear difference in tiles.
torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& tiles) {
  TORCH_CHECK(tiles.dim() == 2 && tiles.scalar_type() == torch::kUInt8 && tiles.is_contiguous() && tiles.size(1) % 20 == 0,
              "q4 weights must be contiguous uint8 [N, K/32 * 20] (quantization/q4_blocks.py's tiles)");
  const int64_t N = tiles.size(0), row_bytes = tiles.size(1), blocks = row_bytes / 20, K = blocks * kBlock;
  check_activations(x, K);
  auto y = torch::empty({x.size(0), N}, x.options());
  const auto* base = tiles.data_ptr<uint8_t>();
  ActivationBuffers buffers;
  const Activations a = quantize_activations(x.data_ptr<float>(), x.size(0), K, buffers);
  auto make_row = [=](int64_t n) {
    const int64_t first = n / kTileRows * kTileRows, j = n - first, rows = std::min(kTileRows, N - first);
    const uint8_t* tile = base + first * row_bytes;
    const uint8_t* nibbles = tile + rows * blocks * 2;
    const uint8_t* minimums = nibbles + rows * blocks * (kBlock / 2);
    return Q4Row{nibbles + j * (kBlock / 2), rows * (kBlock / 2), reinterpret_cast<const uint16_t*>(tile) + j * blocks,
                 reinterpret_cast<const uint16_t*>(minimums) + j * blocks, tile + j * row_bytes};
  };
  matmul(make_row, a, x.size(0), y.data_ptr<float>(), N, row_bytes);
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
  ActivationBuffers buffers;
  const Activations a = quantize_activations(x.data_ptr<float>(), x.size(0), K, buffers);
  auto make_row = [=](int64_t n) { return Q8Row{q + n * K, s[n]}; };
  matmul(make_row, a, x.size(0), y.data_ptr<float>(), N, K);
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
    float squares = sum_lanes(acc);
    for (; k < H; ++k) squares += in[k] * in[k];
    const float inv = 1.0f / std::sqrt(squares / static_cast<float>(H) + static_cast<float>(eps));
    const __m256 vinv = _mm256_set1_ps(inv);
    for (k = 0; k + 8 <= H; k += 8)
      _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_loadu_ps(w + k), _mm256_mul_ps(_mm256_loadu_ps(in + k), vinv)));
    for (; k < H; ++k) out[k] = w[k] * (in[k] * inv);
  }
  return y;
}

// x [M, K] float32, values [N, K] int8, scale [N, K/32] float16 → [M, N] float32 (GGUF's Q8_0
// blocks, kept as stored: quantization/q8_blocks.py).
torch::Tensor q8_blocks_linear(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& scale) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == torch::kInt8 && values.is_contiguous() &&
                  values.size(1) % kBlock == 0,
              "q8 block values must be contiguous int8 [N, K] with K a multiple of 32");
  const int64_t N = values.size(0), K = values.size(1);
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && scale.is_contiguous() && scale.numel() == N * (K / kBlock),
              "q8 block scales must be float16, one per block of 32 [N, K/32]");
  check_activations(x, K);
  auto y = torch::empty({x.size(0), N}, x.options());
  const auto* q = values.data_ptr<int8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  ActivationBuffers buffers;
  const Activations a = quantize_activations(x.data_ptr<float>(), x.size(0), K, buffers);
  const int64_t blocks = K / kBlock;
  auto make_row = [=](int64_t n) { return Q8BlockRow{q + n * K, s + n * blocks}; };
  matmul(make_row, a, x.size(0), y.data_ptr<float>(), N, K + blocks * 2);
  return y;
}
