// Row-owning activation quantization with the fused LayerNorm or RMSNorm, adaLN modulate and Monarch stage 1.
// treeq-ptx-requires(sm_80): mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
//
// Math, per token row x (K,), all float32 in the oracle's order (docs/format.md), never contracted into FMAs:
//   LayerNorm (optional, no affine)  v = (x − mean)·rstd,  mean = Σx/K,  rstd = 1/sqrt(Σ(x − mean)²/K + eps)
//   or RMSNorm (no affine)           the same with mean = 0:  v = x·rstd,  rstd = 1/sqrt(Σx²/K + eps)
//   modulate  (optional)             v = v·(1 + scale[g]) + shift[g],  g = row / (M / G)
//   asymmetric  lo = min(min v, 0)·clip, hi = max(max v, 0)·clip, s = (hi − lo)/(qmax − qmin) (1 if s == 0),
//               zp = clamp(rint(qmin − lo/s), qmin, qmax)
//   symmetric   s = max|v|·clip / qmax (1 if s == 0), zp = 0
//   codes       q = clamp(rint(v / s) + zp, qmin, qmax)   (rint: half to even; true IEEE division)
//   row sum     Σ_k q;  a row holding NaN/Inf gets s = NaN, zp = 0, codes 0, row sum 0 (the oracle's "propagate")
//   Monarch stage 1 (optional)  z[m, j, k·r + s] = Σ_i w1[k, j·r + s, i] · v[m, i·b + k]  (v = 0 beyond K),
//               bf16 operands (v rounded to bf16, w1 given in bf16), f32 accumulation, bf16 out.
// Quantization is bit-exact with the oracle when there is no LayerNorm (min, max, division and rint are exact
// operations); the LayerNorm's mean and variance are sums whose order differs from torch's, so with it codes
// can differ by one where v / s lies within rounding of a .5 tie.
//
// Layout: x (M, K) row-major in fp32, fp16 or bf16; codes int8 (M, K); scale, zp, row sum (M,); z bf16
// (≥ M rows, b, brp) with brp = b·r rounded up to 16 (the GEMM epilogue's padded layout; pad entries are
// written as zero).
// Tiles: a CTA owns 32 rows with 8 warps. Phase 1: each warp quantizes 4 rows, one row at a time, lanes
// striding over K (row statistics by warp shuffles; the row is re-read from L1/L2 for each pass). Phase 2:
// stage 1 on tensor cores, mma.m16n8k16 bf16: warp w takes row block w & 1 (16 rows) and the input blocks
// k ≡ w >> 1 (mod 4); per block, the 16 × Kb gather of v (inputs i·b + k) times w1[k]ᵀ (Kb × b·r) in chunks of
// 64 outputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "cuda_api.h"
#include "treeq/ptx.cuh"

