// The functions our CPU kernel sources define, for bindings.cpp (and for each other).
#pragma once

#include <torch/extension.h>

// quant_linear.cpp
torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& nibbles, const torch::Tensor& scale,
                        const torch::Tensor& minimum);
torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& scale);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale);

// few_rows.cpp
torch::Tensor few_rows_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias);
torch::Tensor masked_decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                      const torch::Tensor& mask, double scale);
