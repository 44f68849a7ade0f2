// The Python module of tgi-zmq's C++ extension: one .so for every source in csrc/.
#include <torch/csrc/utils/pybind.h>  // lighter than torch/extension.h: a faster build

#include "native.h"

// Every kernel runs without the GIL (its arguments are converted before, its result after): a step in
// the one-call stack can take seconds (a long prompt's chunk), and the worker's heartbeat thread must
// keep beating meanwhile (holding the GIL, an 8,000-token prompt got its worker killed as hung).
using NoGil = py::call_guard<py::gil_scoped_release>;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tgi-zmq CPU kernels: quantized and dense matmuls, paged attention, row-wise norm and activation";
  m.def("linear", &tgi::linear, NoGil(), "y = x W^T + bias with int8 / 4-bit LUT weights", py::arg("x"), py::arg("w"),
        py::arg("scales"), py::arg("offsets"), py::arg("lut"), py::arg("group"), py::arg("bias"),
        py::arg("isa") = 0, py::arg("rows_alike") = false, py::arg("float_out") = false);
  m.def("dequantize", &tgi::dequantize, NoGil(), "dequantize into out (float32 or bfloat16)", py::arg("w"),
        py::arg("scales"), py::arg("offsets"), py::arg("lut"), py::arg("group"), py::arg("out"), py::arg("isa") = 0);
  m.def("isa_name", &tgi::isa_name, "the ISA a request resolves to on this CPU", py::arg("isa") = 0);
  m.def("gemv", &tgi::gemv, NoGil(), "y = x W^T + bias (float32 / bfloat16 W), each row reduced alike", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("isa") = 0, py::arg("float_out") = false);
  m.def("rms_norm", &tgi::rms_norm, NoGil(), "RMSNorm of each row (transformers' Llama), row by row", py::arg("x"),
        py::arg("weight"), py::arg("eps"), py::arg("isa") = 0);
  m.def("add_rms_norm_", &tgi::add_rms_norm_, NoGil(), "x += delta in place, then RMSNorm of each row", py::arg("x"),
        py::arg("delta"), py::arg("weight"), py::arg("eps"), py::arg("isa") = 0);
  m.def("silu_mul", &tgi::silu_mul, NoGil(), "silu(gate) * up of [rows, gate | up], row by row", py::arg("gate_up"),
        py::arg("isa") = 0);
  m.def("rope_", &tgi::rope_, NoGil(), "rotary embeddings (rotate-half) applied in place to q and k, row by row",
        py::arg("q"), py::arg("k"), py::arg("cos"), py::arg("sin"), py::arg("positions"));
  m.def("greedy", &tgi::greedy, NoGil(), "each row's argmax and its log-softmax, in one pass each", py::arg("logits"),
        py::arg("isa") = 0);
  m.def("paged_decode", &tgi::paged_decode, NoGil(), "attention of one query per row over the paged KV cache, read in place",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("tables"), py::arg("lens"), py::arg("scale"),
        py::arg("isa") = 0, py::arg("window") = 0, py::arg("softcap") = 0.0);
  m.def("llama_layers", &tgi::llama_layers, NoGil(),
        "a Llama stack's layers over the residual stream x (in place); returns the last layer's MLP output",
        py::arg("x"), py::arg("layers"), py::arg("groups"), py::arg("k_caches"), py::arg("v_caches"), py::arg("slots"),
        py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("tables"), py::arg("lens"), py::arg("heads"),
        py::arg("kv_heads"), py::arg("eps"), py::arg("scale"), py::arg("gemv_rows"), py::arg("invariant"),
        py::arg("isa") = 0);
}