namespace treeq::cuda {

namespace {

constexpr int kRows = 32;
constexpr int kThreads = 256;

struct AqParams {
  const void* x;
  int x_dtype;  // 0 fp32, 1 fp16, 2 bf16
  int m, k;
  int norm;  // 0 none, 1 LayerNorm, 2 RMSNorm (ActQuantArgs::norm)
  float ln_eps;
  const float* shift;  // (G, K) fp32 or null
  const float* mscale;
  int rows_per_group;
  int bits, symmetric;
  float clip;
  const uint16_t* w1;  // bf16 (b, b·r, Kb) or null
  int blocks, rank, kb, brp;
  int8_t* codes;
  float* scale;
  int32_t* zp;
  int32_t* row_sum;
  uint16_t* z;
  int z_rows;  // rows of z to write (≥ m; rows ≥ m are zero-filled)
};

__device__ __forceinline__ float load_x(const AqParams& p, int64_t idx) {
  switch (p.x_dtype) {
    case 0: return static_cast<const float*>(p.x)[idx];
    case 1: return __half2float(static_cast<const __half*>(p.x)[idx]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(p.x)[idx]);
  }
}

// v = preprocessed element (row, col): LayerNorm then modulate, each op rounded separately.
__device__ __forceinline__ float pre(const AqParams& p, int row, int col, float mean, float rstd) {
  float v = load_x(p, static_cast<int64_t>(row) * p.k + col);
  if (p.norm != 0) v = __fmul_rn(__fsub_rn(v, mean), rstd);  // (RMSNorm: mean 0, x − 0 is exact)
  if (p.shift != nullptr) {
    const int64_t gi = static_cast<int64_t>(row / p.rows_per_group) * p.k + col;
    v = __fadd_rn(__fmul_rn(v, __fadd_rn(1.0f, p.mscale[gi])), p.shift[gi]);
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const uint32_t a = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
  const uint32_t b = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
  return a | (b << 16);
}

__global__ void __launch_bounds__(kThreads) act_quant_kernel(const AqParams p) {
  __shared__ float s_mean[kRows], s_rstd[kRows];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_base = blockIdx.x * kRows;
  const int qmin = -(1 << (p.bits - 1)), qmax = (1 << (p.bits - 1)) - 1;

  // ---- phase 1: statistics and quantization, one warp per row ----
  for (int rr = warp; rr < kRows; rr += kThreads / 32) {
    const int row = row_base + rr;
    float mean = 0.0f, rstd = 1.0f;
    if (row < p.m) {
      if (p.norm != 0) {
        if (p.norm == 1) {
          float s = 0.0f;
          for (int c = lane; c < p.k; c += 32) s += load_x(p, static_cast<int64_t>(row) * p.k + c);
          mean = warp_sum(s) / static_cast<float>(p.k);
        }
        float s2 = 0.0f;
        for (int c = lane; c < p.k; c += 32) {
          const float d = load_x(p, static_cast<int64_t>(row) * p.k + c) - mean;
          s2 += d * d;
        }
        rstd = 1.0f / sqrtf(warp_sum(s2) / static_cast<float>(p.k) + p.ln_eps);
      }
      float lo = 0.0f, hi = 0.0f, amax = 0.0f;  // min(·, 0) and max(·, 0) are what the grid needs
      bool finite = true;
      for (int c = lane; c < p.k; c += 32) {
        const float v = pre(p, row, c, mean, rstd);
        finite = finite && isfinite(v);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
        amax = fmaxf(amax, fabsf(v));
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      }
      finite = __all_sync(0xffffffffu, finite);
      float s;
      int zp;
      if (p.symmetric) {
        const float am = __fmul_rn(amax, p.clip);
        s = __fdiv_rn(am, static_cast<float>(qmax));
        if (!(s > 0.0f)) s = 1.0f;   // amax == 0, or a range so small that the division underflows
        zp = 0;
      } else {
        const float l = __fmul_rn(lo, p.clip), h = __fmul_rn(hi, p.clip);
        const float rng = __fsub_rn(h, l);
        s = __fdiv_rn(rng, static_cast<float>(qmax - qmin));
        if (!(s > 0.0f)) s = 1.0f;
        const float zf = rintf(__fsub_rn(static_cast<float>(qmin), __fdiv_rn(l, s)));
        zp = static_cast<int>(fminf(fmaxf(zf, static_cast<float>(qmin)), static_cast<float>(qmax)));
      }
      int rsum = 0;
      for (int c = lane; c < p.k; c += 32) {
        int q = 0;
        if (finite) {
          const float v = pre(p, row, c, mean, rstd);
          const float qf = __fadd_rn(rintf(__fdiv_rn(v, s)), static_cast<float>(zp));
          q = static_cast<int>(fminf(fmaxf(qf, static_cast<float>(qmin)), static_cast<float>(qmax)));
        }
        p.codes[static_cast<int64_t>(row) * p.k + c] = static_cast<int8_t>(q);
        rsum += q;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) rsum += __shfl_xor_sync(0xffffffffu, rsum, o);
      if (lane == 0) {
        p.scale[row] = finite ? s : __int_as_float(0x7fc00000);  // NaN
        p.zp[row] = finite ? zp : 0;
        p.row_sum[row] = rsum;
      }
    }
    if (lane == 0) {
      s_mean[rr] = mean;
      s_rstd[rr] = rstd;
    }
  }
  if (p.w1 == nullptr) return;
  __syncthreads();

  // ---- phase 2: Monarch stage 1 on tensor cores ----
  const int g = lane >> 2, t = lane & 3;
  const int rb = warp & 1;                       // 16-row block
  const int r_lo = rb * 16 + g, r_hi = r_lo + 8;  // CTA-local rows of this thread's A fragment
  const int row_lo = row_base + r_lo, row_hi = row_base + r_hi;
  const int br = p.blocks * p.rank;
  for (int kblk = warp >> 1; kblk < p.blocks; kblk += kThreads / 64) {
    for (int c0 = 0; c0 < br; c0 += 64) {
      float acc[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;
      for (int i0 = 0; i0 < p.kb; i0 += 16) {
        // A (16 rows × 16 inputs), row-major: reg q holds rows (g | g + 8) × inputs (2t, 2t+1 | + 8).
        float va[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const int rl = (q & 2) ? r_hi : r_lo;  // q = 2·reg + half: reg 0 (g), 1 (g+8), 2 (g), 3 (g+8)
          const int row = row_base + rl;
          const int i = i0 + 2 * t + (q & 1) + 8 * (q >> 2);
          const int col = i * p.blocks + kblk;  // input block k gathers the row at stride b
          va[q] = (row < p.m && i < p.kb && col < p.k) ? pre(p, row, col, s_mean[rl], s_rstd[rl]) : 0.0f;
        }
        uint32_t a[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = pack_bf16(va[2 * r], va[2 * r + 1]);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int c = c0 + 8 * nt + g;  // output column (n = g) of this n8 tile
          if (c0 + 8 * nt >= br) break;
          // B (16 inputs × 8 outputs), "col": b0 = inputs (2t, 2t+1), b1 = (2t+8, 2t+9) of output c.
          uint32_t b[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int i = i0 + 2 * t + 8 * h;
            const int64_t base = (static_cast<int64_t>(kblk) * br + c) * p.kb + i;
            const uint16_t* w = p.w1 + base;
            const uint32_t lo = (c < br && i < p.kb) ? __ldg(w) : 0u;
            const uint32_t hi = (c < br && i + 1 < p.kb) ? __ldg(w + 1) : 0u;
            b[h] = lo | (hi << 16);
          }
          ptx::mma_m16n8k16_bf16(acc[nt], a, b[0], b[1]);
        }
      }
      // D (16 rows × 8 outputs): acc[nt][i] = (row g + 8·(i >> 1), output c0 + 8nt + 2t + (i & 1)).
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int c = c0 + 8 * nt + 2 * t + (i & 1);
          const int row = (i >> 1) ? row_hi : row_lo;
          if (c >= br || row >= p.m) continue;
          const int j = c / p.rank, s = c % p.rank;  // c = j·r + s  ->  z[row, j, k·r + s]
          p.z[(static_cast<int64_t>(row) * p.blocks + j) * p.brp + kblk * p.rank + s] =
              __bfloat16_as_ushort(__float2bfloat16_rn(acc[nt][i]));
        }
    }
  }
}

// Zero the padding of z: columns [b·r, brp) of every row < z_rows, and whole rows in [m, z_rows).
__global__ void z_pad_kernel(uint16_t* z, int m, int z_rows, int blocks, int br, int brp) {
  const int64_t total = static_cast<int64_t>(z_rows) * blocks * brp;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % brp);
    const int64_t row = i / (static_cast<int64_t>(blocks) * brp);
    if (c >= br || row >= m) z[i] = 0;
  }
}

}  // namespace

