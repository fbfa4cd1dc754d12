// Gated-LoRA CUDA kernels (docs/design.md: the operation, the kernel contract, the CUDA kernels):
// no torch headers, only the CUDA runtime.
//
//   adapter_kernel     base_mode="exact": out[m] += s * g_m * (x[m] A^T) B^T for the open rows only
//   fused_gemv_kernel  base_mode="fused", M <= 16: y = x W^T + bias + s * g * (x A^T) B^T in one pass
//
// Both evaluate the gate on the device (given probabilities or a token gate sigmoid(x . w + b)),
// hard (p >= threshold) or soft (g = p); a NaN probability closes the gate. Arithmetic is fp32
// throughout; x A^T is rounded to the LoRA dtype before B, as PEFT's lora_A output is (the Triton
// kernel does the same). Compiled, not run: no GPU has executed this file yet.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "gated_lora.h"

namespace gatedlora {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVec = 8;  // elements per vector step: 16 bytes of a 16-bit type, 32 bytes of fp32

// ---- element access -----------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Rounds v to T and back: how a value stored as a T tensor would read.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// 8 consecutive elements through the read-only path, as fp32. p must be 16-byte aligned.
__device__ __forceinline__ void load8(const __half* p, float (&v)[kVec]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[kVec]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const float* p, float (&v)[kVec]) {
  const float4 lo = __ldg(reinterpret_cast<const float4*>(p));
  const float4 hi = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
  v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
}

template <typename T> __device__ __forceinline__ float load1(const T* p) { return to_float(*p); }

// One element of a tensor whose dtype is only known at run time (gate, gate bias).
__device__ __forceinline__ float load_any(const void* base, int dtype, std::int64_t index) {
  switch (dtype) {
    case kFloat16: return __half2float(static_cast<const __half*>(base)[index]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[index]);
    case kFloat64: return static_cast<float>(static_cast<const double*>(base)[index]);
    default: return static_cast<const float*>(base)[index];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---- gates --------------------------------------------------------------------------------------

struct DeviceGate {
  int kind, hard;
  float threshold;
  const void* gate;
  std::int64_t stride_g;
  int gate_dtype;
  const void* gate_weight;
  int gate_weight_f32;  // token-gate weight in fp32 (else in x's dtype)
  const void* gate_bias;  // 0-dim, read by pointer (no host sync, capturable)
  int gate_bias_dtype;
};

// Hard: open where p >= threshold (NaN compares false, so NaN closes), g = 1.
// Soft: g = p with NaN -> 0, open where g != 0.
__device__ __forceinline__ void decide(float p, const DeviceGate& gt, bool& open, float& g) {
  if (gt.hard) {
    open = p >= gt.threshold;
    g = open ? 1.f : 0.f;
  } else {
    g = isnan(p) ? 0.f : p;
    open = g != 0.f;
  }
}

// Token gate from its logit x . w: p = sigmoid(logit + bias), in fp32 as gates.token_gate_probabilities.
__device__ __forceinline__ float token_probability(float logit, const DeviceGate& gt) {
  const float bias = load_any(gt.gate_bias, gt.gate_bias_dtype, 0);
  return 1.f / (1.f + expf(-(logit + bias)));
}

// ---- x . w over K for up to ROWS rows (one warp) ------------------------------------------------

// acc[m] += sum_k x[m, k] * w[k] over this lane's share of K, for rows with use[m]. x points at
// row 0; `vec` says x, its row stride and w allow 16-byte loads; K % 8 leftovers take scalar loads.
template <typename TX, typename TW, int ROWS>
__device__ __forceinline__ void dot_rows(const TX* __restrict__ x, std::int64_t stride_xm, const bool (&use)[ROWS],
                                         const TW* __restrict__ w, std::int64_t k, bool vec, int lane,
                                         float (&acc)[ROWS]) {
  const std::int64_t k_vec = vec ? (k / kVec) * kVec : 0;
  for (std::int64_t c = std::int64_t(lane) * kVec; c < k_vec; c += 32 * kVec) {
    float wv[kVec];
    load8(w + c, wv);
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
      if (use[m]) {
        float xv[kVec];
        load8(x + m * stride_xm + c, xv);
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[m] = fmaf(xv[j], wv[j], acc[m]);
      }
    }
  }
  for (std::int64_t c = k_vec + lane; c < k; c += 32) {
    const float wv = load1(w + c);
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
      if (use[m]) acc[m] = fmaf(load1(x + m * stride_xm + c), wv, acc[m]);
  }
}

// The rank products u[m][item] = x[m] . A[item] for item < R, and the token-gate logit
// x[m] . w_g as item R: one warp per item, for rows with use[m]; sums land in lane 0.
template <typename TX, typename TL, int ROWS>
__device__ __forceinline__ void rank_item(const TX* x, std::int64_t stride_xm, const bool (&use)[ROWS], const TL* a,
                                          std::int64_t stride_ar, const DeviceGate& gt, std::int64_t k,
                                          std::int64_t r, int item, bool vec, int lane, float (&acc)[ROWS]) {
#pragma unroll
  for (int m = 0; m < ROWS; ++m) acc[m] = 0.f;
  if (item < r) {
    dot_rows<TX, TL, ROWS>(x, stride_xm, use, a + item * stride_ar, k, vec, lane, acc);
  } else if (gt.gate_weight_f32) {
    dot_rows<TX, float, ROWS>(x, stride_xm, use, static_cast<const float*>(gt.gate_weight), k, vec, lane, acc);
  } else {
    dot_rows<TX, TX, ROWS>(x, stride_xm, use, static_cast<const TX*>(gt.gate_weight), k, vec, lane, acc);
  }
#pragma unroll
  for (int m = 0; m < ROWS; ++m) acc[m] = warp_sum(acc[m]);
}

// ---- base_mode="exact": the adapter kernel --------------------------------------------------------

struct AdapterArgs {
  const void *x, *a, *b;
  void* out;
  std::int64_t m, n, k, r;
  std::int64_t stride_xm, stride_ar, stride_bn, stride_om;
  float scaling;
  int vec_k, vec_b;  // 16-byte loads allowed along K (x, A, w_g) and along R (B)
  DeviceGate gate;
};

// Grid (cdiv(M, BM), n_split), 256 threads. Block (i, j) owns rows [i*BM, i*BM + BM) and the
// 256-column tiles j, j + n_split, ...:
//   1. given gates: decided before x or A is read; a block with no open row returns at once;
//   2. one warp per rank (and one for the token-gate logit): u = x A^T for the block's rows, in
//      shared memory; every block along N recomputes it (BM*K*R multiply-adds, small for decode);
//   3. token gates: decided from the logit; a block with no open row returns before touching B;
//   4. one thread per column: delta = round_l(u) B^T, out = out + s * g * delta, open rows only.
// Closed rows of out are neither read nor written: they stay bitwise equal to the base output.
// Registers: with __launch_bounds__(256) alone ptxas held several variants to 64 registers and
// spilled 20 to 32 bytes (sm_90); asking for two blocks per SM allows 128, and none spills.
template <typename TX, typename TL, int BM>
__global__ void __launch_bounds__(kThreads, 2) adapter_kernel(const AdapterArgs p) {
  __shared__ float u_s[BM][kUStride];
  __shared__ float coef_s[BM];
  __shared__ int open_s[BM];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const std::int64_t row0 = std::int64_t(blockIdx.x) * BM;
  const int rows = static_cast<int>(p.m - row0 < BM ? p.m - row0 : BM);
  const DeviceGate& gt = p.gate;
  const TX* x = static_cast<const TX*>(p.x) + row0 * p.stride_xm;
  const TL* a = static_cast<const TL*>(p.a);
  const TL* b = static_cast<const TL*>(p.b);
  TX* out = static_cast<TX*>(p.out) + row0 * p.stride_om;

  if (tid < BM) {
    bool open = tid < rows;
    float g = 1.f;
    if (gt.kind == kGateGiven && open) decide(load_any(gt.gate, gt.gate_dtype, (row0 + tid) * gt.stride_g), gt, open, g);
    open_s[tid] = open;
    coef_s[tid] = g * p.scaling;
  }
  if (!__syncthreads_or(tid < BM && open_s[tid])) return;  // block-uniform: every row closed

  bool use[BM];
#pragma unroll
  for (int m = 0; m < BM; ++m) use[m] = open_s[m];
  const bool token = gt.kind == kGateToken;
  const int items = static_cast<int>(p.r) + (token ? 1 : 0);
  for (int item = warp; item < items; item += kWarps) {
    float acc[BM];
    rank_item<TX, TL, BM>(x, p.stride_xm, use, a, p.stride_ar, gt, p.k, p.r, item, p.vec_k, lane, acc);
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < BM; ++m) u_s[m][item] = acc[m];
    }
  }
  __syncthreads();

