// The functions our CPU kernel sources define, for bindings.cpp (and for each other).
#pragma once

// torch's tensor types only: the whole of <torch/extension.h> (its Python bindings, autograd's
// API) costs ten more seconds of compiling per source; only the two that bind include it.
#include <torch/types.h>

namespace pybind11 {
class module_;
}

// quant_linear.cpp
torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& tiles);
torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& scale);
torch::Tensor q8_blocks_linear(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& scale);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);

// decode_layer.cpp: a decoder layer's decode step (one new token per sequence) on the kernels above.
class DecodeLayer {
 public:
  static constexpr size_t kProjections = 7;  // q, k, v, o, gate, up, down

  // weights: per projection, (tiles) for q4 or (values, scale) for q8; biases: each or None.
  DecodeLayer(std::vector<std::vector<torch::Tensor>> weights, std::vector<c10::optional<torch::Tensor>> biases,
              torch::Tensor input_norm, double input_eps, torch::Tensor post_norm, double post_eps, int64_t heads,
              int64_t kv_heads, int64_t head_dim, double scaling);
  std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> project(const torch::Tensor& hidden, const torch::Tensor& cos,
                                                                  const torch::Tensor& sin) const;
  torch::Tensor finish(const torch::Tensor& hidden, const torch::Tensor& q, const torch::Tensor& keys,
                       const torch::Tensor& values) const;
  // keys/values: each sequence's own buffers [1, kv_heads, >= lengths[b], head_dim].
  torch::Tensor finish_rows(const torch::Tensor& hidden, const torch::Tensor& q, const std::vector<torch::Tensor>& keys,
                            const std::vector<torch::Tensor>& values, const std::vector<int64_t>& lengths) const;

 private:
  torch::Tensor after_attention(const torch::Tensor& hidden, const torch::Tensor& attended) const;

  std::vector<std::vector<torch::Tensor>> weights_;
  std::vector<c10::optional<torch::Tensor>> biases_;
  torch::Tensor input_norm_, post_norm_;
  double input_eps_, post_eps_;
  int64_t heads_, kv_heads_, head_dim_;
  double scaling_;
};
void bind_decode_layer(pybind11::module_& m);

// few_rows.cpp
torch::Tensor few_rows_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias);

// decode_attention.cpp: one query per sequence over every position of its cache.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale);
// The same over each sequence's own buffer [1, KVH, >= length, D], its first lengths[b] positions.
torch::Tensor ragged_decode_attention(const torch::Tensor& q, const std::vector<torch::Tensor>& keys,
                                      const std::vector<torch::Tensor>& values, const std::vector<int64_t>& lengths,
                                      double scale);
// rows [B, KVH, 1, D] written at column positions[b] of buffers[b] [1, KVH, > position, D].
void write_columns(const std::vector<torch::Tensor>& buffers, const std::vector<int64_t>& positions,
                   const torch::Tensor& rows);