std::string quantize_activation(const ActQuantArgs& a, std::uintptr_t stream) {
  if (std::string why = check_runnable(); !why.empty()) return why;
  if (a.bits != 3 && a.bits != 4 && a.bits != 8) return "activation bit-width must be 3, 4 or 8, got " + std::to_string(a.bits);
  if (a.m <= 0 || a.k <= 0) return "M and K must be positive";
  if (a.m > (int64_t{1} << 30) || a.k > (int64_t{1} << 30)) return "M or K too large";
  if (a.x_dtype < 0 || a.x_dtype > 2) return "x dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)";
  if (a.norm < 0 || a.norm > 2) {
    return "norm must be 0 (none), 1 (LayerNorm) or 2 (RMSNorm), got " + std::to_string(a.norm);
  }
  if ((a.shift == nullptr) != (a.mod_scale == nullptr)) return "modulate needs both shift and scale";
  if (a.shift != nullptr && (a.groups <= 0 || a.m % a.groups != 0)) return "modulate groups must divide M";
  AqParams p{};
  p.x = a.x;
  p.x_dtype = a.x_dtype;
  p.m = static_cast<int>(a.m);
  p.k = static_cast<int>(a.k);
  p.norm = a.norm;
  p.ln_eps = a.ln_eps;
  p.shift = a.shift;
  p.mscale = a.mod_scale;
  p.rows_per_group = a.shift != nullptr ? static_cast<int>(a.m / a.groups) : 1;
  p.bits = a.bits;
  p.symmetric = a.symmetric ? 1 : 0;
  p.clip = a.clip;
  p.w1 = a.w1;
  p.blocks = a.blocks;
  p.rank = a.rank;
  p.kb = a.kb;
  p.brp = a.brp;
  p.codes = a.codes;
  p.scale = a.scale;
  p.zp = a.zp;
  p.row_sum = a.row_sum;
  p.z = a.z;
  p.z_rows = static_cast<int>(a.z_rows);
  if (a.w1 != nullptr) {
    if (a.blocks <= 0 || a.rank <= 0 || a.kb <= 0) return "Monarch blocks, rank and Kb must be positive";
    if (static_cast<int64_t>(a.blocks) * a.kb < a.k) return "Monarch w1 does not cover K";
    if (a.brp < a.blocks * a.rank || a.brp % 16 != 0) return "z row padding brp must be a multiple of 16 ≥ b·r";
    if (a.z_rows < a.m) return "z must have at least M rows";
  }
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (a.w1 != nullptr && (a.z_rows > a.m || a.brp > a.blocks * a.rank)) {
    const int64_t total = a.z_rows * a.blocks * a.brp;
    const int grid = static_cast<int>(std::min<int64_t>((total + 255) / 256, 4096));
    z_pad_kernel<<<grid, 256, 0, s>>>(a.z, p.m, p.z_rows, a.blocks, a.blocks * a.rank, a.brp);
  }
  act_quant_kernel<<<static_cast<unsigned>((a.m + kRows - 1) / kRows), kThreads, 0, s>>>(p);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : std::string("act_quant launch: ") + cudaGetErrorString(e);
}

}  // namespace treeq::cuda