  if (token) {
    if (tid < BM) {
      bool open = false;
      float g = 0.f;
      if (tid < rows) decide(token_probability(u_s[tid][p.r], gt), gt, open, g);
      open_s[tid] = open;
      coef_s[tid] = g * p.scaling;
    }
    // The token gate needs the whole K loop, so only the B side can be skipped here.
    if (!__syncthreads_or(tid < BM && open_s[tid])) return;
  }

  // PEFT's lora_A output is a tensor in the LoRA dtype: round the rank products the same way.
  for (int i = tid; i < BM * p.r; i += kThreads) u_s[i / p.r][i % p.r] = round_to<TL>(u_s[i / p.r][i % p.r]);
  __syncthreads();

  float coef[BM];
#pragma unroll
  for (int m = 0; m < BM; ++m) {
    use[m] = open_s[m];
    coef[m] = coef_s[m];
  }
  const int r = static_cast<int>(p.r);
  const int r_vec = p.vec_b ? (r / kVec) * kVec : 0;
  const std::int64_t step = std::int64_t(gridDim.y) * kThreads;
  for (std::int64_t n = std::int64_t(blockIdx.y) * kThreads + tid; n < p.n; n += step) {
    const TL* brow = b + n * p.stride_bn;
    float d[BM];
#pragma unroll
    for (int m = 0; m < BM; ++m) d[m] = 0.f;
    for (int q = 0; q < r_vec; q += kVec) {
      float bv[kVec];
      load8(brow + q, bv);
#pragma unroll
      for (int m = 0; m < BM; ++m)
#pragma unroll
        for (int j = 0; j < kVec; ++j) d[m] = fmaf(u_s[m][q + j], bv[j], d[m]);
    }
    for (int q = r_vec; q < r; ++q) {
      const float bv = load1(brow + q);
#pragma unroll
      for (int m = 0; m < BM; ++m) d[m] = fmaf(u_s[m][q], bv, d[m]);
    }
#pragma unroll
    for (int m = 0; m < BM; ++m) {
      if (use[m]) {
        TX* o = out + m * p.stride_om + n;
        *o = from_float<TX>(to_float(*o) + coef[m] * d[m]);
      }
    }
  }
}

