// Host interface of the gated-LoRA CUDA kernels: plain C++ types only (no CUDA, no torch headers),
// so bindings.cpp compiles with any C++17 compiler and the Python side passes integers.
//
// Every entry point checks the device and each CUDA call, and throws std::runtime_error with a
// message that starts with "gatedlora cuda:" (pybind11 turns it into a Python RuntimeError).
#pragma once

#include <cstdint>
#include <string>

namespace gatedlora {

// Element types, as the Python wrapper encodes them.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
// Gate kinds: gatedlora/ops/contract.py GateKind (NONE, GIVEN, TOKEN) mirrored by name; the module
// exports them and the Python side refuses a build whose values differ.
enum GateKind : int { kGateNone = 0, kGateGiven = 1, kGateToken = 2 };

constexpr int kMaxRank = 128;       // rank products live in shared memory: rows x (kMaxRank + 1) floats
constexpr int kMaxFusedRows = 16;   // the one-pass GEMV serves decode (M <= 16)
constexpr int kUStride = 132;       // floats per row of rank products (kMaxRank + token logit, padded)
// Fused-GEMV workspace: 4 ints (ticket, rank products done, blocks exited, pad) + rank products.
constexpr int64_t kWorkspaceBytes = 4 * 4 + int64_t(kMaxFusedRows) * kUStride * 4;

struct GateParams {
  int kind = kGateNone;
  int hard = 1;
  float threshold = 0.5f;
  std::uintptr_t gate = 0;          // [M] probabilities (kGateGiven), any float dtype, any stride
  std::int64_t stride_g = 0;
  int gate_dtype = kFloat32;
  std::uintptr_t gate_weight = 0;   // [K] contiguous (kGateToken), x's dtype or float32
  int gate_weight_dtype = kFloat32;
  std::uintptr_t gate_bias = 0;     // 0-dim tensor on the device (kGateToken), any float dtype
  int gate_bias_dtype = kFloat32;
};

// out[m, :] += scaling * g_m * (x[m] A^T) B^T for open rows (base_mode="exact").
// x [M, K], a [R, K], b [N, R], out [M, N]; unit stride along the last dim, row strides free.
struct AdapterParams {
  std::uintptr_t x = 0, a = 0, b = 0, out = 0;
  std::int64_t m = 0, n = 0, k = 0, r = 0;
  std::int64_t stride_xm = 0, stride_ar = 0, stride_bn = 0, stride_om = 0;
  int x_dtype = kFloat32, lora_dtype = kFloat32;
  float scaling = 1.f;
  GateParams gate;
  int n_split = 0;                  // programs along N; 0 picks the heuristic
  int device = 0;
  std::uintptr_t stream = 0;        // cudaStream_t as an integer (torch's current stream)
};

// y[m, :] = x[m] W^T + bias + scaling * g_m * (x[m] A^T) B^T in one pass (base_mode="fused", M <= 16).
// x [M, K], w [N, K], bias [N] or 0, a [R, K], b [N, R], y [M, N]; workspace: kWorkspaceBytes,
// zeroed once before its first use and left zeroed by every launch (one workspace per stream).
struct FusedParams {
  std::uintptr_t x = 0, w = 0, bias = 0, a = 0, b = 0, y = 0, workspace = 0;
  std::int64_t m = 0, n = 0, k = 0, r = 0;
  std::int64_t stride_xm = 0, stride_wn = 0, stride_ar = 0, stride_bn = 0, stride_ym = 0;
  int x_dtype = kFloat32, lora_dtype = kFloat32;
  float scaling = 1.f;
  GateParams gate;
  int device = 0;
  std::uintptr_t stream = 0;
};

void launch_adapter(const AdapterParams& p);
void launch_fused(const FusedParams& p);

// "" when `device` can run kernels, else why not (starts with "no CUDA device" when there is none).
std::string device_problem(int device);

}  // namespace gatedlora
