// Host-side API of the CUDA half of the core. Torch-free: raw device pointers, sizes and a cudaStream_t
// passed as an integer cross this boundary. Every launcher returns "" on success or a message naming what
// is wrong; the pybind11 layer turns a message into a Python RuntimeError.
#pragma once

#include <cstdint>
#include <string>

namespace treeq::cuda {

bool built();               // compiled with nvcc (false in a TREEQ_CUDA=0 build)
std::string archs();        // e.g. "80,90a"
int runtime_version();      // cudaRuntimeGetVersion, 0 if not built
int driver_version();       // cudaDriverGetVersion, 0 without a driver
int device_count();         // 0 when no device or no driver is present
std::string device_name(int device);

// "" if a kernel can run on the current device, else why not (no CUDA build, no device, ...).
std::string check_runnable();

// Naive reference packed GEMM on the GPU, one thread per output: acc[m, n] = Σ_k a[m,k]·w(n,k).
// a: int8 (m, k) codes; w: layout-v1 packed weight rows (n, packed_cols(k, w_bits)); acc: int32 (m, n).
std::string packed_gemm_naive(const int8_t* a, const void* w, int32_t* acc, int64_t m, int64_t n, int64_t k,
                              int w_bits, std::uintptr_t stream);

// Activation quantization (act_quant.cu): per-token codes of x (M, K) after optional Layer/RMSNorm and modulate, with
// the Monarch stage 1 z. Pointers are device pointers; optional ones may be null.
struct ActQuantArgs {
  const void* x = nullptr;  // (m, k), x_dtype: 0 fp32, 1 fp16, 2 bf16
  int x_dtype = 0;
  int64_t m = 0, k = 0;
  int norm = 0;  // 0 none, 1 LayerNorm, 2 RMSNorm (both without affine, epsilon ln_eps)
  float ln_eps = 0.0f;
  const float* shift = nullptr;      // (groups, k) fp32
  const float* mod_scale = nullptr;  // (groups, k) fp32
  int64_t groups = 0;
  int bits = 8;
  bool symmetric = false;
  float clip = 1.0f;
  const uint16_t* w1 = nullptr;  // bf16 (blocks, blocks·rank, kb)
  int blocks = 0, rank = 0, kb = 0;
  int brp = 0;                   // z row stride: blocks·rank rounded up to 16
  int8_t* codes = nullptr;       // (m, k)
  float* scale = nullptr;        // (m,)
  int32_t* zp = nullptr;         // (m,)
  int32_t* row_sum = nullptr;    // (m,)
  uint16_t* z = nullptr;         // bf16 (z_rows, blocks, brp)
  int64_t z_rows = 0;
};
std::string quantize_activation(const ActQuantArgs& args, std::uintptr_t stream);

// Packed GEMM with the fused epilogue (gemm_sm90.cu, gemm_sm80.cu; semantics in treeq/gemm_common.cuh).
struct GemmArgs {
  const int8_t* act = nullptr;  // (m, lda bytes) int8 codes; k_act columns present (multiple of 16)
  int64_t lda = 0, k_act = 0;
  const float* a_scale = nullptr;
  const int32_t* a_zp = nullptr;
  const int32_t* a_rowsum = nullptr;
  const uint32_t* wfrag = nullptr;   // fragment layout v1
  const int32_t* row_chan = nullptr;
  int bits = 4;
  const float* w_scale = nullptr;
  const int32_t* w_uzp = nullptr;
  const int32_t* w_ucs = nullptr;
  const float* bias = nullptr;
  const uint16_t* z = nullptr;       // bf16 (≥ round_up(m, 128), blocks, brp), zero padded
  const uint16_t* w2 = nullptr;      // bf16 (blocks, nb, brp), zero padded
  int blocks = 0, brp = 0, nb = 0;
  void* out = nullptr;               // (m, n)
  int out_kind = 0;                  // 0 bf16, 1 fp16, 2 fp32, 3 int32 (the corrected integer accumulator)
  bool gelu = false;
  // Gated residual (float out kinds): out = res + gate[m / gate_rows] · y, from y rounded to the output type.
  const void* residual = nullptr;    // (m, n) of out_kind; may be `out` itself (in place), must not partly overlap it
  const float* gate = nullptr;       // (m / gate_rows, n) fp32, or null (ungated); needs residual
  int64_t gate_rows = 0;             // tokens per gate row (M / G), ≥ 1 and dividing m when gate is given
  int64_t m = 0, n = 0, k = 0;
  int arch = 0;                      // 90 (wgmma, sm_90 only) or 80 (mma.sync, sm_80+)
  int splits = 1;                    // from plan_packed_linear
  int32_t* partials = nullptr;       // splits > 1: plan.partial_ints int32
  int32_t* counters = nullptr;       // splits > 1: plan.counter_ints int32, zero-initialised
};

struct GemmPlan {
  int arch = 0;
  int splits = 1;
  int64_t units = 0;
  int grid = 0;
  int64_t partial_ints = 0;
  int64_t counter_ints = 0;
  int smem_bytes = 0;
};

// Work decomposition for a call: arch (0 = best for the current device), splits (0 = heuristic, else forced and
// clamped to the number of K tiles). Fills *plan or returns why not.
std::string plan_packed_linear(int64_t m, int64_t n, int64_t k, int bits, int arch, int splits, GemmPlan* plan);
std::string packed_linear(const GemmArgs& args, std::uintptr_t stream);

}  // namespace treeq::cuda