// ---- base_mode="fused": the one-pass decode GEMV --------------------------------------------------

struct Workspace {
  int ticket;    // next block ticket
  int u_done;    // rank-product blocks finished
  int exited;    // blocks finished
  int pad;
  float u[kMaxFusedRows * kUStride];
};

struct FusedArgs {
  const void *x, *w, *bias, *a, *b;
  void* y;
  Workspace* ws;
  std::int64_t m, n, k, r;
  std::int64_t stride_xm, stride_wn, stride_ar, stride_bn, stride_ym;
  float scaling;
  int vec_k;
  DeviceGate gate;
};

// Spins allowed while waiting for the rank products (about 100 ns each, several seconds in all):
// past that the kernel traps, which the host reports as a launch failure instead of hanging.
constexpr long long kMaxSpins = 1LL << 26;

// Grid: u_blocks + cdiv(N, 8 * COLS) blocks of 256 threads. Blocks take a ticket from an atomic
// counter when they start; tickets [0, u_blocks) compute the rank products u = x A^T (one warp
// per rank, plus the token-gate logit), so A is read once in all; every later ticket owns
// 8 * COLS columns of W (COLS per warp), streams its W rows once with 16-byte loads, multiplies
// them with the M rows of x (read from L1/L2), then waits for u, adds s * g * round_l(u) B^T for
// its columns, reduces across the warp and writes y once. A block waits only for tickets handed
// out before its own, whose blocks are already running and never wait, so the wait always ends.
// The last block to exit sets the workspace back to zero for the next launch on the stream.
// Given gates that are all closed skip u and the wait: the kernel is then a plain GEMV + bias.
// Registers (ptxas, tools/nvcc_check.py): at two blocks per SM (128 registers a thread) the
// 16-row variant spilled 8 to 20 bytes on sm_90, so it runs one block per SM (180 to 238
// registers, no spill); the 1- and 4-row variants fit two blocks per SM.
template <typename TX, typename TL, int MB, int COLS>
__global__ void __launch_bounds__(kThreads, MB >= 16 ? 1 : 2) fused_gemv_kernel(const FusedArgs p) {
  __shared__ float u_s[MB][kUStride];
  __shared__ int open_s[MB];
  __shared__ float coef_s[MB];
  __shared__ int ticket_s;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const DeviceGate& gt = p.gate;
  const TX* x = static_cast<const TX*>(p.x);
  const int m_rows = static_cast<int>(p.m);
  const bool token = gt.kind == kGateToken;
  const int items = static_cast<int>(p.r) + (token ? 1 : 0);
  const int u_blocks = (items + kWarps - 1) / kWarps;

  if (tid == 0) ticket_s = atomicAdd(&p.ws->ticket, 1);
  if (tid < MB) {
    bool open = tid < m_rows;
    float g = 1.f;
    if (gt.kind == kGateGiven && open) decide(load_any(gt.gate, gt.gate_dtype, tid * gt.stride_g), gt, open, g);
    open_s[tid] = open;
    coef_s[tid] = g * p.scaling;
  }
  const bool any_open = __syncthreads_or(tid < MB && open_s[tid]);
  const int ticket = ticket_s;

  bool use[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) use[m] = m < m_rows;

  if (ticket < u_blocks) {
    const int item = ticket * kWarps + warp;
    if (any_open && item < items) {
      float acc[MB];
      rank_item<TX, TL, MB>(x, p.stride_xm, use, static_cast<const TL*>(p.a), p.stride_ar, gt, p.k, p.r, item,
                            p.vec_k, lane, acc);
      if (lane == 0) {
#pragma unroll
        for (int m = 0; m < MB; ++m)
          if (use[m]) __stcg(&p.ws->u[m * kUStride + item], acc[m]);
        __threadfence();
      }
    }
    __syncthreads();
    if (tid == 0) {
      __threadfence();
      atomicAdd(&p.ws->u_done, 1);
    }
  } else {
    const std::int64_t n0 = std::int64_t(ticket - u_blocks) * (kWarps * COLS) + warp * COLS;
    const TX* w = static_cast<const TX*>(p.w);
    bool col_in[COLS];
#pragma unroll
    for (int j = 0; j < COLS; ++j) col_in[j] = n0 + j < p.n;
    float acc[COLS][MB];
#pragma unroll
    for (int j = 0; j < COLS; ++j)
#pragma unroll
      for (int m = 0; m < MB; ++m) acc[j][m] = 0.f;

    // The base GEMV: each W element is read once, 16 bytes at a time; x comes from L1/L2.
    const std::int64_t k_vec = p.vec_k ? (p.k / kVec) * kVec : 0;
#pragma unroll 2
    for (std::int64_t c = std::int64_t(lane) * kVec; c < k_vec; c += 32 * kVec) {
      float wv[COLS][kVec];
#pragma unroll
      for (int j = 0; j < COLS; ++j) {
        if (col_in[j]) {
          load8(w + (n0 + j) * p.stride_wn + c, wv[j]);
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) wv[j][e] = 0.f;
        }
      }
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (use[m]) {
          float xv[kVec];
          load8(x + m * p.stride_xm + c, xv);
#pragma unroll
          for (int j = 0; j < COLS; ++j)
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[j][m] = fmaf(xv[e], wv[j][e], acc[j][m]);
        }
      }
    }
    for (std::int64_t c = k_vec + lane; c < p.k; c += 32) {
#pragma unroll
      for (int j = 0; j < COLS; ++j) {
        const float wv = col_in[j] ? load1(w + (n0 + j) * p.stride_wn + c) : 0.f;
#pragma unroll
        for (int m = 0; m < MB; ++m)
          if (use[m]) acc[j][m] = fmaf(load1(x + m * p.stride_xm + c), wv, acc[j][m]);
      }
    }

    if (any_open) {
      if (tid == 0) {
        const volatile int* done = &p.ws->u_done;
        for (long long spins = 0; *done < u_blocks; ++spins) {
          if (spins > kMaxSpins) __trap();
          __nanosleep(100);
        }
        __threadfence();
      }
      __syncthreads();
      for (int i = tid; i < MB * items; i += kThreads) {
        const int m = i / items, item = i % items;
        u_s[m][item] = m < m_rows ? __ldcg(&p.ws->u[m * kUStride + item]) : 0.f;
      }
      __syncthreads();
      if (token && tid < MB) {
        bool open = false;
        float g = 0.f;
        if (tid < m_rows) decide(token_probability(u_s[tid][p.r], gt), gt, open, g);
        open_s[tid] = open;
        coef_s[tid] = g * p.scaling;
      }
      __syncthreads();
      // round_l(u) * s * g, zero for closed rows: the LoRA term is then one more dot product.
      for (int i = tid; i < MB * p.r; i += kThreads) {
        const int m = i / static_cast<int>(p.r), q = i % static_cast<int>(p.r);
        u_s[m][q] = open_s[m] ? round_to<TL>(u_s[m][q]) * coef_s[m] : 0.f;
      }
      __syncthreads();
      const TL* b = static_cast<const TL*>(p.b);
      for (int q = lane; q < p.r; q += 32) {
#pragma unroll
        for (int j = 0; j < COLS; ++j) {
          const float bv = col_in[j] ? load1(b + (n0 + j) * p.stride_bn + q) : 0.f;
#pragma unroll
          for (int m = 0; m < MB; ++m) acc[j][m] = fmaf(u_s[m][q], bv, acc[j][m]);
        }
      }
    }

    const TX* bias = static_cast<const TX*>(p.bias);
    TX* y = static_cast<TX*>(p.y);
