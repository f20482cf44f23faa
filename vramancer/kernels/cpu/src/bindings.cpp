// The Python module of our CPU kernels: one entry per function of kernels.h.
#include "kernels.h"

#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("decode_attention", &decode_attention, "one query per sequence over its whole KV cache", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("scale"));
  m.def("ragged_decode_attention", &ragged_decode_attention,
        "one query per sequence, each over the first lengths[b] positions of its own key and value buffers",
        py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("lengths"), py::arg("scale"));
  m.def("write_columns", &write_columns, "a decode step's new keys (or values), each row into its sequence's buffer",
        py::arg("buffers"), py::arg("positions"), py::arg("rows"));
  m.def("rms_norm", &rms_norm, "RMSNorm of float32 rows");
  m.def("q4_linear", &q4_linear, "x @ W.T with W in 4-bit blocks of 32 (float16 scale and minimum), rows in tiles of 4");
  m.def("few_rows_linear", &few_rows_linear, "x @ W.T (+ bias) for a few float32 rows, each weight read once");
  m.def("q8_linear", &q8_linear, "x @ W.T with W in int8 rows (float32 scale per row)");
  m.def("q8_blocks_linear", &q8_blocks_linear, "x @ W.T with W in int8 blocks of 32 (float16 scale each: GGUF's Q8_0)");
  bind_decode_layer(m);  // the DecodeLayer class (decode_layer.cpp)
}
