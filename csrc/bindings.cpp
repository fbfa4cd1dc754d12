// pybind11 module of the gated-LoRA CUDA kernels. Compiled by the host C++ compiler: it sees only
// gated_lora.h (plain C++), so it needs neither CUDA nor torch headers. Tensors arrive as integers
// (data pointers), with sizes, strides, dtype codes and the stream handle; errors thrown by the
// launchers reach Python as RuntimeError (std::runtime_error) or ValueError (std::invalid_argument).
#include <pybind11/pybind11.h>

#include "gated_lora.h"

#ifndef GATEDLORA_SOURCE_HASH
#define GATEDLORA_SOURCE_HASH "unknown"
#endif
#ifndef GATEDLORA_CUDA_ARCHS
#define GATEDLORA_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;
using gatedlora::GateParams;

namespace {

GateParams make_gate(int kind, int hard, float threshold, std::uintptr_t gate, std::int64_t stride_g, int gate_dtype,
                     std::uintptr_t gate_weight, int gate_weight_dtype, std::uintptr_t gate_bias,
                     int gate_bias_dtype) {
  GateParams g;
  g.kind = kind;
  g.hard = hard;
  g.threshold = threshold;
  g.gate = gate;
  g.stride_g = stride_g;
  g.gate_dtype = gate_dtype;
  g.gate_weight = gate_weight;
  g.gate_weight_dtype = gate_weight_dtype;
  g.gate_bias = gate_bias;
  g.gate_bias_dtype = gate_bias_dtype;
  return g;
}

void adapter_add(std::uintptr_t out, std::uintptr_t x, std::uintptr_t a, std::uintptr_t b, std::int64_t m,
                 std::int64_t n, std::int64_t k, std::int64_t r, std::int64_t stride_xm, std::int64_t stride_ar,
                 std::int64_t stride_bn, std::int64_t stride_om, int x_dtype, int lora_dtype, float scaling,
                 int gate_kind, int hard, float threshold, std::uintptr_t gate, std::int64_t stride_g, int gate_dtype,
                 std::uintptr_t gate_weight, int gate_weight_dtype, std::uintptr_t gate_bias, int gate_bias_dtype,
                 int n_split, int device, std::uintptr_t stream) {
  gatedlora::AdapterParams p;
  p.out = out; p.x = x; p.a = a; p.b = b;
  p.m = m; p.n = n; p.k = k; p.r = r;
  p.stride_xm = stride_xm; p.stride_ar = stride_ar; p.stride_bn = stride_bn; p.stride_om = stride_om;
  p.x_dtype = x_dtype; p.lora_dtype = lora_dtype; p.scaling = scaling;
  p.gate = make_gate(gate_kind, hard, threshold, gate, stride_g, gate_dtype, gate_weight, gate_weight_dtype, gate_bias,
                     gate_bias_dtype);
  p.n_split = n_split; p.device = device; p.stream = stream;
  gatedlora::launch_adapter(p);
}

void fused_gemv(std::uintptr_t y, std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t a,
                std::uintptr_t b, std::uintptr_t workspace, std::int64_t m, std::int64_t n, std::int64_t k,
                std::int64_t r, std::int64_t stride_xm, std::int64_t stride_wn, std::int64_t stride_ar,
                std::int64_t stride_bn, std::int64_t stride_ym, int x_dtype, int lora_dtype, float scaling,
                int gate_kind, int hard, float threshold, std::uintptr_t gate, std::int64_t stride_g, int gate_dtype,
                std::uintptr_t gate_weight, int gate_weight_dtype, std::uintptr_t gate_bias, int gate_bias_dtype,
                int device, std::uintptr_t stream) {
  gatedlora::FusedParams p;
  p.y = y; p.x = x; p.w = w; p.bias = bias; p.a = a; p.b = b; p.workspace = workspace;
  p.m = m; p.n = n; p.k = k; p.r = r;
  p.stride_xm = stride_xm; p.stride_wn = stride_wn; p.stride_ar = stride_ar; p.stride_bn = stride_bn;
  p.stride_ym = stride_ym;
  p.x_dtype = x_dtype; p.lora_dtype = lora_dtype; p.scaling = scaling;
  p.gate = make_gate(gate_kind, hard, threshold, gate, stride_g, gate_dtype, gate_weight, gate_weight_dtype, gate_bias,
                     gate_bias_dtype);
  p.device = device; p.stream = stream;
  gatedlora::launch_fused(p);
}

}  // namespace

PYBIND11_MODULE(_cuda_kernels, mod) {
  mod.doc() = "gatedlora CUDA kernels (csrc/): adapter_add (base_mode='exact') and fused_gemv (base_mode='fused')";
  mod.attr("SOURCE_HASH") = GATEDLORA_SOURCE_HASH;
  mod.attr("CUDA_ARCHS") = GATEDLORA_CUDA_ARCHS;
  mod.attr("MAX_RANK") = gatedlora::kMaxRank;
  mod.attr("MAX_FUSED_ROWS") = gatedlora::kMaxFusedRows;
  mod.attr("WORKSPACE_BYTES") = gatedlora::kWorkspaceBytes;
  mod.attr("GATE_NONE") = static_cast<int>(gatedlora::kGateNone);
  mod.attr("GATE_GIVEN") = static_cast<int>(gatedlora::kGateGiven);
  mod.attr("GATE_TOKEN") = static_cast<int>(gatedlora::kGateToken);

  mod.def("device_problem", &gatedlora::device_problem, py::arg("device"),
          "'' when the device can run kernels, else why not ('no CUDA device ...' when there is none).");
  mod.def("adapter_add", &adapter_add, "out[m] += scaling * g_m * (x[m] A^T) B^T for open rows; see gated_lora.h",
          py::arg("out"), py::arg("x"), py::arg("a"), py::arg("b"), py::arg("m"), py::arg("n"), py::arg("k"),
          py::arg("r"), py::arg("stride_xm"), py::arg("stride_ar"), py::arg("stride_bn"), py::arg("stride_om"),
          py::arg("x_dtype"), py::arg("lora_dtype"), py::arg("scaling"), py::arg("gate_kind"), py::arg("hard"),
          py::arg("threshold"), py::arg("gate"), py::arg("stride_g"), py::arg("gate_dtype"), py::arg("gate_weight"),
          py::arg("gate_weight_dtype"), py::arg("gate_bias"), py::arg("gate_bias_dtype"), py::arg("n_split"), py::arg("device"), py::arg("stream"));
  mod.def("fused_gemv", &fused_gemv, "y = x W^T + bias + scaling * g * (x A^T) B^T, M <= 16; see gated_lora.h",
          py::arg("y"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("a"), py::arg("b"), py::arg("workspace"),
          py::arg("m"), py::arg("n"), py::arg("k"), py::arg("r"), py::arg("stride_xm"), py::arg("stride_wn"),
          py::arg("stride_ar"), py::arg("stride_bn"), py::arg("stride_ym"), py::arg("x_dtype"), py::arg("lora_dtype"),
          py::arg("scaling"), py::arg("gate_kind"), py::arg("hard"), py::arg("threshold"), py::arg("gate"),
          py::arg("stride_g"), py::arg("gate_dtype"), py::arg("gate_weight"), py::arg("gate_weight_dtype"),
          py::arg("gate_bias"), py::arg("gate_bias_dtype"), py::arg("device"), py::arg("stream"));
}