#pragma unroll
    for (int j = 0; j < COLS; ++j) {
      const float bj = (bias != nullptr && col_in[j]) ? load1(bias + n0 + j) : 0.f;
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        const float sum = warp_sum(acc[j][m]);
        if (lane == ((j * MB + m) & 31) && use[m] && col_in[j]) y[m * p.stride_ym + n0 + j] = from_float<TX>(sum + bj);
      }
    }
  }

  if (tid == 0) {
    __threadfence();
    if (atomicAdd(&p.ws->exited, 1) == static_cast<int>(gridDim.x) - 1) {
      p.ws->ticket = 0;
      p.ws->u_done = 0;
      p.ws->exited = 0;
      __threadfence();
    }
  }
}

// ---- host side ------------------------------------------------------------------------------------

std::string error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so that later calls start clean
    throw std::runtime_error(std::string("gatedlora cuda: ") + what + " failed (" + error_text(err) + ")");
  }
}

void require_device(int device) {
  const std::string problem = device_problem(device);
  if (!problem.empty()) throw std::runtime_error("gatedlora cuda: " + problem);
}

// Makes `device` current for the launch and restores the caller's device afterwards, so that the
// caller's (torch's) idea of the current device is left as it was.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    changed_ = previous_ != device;
    if (changed_) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
  bool changed_ = false;
};

