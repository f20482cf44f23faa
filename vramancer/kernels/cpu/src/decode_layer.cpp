// A decode step of one Llama-style decoder layer (one new token per sequence) in two calls.
//
// Through transformers' modules the step is ~25 module calls and eager ops (norms, three
// projections, views, rotary's rotate_half and cat, attention, o_proj, the MLP), ~0.7 ms of
// Python a layer here, more than its matmuls. `DecodeLayer` holds the layer's weights as the
// plain tensors our kernels take, gathered once (kernels/cpu/fused_layer.py), and runs:
//   project: input RMSNorm, q/k/v projections (+ bias), rotary on q and k;
//   finish:  attention over the cache's keys and values, o_proj, residual, post-attention
//            RMSNorm, gate/up, SiLU(gate) * up, down, residual.
// Between the two, Python hands k and v to transformers' cache (`cache.update`), so the cache
// stays the object our migration and accounting move and count.
// Every step is the operation the layer's own forward runs, in the same order and rounding
// (the same kernels, torch's silu), so results match it to the bit.

#include "kernels.h"

#include <torch/extension.h>

#include <immintrin.h>

#include <tuple>
#include <utility>
#include <vector>

namespace {

// x [M, K] @ W.T with W as our kernels' tensors: (tiles) for q4, (values, scale) for q8 rows
// (a float32 scale per row) or q8 blocks (a float16 scale per block of 32).
torch::Tensor kernel_linear(const torch::Tensor& x, const std::vector<torch::Tensor>& w,
                            const c10::optional<torch::Tensor>& bias) {
  torch::Tensor y = w.size() == 1                           ? q4_linear(x, w[0])
                    : w[1].scalar_type() == torch::kHalf ? q8_blocks_linear(x, w[0], w[1])
                                                          : q8_linear(x, w[0], w[1]);
  if (bias.has_value()) y.add_(*bias);
  return y;
}

// Kept as computed: without this the compiler may fuse a product into the following add or
// subtract (one rounding instead of two), and the result would differ from torch's in the last bit.
inline __m256 rounded(__m256 v) {
  asm("" : "+x"(v));
  return v;
}

// Rotary in place on rows [B, heads, D] with cos/sin [B or 1, D], as transformers'
// apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1).
void rotate(torch::Tensor& x, int64_t heads, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t B = x.size(0), D = x.size(1) / heads, half = D / 2;
  const int64_t step = cos.size(0) == 1 ? 0 : D;
  float* data = x.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* c = cos.data_ptr<float>() + b * step;
    const float* s = sin.data_ptr<float>() + b * step;
    for (int64_t h = 0; h < heads; ++h) {
      float* row = data + (b * heads + h) * D;
      for (int64_t i = 0; i < half; i += 8) {
        const __m256 lo = _mm256_loadu_ps(row + i), hi = _mm256_loadu_ps(row + half + i);
        const __m256 lo_cos = rounded(_mm256_mul_ps(lo, _mm256_loadu_ps(c + i)));
        const __m256 hi_sin = rounded(_mm256_mul_ps(hi, _mm256_loadu_ps(s + i)));
        const __m256 hi_cos = rounded(_mm256_mul_ps(hi, _mm256_loadu_ps(c + half + i)));
        const __m256 lo_sin = rounded(_mm256_mul_ps(lo, _mm256_loadu_ps(s + half + i)));
        _mm256_storeu_ps(row + i, _mm256_sub_ps(lo_cos, hi_sin));  // x1 * cos + (-x2) * sin
        _mm256_storeu_ps(row + half + i, _mm256_add_ps(hi_cos, lo_sin));  // x2 * cos + x1 * sin
      }
    }
  }
}

}  // namespace

DecodeLayer::DecodeLayer(std::vector<std::vector<torch::Tensor>> weights, std::vector<c10::optional<torch::Tensor>> biases,
                         torch::Tensor input_norm, double input_eps, torch::Tensor post_norm, double post_eps,
                         int64_t heads, int64_t kv_heads, int64_t head_dim, double scaling)
    : weights_(std::move(weights)), biases_(std::move(biases)), input_norm_(std::move(input_norm)),
      post_norm_(std::move(post_norm)), input_eps_(input_eps), post_eps_(post_eps), heads_(heads), kv_heads_(kv_heads),
      head_dim_(head_dim), scaling_(scaling) {
  TORCH_CHECK(weights_.size() == kProjections && biases_.size() == kProjections,
              "DecodeLayer wants q, k, v, o, gate, up, down: 7 weights and 7 biases");
  for (const auto& w : weights_) TORCH_CHECK(w.size() == 1 || w.size() == 2, "a weight is 1 tensor (q4) or 2 (q8 rows or blocks)");
  TORCH_CHECK(head_dim_ % 16 == 0 && heads_ % kv_heads_ == 0, "DecodeLayer wants a head size that is a multiple of 16");
}