int sm_count(int device) {
  int count = 0;
  check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute(SM count)");
  return count;
}

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaErrorInvalidDeviceFunction || err == cudaErrorNoKernelImageForDevice) {
    throw std::runtime_error(std::string("gatedlora cuda: launching ") + kernel + " failed (" + error_text(err) +
                             "): the extension was not compiled for this GPU; rebuild with its compute "
                             "capability in GATEDLORA_CUDA_ARCHS");
  }
  check(err, (std::string("launching ") + kernel).c_str());
}

bool aligned16(std::uintptr_t ptr) { return ptr % 16 == 0; }
bool rows_aligned16(std::uintptr_t ptr, std::int64_t row_stride, int elt) {
  return aligned16(ptr) && (row_stride * elt) % 16 == 0;
}
int element_size(int dtype) { return dtype == kFloat32 ? 4 : dtype == kFloat64 ? 8 : 2; }

DeviceGate device_gate(const GateParams& g) {
  DeviceGate d;
  d.kind = g.kind;
  d.hard = g.hard;
  d.threshold = g.threshold;
  d.gate = reinterpret_cast<const void*>(g.gate);
  d.stride_g = g.stride_g;
  d.gate_dtype = g.gate_dtype;
  d.gate_weight = reinterpret_cast<const void*>(g.gate_weight);
  d.gate_weight_f32 = g.gate_weight_dtype == kFloat32;
  d.gate_bias = reinterpret_cast<const void*>(g.gate_bias);
  d.gate_bias_dtype = g.gate_bias_dtype;
  return d;
}

void check_gate(const GateParams& g, int x_dtype, std::int64_t m) {
  if (g.kind != kGateNone && g.kind != kGateGiven && g.kind != kGateToken)
    throw std::invalid_argument("gatedlora cuda: unknown gate kind " + std::to_string(g.kind));
  if (g.kind == kGateGiven && m > 0 && g.gate == 0) throw std::invalid_argument("gatedlora cuda: gate pointer is null");
  if (g.kind == kGateToken) {
    if (g.gate_weight == 0) throw std::invalid_argument("gatedlora cuda: gate_weight pointer is null");
    if (g.gate_weight_dtype != kFloat32 && g.gate_weight_dtype != x_dtype)
      throw std::invalid_argument("gatedlora cuda: gate_weight must be float32 or x's dtype");
    if (g.gate_bias == 0) throw std::invalid_argument("gatedlora cuda: gate_bias pointer is null");
  }
}

template <typename TX, typename TL, int BM>
void run_adapter(const AdapterArgs& args, dim3 grid, cudaStream_t stream) {
  adapter_kernel<TX, TL, BM><<<grid, kThreads, 0, stream>>>(args);
  check_launch("adapter_kernel");
}

template <typename TX, typename TL>
void adapter_rows(const AdapterArgs& args, dim3 grid, int bm, cudaStream_t stream) {
  switch (bm) {
    case 1: run_adapter<TX, TL, 1>(args, grid, stream); break;
    case 4: run_adapter<TX, TL, 4>(args, grid, stream); break;
    default: run_adapter<TX, TL, 8>(args, grid, stream); break;
  }
}

template <typename TX, typename TL, int MB, int COLS>
void run_fused(const FusedArgs& args, int u_blocks, cudaStream_t stream) {
  const std::int64_t col_blocks = (args.n + kWarps * COLS - 1) / (kWarps * COLS);
  if (u_blocks + col_blocks > 0x7fffffff) throw std::invalid_argument("gatedlora cuda: N too large for one grid");
  fused_gemv_kernel<TX, TL, MB, COLS><<<static_cast<unsigned>(u_blocks + col_blocks), kThreads, 0, stream>>>(args);
  check_launch("fused_gemv_kernel");
}

template <typename TX, typename TL>
void fused_rows(const FusedArgs& args, int u_blocks, cudaStream_t stream) {
  // Columns per warp: each x load feeds COLS W chunks. With 16 rows, 2 columns would make the x
  // reads from L1 8x the W bytes streamed; 4 halves that.
  if (args.m <= 1) {
    run_fused<TX, TL, 1, 2>(args, u_blocks, stream);
  } else if (args.m <= 4) {
    run_fused<TX, TL, 4, 2>(args, u_blocks, stream);
  } else {
    run_fused<TX, TL, 16, 4>(args, u_blocks, stream);
  }
}