// hidden [B, 1, H] → q [B, heads, 1, D], k and v [B, kv_heads, 1, D] (the cache's layout).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> DecodeLayer::project(const torch::Tensor& hidden,
                                                                             const torch::Tensor& cos,
                                                                             const torch::Tensor& sin) const {
  const int64_t B = hidden.size(0), H = hidden.size(2), D = head_dim_;
  TORCH_CHECK(hidden.dim() == 3 && hidden.size(1) == 1, "DecodeLayer runs one new token per sequence");
  const auto c = cos.reshape({-1, D}).contiguous(), s = sin.reshape({-1, D}).contiguous();
  TORCH_CHECK(c.scalar_type() == torch::kFloat32 && s.sizes() == c.sizes() && (c.size(0) == 1 || c.size(0) == B),
              "rotary cos/sin must be float32 [B or 1, 1, head_dim]");
  const auto x = rms_norm(hidden.contiguous(), input_norm_, input_eps_).view({B, H});
  auto q = kernel_linear(x, weights_[0], biases_[0]);
  auto k = kernel_linear(x, weights_[1], biases_[1]);
  auto v = kernel_linear(x, weights_[2], biases_[2]);
  rotate(q, heads_, c, s);
  rotate(k, kv_heads_, c, s);
  return {q.view({B, heads_, 1, D}), k.view({B, kv_heads_, 1, D}), v.view({B, kv_heads_, 1, D})};
}

// The rest of the step, from q and the cache's keys and values [B, kv_heads, T, D] → [B, 1, H].
torch::Tensor DecodeLayer::finish(const torch::Tensor& hidden, const torch::Tensor& q, const torch::Tensor& keys,
                                  const torch::Tensor& values) const {
  return after_attention(hidden, decode_attention(q, keys, values, scaling_));
}

// The same for a ragged batch's step: each sequence attends over its own buffers' first
// lengths[b] positions (its keys already written there by the cache's update).
torch::Tensor DecodeLayer::finish_rows(const torch::Tensor& hidden, const torch::Tensor& q,
                                       const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
                                       const std::vector<int64_t>& lengths) const {
  return after_attention(hidden, ragged_decode_attention(q, keys, values, lengths, scaling_));
}

// attended [B, 1, heads, D] → o_proj, residual, post norm, MLP, residual → [B, 1, H].
torch::Tensor DecodeLayer::after_attention(const torch::Tensor& hidden, const torch::Tensor& attended) const {
  const int64_t B = hidden.size(0), H = hidden.size(2);
  auto mixed = kernel_linear(attended.view({B, heads_ * head_dim_}), weights_[3], biases_[3]);
  mixed.add_(hidden.reshape({B, H}));  // the residual
  const auto normed = rms_norm(mixed, post_norm_, post_eps_);
  auto gate = kernel_linear(normed, weights_[4], biases_[4]);
  const auto up = kernel_linear(normed, weights_[5], biases_[5]);
  at::silu_(gate).mul_(up);
  auto out = kernel_linear(gate, weights_[6], biases_[6]);
  out.add_(mixed);  // the residual
  return out.view({B, 1, H});
}

void bind_decode_layer(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<DecodeLayer>(m, "DecodeLayer", "a decoder layer's decode step on our kernels (kernels/cpu/fused_layer.py)")
      .def(py::init<std::vector<std::vector<torch::Tensor>>, std::vector<c10::optional<torch::Tensor>>, torch::Tensor,
                    double, torch::Tensor, double, int64_t, int64_t, int64_t, double>())
      .def("project", &DecodeLayer::project, py::call_guard<py::gil_scoped_release>(),
           "input norm, q/k/v and rotary of one new token per sequence")
      .def("finish", &DecodeLayer::finish, py::call_guard<py::gil_scoped_release>(),
           "attention over the cache, o_proj, residual, post norm, MLP, residual")
      .def("finish_rows", &DecodeLayer::finish_rows, py::call_guard<py::gil_scoped_release>(),
           "finish, each sequence attending over its own keys and values (a ragged batch's step)");
}