// The dtype pairs of the triton backend: x and LoRA weights of one dtype, or 16-bit x with fp32
// LoRA weights (PEFT's default adapter dtype on a bf16/fp16 model).
template <template <typename, typename> class Launch, typename... Args>
void dispatch_dtypes(int x_dtype, int lora_dtype, Args&&... args) {
  if (x_dtype == kFloat16 && lora_dtype == kFloat16) return Launch<__half, __half>::run(args...);
  if (x_dtype == kBFloat16 && lora_dtype == kBFloat16) return Launch<__nv_bfloat16, __nv_bfloat16>::run(args...);
  if (x_dtype == kFloat32 && lora_dtype == kFloat32) return Launch<float, float>::run(args...);
  if (x_dtype == kFloat16 && lora_dtype == kFloat32) return Launch<__half, float>::run(args...);
  if (x_dtype == kBFloat16 && lora_dtype == kFloat32) return Launch<__nv_bfloat16, float>::run(args...);
  throw std::invalid_argument("gatedlora cuda: unsupported dtype pair (x dtype code " + std::to_string(x_dtype) +
                              ", lora dtype code " + std::to_string(lora_dtype) + ")");
}

template <typename TX, typename TL>
struct AdapterLaunch {
  static void run(const AdapterArgs& args, dim3 grid, int bm, cudaStream_t stream) {
    adapter_rows<TX, TL>(args, grid, bm, stream);
  }
};

template <typename TX, typename TL>
struct FusedLaunch {
  static void run(const FusedArgs& args, int u_blocks, cudaStream_t stream) { fused_rows<TX, TL>(args, u_blocks, stream); }
};

}  // namespace

std::string device_problem(int device) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    std::string text = "no CUDA device (cudaGetDeviceCount failed: " + error_text(err);
    if (err == cudaErrorInsufficientDriver) {
      // What a machine without a driver reports; on a GPU machine it means the driver predates
      // the CUDA runtime this extension links (statically): rebuild with an older toolkit.
      text += "; no NVIDIA driver, or one older than the CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
              std::to_string(CUDART_VERSION % 1000 / 10) + " runtime this extension was built with";
    }
    return text + ")";
  }
  if (count == 0) return "no CUDA device (cudaGetDeviceCount found none)";
  if (device < 0 || device >= count)
    return "device index " + std::to_string(device) + " out of range (" + std::to_string(count) + " devices)";
  return "";
}

void launch_adapter(const AdapterParams& p) {
  require_device(p.device);
  if (p.r < 1 || p.r > kMaxRank)
    throw std::invalid_argument("gatedlora cuda: rank " + std::to_string(p.r) + " outside [1, " +
                                std::to_string(kMaxRank) + "]");
  if (p.m < 0 || p.n < 0 || p.k < 0) throw std::invalid_argument("gatedlora cuda: negative size");
  check_gate(p.gate, p.x_dtype, p.m);
  if (p.m == 0 || p.n == 0) return;
  DeviceGuard guard(p.device);

  AdapterArgs args;
  args.x = reinterpret_cast<const void*>(p.x);
  args.a = reinterpret_cast<const void*>(p.a);
  args.b = reinterpret_cast<const void*>(p.b);
  args.out = reinterpret_cast<void*>(p.out);
  args.m = p.m; args.n = p.n; args.k = p.k; args.r = p.r;
  args.stride_xm = p.stride_xm; args.stride_ar = p.stride_ar; args.stride_bn = p.stride_bn; args.stride_om = p.stride_om;
  args.scaling = p.scaling;
  args.gate = device_gate(p.gate);
  const int ex = element_size(p.x_dtype), el = element_size(p.lora_dtype);
  args.vec_k = rows_aligned16(p.x, p.stride_xm, ex) && rows_aligned16(p.a, p.stride_ar, el) &&
               (p.gate.kind != kGateToken || aligned16(p.gate.gate_weight));
  args.vec_b = rows_aligned16(p.b, p.stride_bn, el);

  // Rows per block: a decode row alone, else 4 or 8 (each thread keeps one accumulator per row).
  const int bm = p.m == 1 ? 1 : p.m <= 4 ? 4 : 8;
  const std::int64_t row_blocks = (p.m + bm - 1) / bm;
  if (row_blocks > 0x7fffffff) throw std::invalid_argument("gatedlora cuda: M too large for one grid");
  const std::int64_t col_tiles = (p.n + kThreads - 1) / kThreads;
  std::int64_t split = p.n_split;
  if (split <= 0) {
    // Spread N over blocks until the grid covers the GPU about twice; each extra block along N
    // re-reads A and recomputes x A^T for its rows (e.g. M=1, K=4096, r=16, bf16: 128 KiB of A
    // from L2 per block), so large M keeps one block per row block. An estimate, not measured.
    const std::int64_t want = (2 * std::int64_t(sm_count(p.device)) + row_blocks - 1) / row_blocks;
    split = want < 1 ? 1 : want;
  }
  if (split > col_tiles) split = col_tiles;
  if (split > 65535) split = 65535;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(split));
  dispatch_dtypes<AdapterLaunch>(p.x_dtype, p.lora_dtype, args, grid, bm, reinterpret_cast<cudaStream_t>(p.stream));
}

void launch_fused(const FusedParams& p) {
  require_device(p.device);
  if (p.m < 1 || p.m > kMaxFusedRows)
    throw std::invalid_argument("gatedlora cuda: the fused GEMV takes 1 to " + std::to_string(kMaxFusedRows) +
                                " rows, got " + std::to_string(p.m));
  if (p.r < 1 || p.r > kMaxRank)
    throw std::invalid_argument("gatedlora cuda: rank " + std::to_string(p.r) + " outside [1, " +
                                std::to_string(kMaxRank) + "]");
  if (p.n < 0 || p.k < 0) throw std::invalid_argument("gatedlora cuda: negative size");
  if (p.workspace == 0 || !aligned16(p.workspace))
    throw std::invalid_argument("gatedlora cuda: the workspace must be a 16-byte aligned device buffer");
  check_gate(p.gate, p.x_dtype, p.m);
  if (p.n == 0) return;
  DeviceGuard guard(p.device);

  FusedArgs args;
  args.x = reinterpret_cast<const void*>(p.x);
  args.w = reinterpret_cast<const void*>(p.w);
  args.bias = reinterpret_cast<const void*>(p.bias);
  args.a = reinterpret_cast<const void*>(p.a);
  args.b = reinterpret_cast<const void*>(p.b);
  args.y = reinterpret_cast<void*>(p.y);
  args.ws = reinterpret_cast<Workspace*>(p.workspace);
  args.m = p.m; args.n = p.n; args.k = p.k; args.r = p.r;
  args.stride_xm = p.stride_xm; args.stride_wn = p.stride_wn; args.stride_ar = p.stride_ar;
  args.stride_bn = p.stride_bn; args.stride_ym = p.stride_ym;
  args.scaling = p.scaling;
  args.gate = device_gate(p.gate);
  const int ex = element_size(p.x_dtype), el = element_size(p.lora_dtype);
  args.vec_k = rows_aligned16(p.x, p.stride_xm, ex) && rows_aligned16(p.w, p.stride_wn, ex) &&
               rows_aligned16(p.a, p.stride_ar, el) && (p.gate.kind != kGateToken || aligned16(p.gate.gate_weight));
  const int items = static_cast<int>(p.r) + (p.gate.kind == kGateToken ? 1 : 0);
  const int u_blocks = (items + kWarps - 1) / kWarps;
  dispatch_dtypes<FusedLaunch>(p.x_dtype, p.lora_dtype, args, u_blocks, reinterpret_cast<cudaStream_t>(p.stream));
}

}  // namespace gatedlora
