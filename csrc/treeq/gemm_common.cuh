// Shared by the packed GEMM kernels (gemm_sm90.cu: wgmma; gemm_sm80.cu: mma.sync): parameters, the
// persistent work decomposition with split-K, the split-K fix-up and the fused epilogue.
//
// Math (docs/format.md, u-domain weights of treeq/frag.h):
//   acc[m, n]  = Σ_k qa[m, k] · u[n, k]                            exact int32 (u = q + 2^(bits-1), or q at 8 bits)
//   corr[m, n] = acc − uzp[n]·ra[m] − za[m]·ucs[n] + K·za[m]·uzp[n]  = Σ_k (qa − za)(qw − zw), exact int32
//                (uzp = zw + 2^(bits-1), ucs = cw + 2^(bits-1)·K; wrap-around int32 arithmetic is exact here)
//   y[m, n]    = (float(corr) · sa[m]) · sw[n]                        same order as the oracle, no contraction
//              + Σ_c w2[j, l, c] · z[m, j, c]   (n = j·Nb + l)        Monarch stage 2, bf16 × bf16 → f32 (mma)
//              + bias[n];  GELU(tanh) optional;  rounded to the output type T (bf16 / fp16 / fp32), or corr
//              itself (int32 mode).
//   out[m, n]  = T(y)                                                 without a residual; with one, the gated
//              = T(float(res[m, n]) + gate[m / gate_rows, n] · float(T(y)))   residual (no gate: res + float(T(y)))
//                from y rounded to T, as the unfused layer would write it; product and sum each rounded to float32
//                (__fmul_rn, __fadd_rn: no FMA), the oracle's two separate float32 operations.
//
// Tiles: 256 output channels (the MMA M side, rows of a fragment-layout tile) × 128 tokens × K in steps of 128.
// A work unit is (channel tile, token tile, K split); units are numbered channel tile fastest (neighbouring CTAs
// share the activation tile in L2), then token tile, then split. With splits > 1 every unit writes its int32
// partial tile to a workspace slot, and the last unit of a tile to arrive (a counter per tile) adds the others'
// partials and runs the epilogue: integer partial sums make split-K exact and order-independent.
//
// Accumulator fragments (both kernels): a thread holds MB row blocks × NB token blocks of the m16n8 C layout,
// acc[mb][nb][i] = (row = row0(mb) + g + 8·(i >> 1), token = tok0(nb) + 2·t + (i & 1)), g = lane >> 2,
// t = lane & 3. This is the wgmma m64nN accumulator layout per warp and the mma.sync m16n8 layout alike.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "frag.h"
#include "ptx.cuh"

namespace treeq::gemm {

constexpr int kTileC = frag::kTileN;  // output channels per tile
constexpr int kTileT = 128;           // tokens per tile
constexpr int kTileK = frag::kTileK;  // K per pipeline stage
constexpr int kStageActBytes = kTileT * kTileK;  // int8 activation tile, 128-byte swizzled rows

enum OutKind : int { kOutBF16 = 0, kOutF16 = 1, kOutF32 = 2, kOutI32 = 3 };

// Output staging: kStageTokens(e) tokens × 256 channels of e-byte elements, rows padded by 16 bytes.
__host__ __device__ constexpr int stage_tokens(int esize) { return esize == 2 ? 128 : 64; }
__host__ __device__ constexpr int stage_stride(int esize) { return kTileC * esize + 16; }
constexpr int kStagingBytes = 128 * (kTileC * 2 + 16);  // 67584 B: 128 tokens of bf16 or 64 of fp32
static_assert(kStagingBytes >= 64 * (kTileC * 4 + 16), "staging buffer too small for 4-byte outputs");

struct TileVecs {  // per-tile token vectors, staged in shared memory by the epilogue
  float sa[kTileT];
  int32_t za[kTileT];
  int32_t ra[kTileT];  // ra − K·za (mod 2^32)
  int flag;  // split-K: "this unit is the last of its tile"
};

struct Params {
  const int8_t* act;        // (m, lda) int8 codes; columns ≥ k are never read (zero-filled)
  int64_t lda;              // bytes per activation row (multiple of 16)
  const float* a_scale;     // (m,)
  const int32_t* a_zp;      // (m,)
  const int32_t* a_rowsum;  // (m,)
  const uint32_t* wfrag;    // fragment layout v1, (tiles_c, tiles_k, tile_words)
  const int32_t* row_chan;  // (tiles_c · 256,) original channel of each tile row, -1 = padding
  const float* w_scale;     // (n,)
  const int32_t* w_uzp;     // (n,) zw + 2^(bits-1)
  const int32_t* w_ucs;     // (n,) cw + 2^(bits-1)·K
  const float* bias;        // (n,) or null
  const uint16_t* z;        // bf16 (≥ tiles_t·128 rows, b, brp) or null (no branch); padding is zero
  const uint16_t* w2;       // bf16 (b, nb, brp), zero beyond br
  int blocks, brp, nb;      // Monarch b, b·r rounded up to 16, Nb
  void* out;                // (m, n) of out_kind
  int out_kind;
  int gelu;
  int out_vec;              // 16-byte vector accesses (n·esize % 16 == 0; out, residual, gate 16-byte aligned)
  const void* residual;     // (m, n) of out_kind (float kinds only), or null; may be `out` itself, never partly
  const float* gate;        // (m / gate_rows, n) or null (residual added ungated)
  int gate_rows;            // tokens per gate row (ignored without a gate)
  int m, n, k;              // tokens, channels, true K (the zero-point correction uses it)
  int k_act;                // activation columns present (multiple of 16, ≥ k)
  int tiles_c, tiles_t, tiles_k, splits, units;
  int32_t* partials;        // splits > 1: (tiles · splits, 256·128) int32 slots
  int32_t* counters;        // splits > 1: (tiles,) zero-initialised arrival counters (reset by the last unit)
};

struct Unit {
  int tc, tt, split, kt0, kt1;
};

__host__ __device__ inline Unit unit_of(const Params& p, int u) {
  const int tiles = p.tiles_c * p.tiles_t;
  Unit r;
  const int tile = u % tiles;
  r.split = u / tiles;
  r.tc = tile % p.tiles_c;
  r.tt = tile / p.tiles_c;
  r.kt0 = static_cast<int>(static_cast<int64_t>(r.split) * p.tiles_k / p.splits);
  r.kt1 = static_cast<int>(static_cast<int64_t>(r.split + 1) * p.tiles_k / p.splits);
  return r;
}

// Chunk c (frag::chunk_words(BITS) words, one 16- or 8-byte shared-memory load) of the slot (m16, lane) of a
// fragment-layout tile in shared memory, into words[c·CW ..].
template <int BITS>
__device__ __forceinline__ void load_slot_chunk(uint32_t* words, const uint32_t* tile, int m16, int lane, int c) {
  constexpr int kCW = frag::chunk_words(BITS);
  const uint32_t* src = tile + frag::word_index(BITS, m16, lane, c * kCW);
  if constexpr (kCW == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(src);
    words[c * 4 + 0] = v.x;
    words[c * 4 + 1] = v.y;
    words[c * 4 + 2] = v.z;
    words[c * 4 + 3] = v.w;
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(src);
    words[c * 2 + 0] = v.x;
    words[c * 2 + 1] = v.y;
  }
}

// Keeps the compiler from moving memory accesses across this point (used to bound how many loads it hoists).
__device__ __forceinline__ void compiler_fence() { asm volatile("" ::: "memory"); }

// ---- split-K fix-up ------------------------------------------------------------------------------------

// Every unit writes its partial tile; the last one of the tile to arrive adds the others' and returns true.
// Slots are written in fragment order (thread-interleaved int4 vectors), so reads and writes coalesce.
template <int MB, int NB, class Sync>
__device__ bool splitk_fixup(const Params& p, const Unit& u, int32_t (&acc)[MB][NB][4], int tid, int nthreads,
                             TileVecs* vecs, Sync sync) {
  if (p.splits == 1) return true;
  const int tile = u.tt * p.tiles_c + u.tc;
  constexpr int kSlot = kTileC * kTileT;
  int32_t* mine = p.partials + (static_cast<int64_t>(tile) * p.splits + u.split) * kSlot;
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const int q = mb * NB + nb;
      *reinterpret_cast<int4*>(mine + (q * nthreads + tid) * 4) =
          make_int4(acc[mb][nb][0], acc[mb][nb][1], acc[mb][nb][2], acc[mb][nb][3]);
    }
  __threadfence();  // make this unit's partial visible device-wide before it is counted
  sync();
  if (tid == 0) {
    const int old = atomicAdd(p.counters + tile, 1);
    const int last = old == p.splits - 1;
    if (last) p.counters[tile] = 0;  // all units of the tile have arrived: reset for the next launch
    vecs->flag = last;
  }
  sync();
  if (!vecs->flag) return false;
  __threadfence();
  // Token-block-major with the split loop innermost: the loads of one int4 at a time are in flight, so the
  // other splits' partials never compete with the accumulators for registers.
  const int32_t* slots = p.partials + static_cast<int64_t>(tile) * p.splits * kSlot;
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const int q = mb * NB + nb;
      for (int s = 0; s < p.splits; ++s) {
        if (s == u.split) continue;
        const int4 v = __ldcg(reinterpret_cast<const int4*>(slots + s * kSlot + (q * nthreads + tid) * 4));
        acc[mb][nb][0] += v.x;
        acc[mb][nb][1] += v.y;
        acc[mb][nb][2] += v.z;
        acc[mb][nb][3] += v.w;
      }
    }
  return true;
}

// ---- epilogue -----------------------------------------------------------------------------------------

__device__ __forceinline__ float gelu_tanh(float x) {
  const float kAlpha = 0.7978845608028654f;  // sqrt(2 / pi)
  const float inner = kAlpha * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + tanhf(inner));
}

template <class T>
__device__ __forceinline__ T convert_out(float v) {
  if constexpr (sizeof(T) == 4) return v;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}

template <class T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (sizeof(T) == 4) return v;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

// res + gate · y from the already rounded y, as the oracle's two float32 operations (a contracted FMA would round
// once and differ from it in the last bit).
template <class T>
__device__ __forceinline__ T gated_residual(T y, T res, const float* gate, float g) {
  const float yf = to_float(y);
  return convert_out<T>(__fadd_rn(to_float(res), gate != nullptr ? __fmul_rn(g, yf) : yf));
}

// The gated residual on the 16-byte chunk of output row `tok` that starts at channel ch0 (vector path: n·esize and
// every base are 16-byte aligned, so the residual and gate chunks are too). Plain loads, not __ldg: the residual
// may be `out` itself, overwritten by this very thread right after the read.
template <class T>
__device__ __forceinline__ int4 gated_residual_chunk(const Params& p, int tok, int ch0, int4 y) {
  constexpr int kV = 16 / sizeof(T);
  const T* res = static_cast<const T*>(p.residual) + (static_cast<int64_t>(tok) * p.n + ch0);
  const int4 r = *reinterpret_cast<const int4*>(res);
  float g[kV] = {};
  if (p.gate != nullptr) {
    const float* gate = p.gate + (static_cast<int64_t>(tok / p.gate_rows) * p.n + ch0);
    const float4* gp = reinterpret_cast<const float4*>(gate);
#pragma unroll
    for (int j = 0; j < kV / 4; ++j) {
      const float4 v = gp[j];
      g[4 * j + 0] = v.x;
      g[4 * j + 1] = v.y;
      g[4 * j + 2] = v.z;
      g[4 * j + 3] = v.w;
    }
  }
  T ye[kV], re[kV];
  memcpy(ye, &y, 16);
  memcpy(re, &r, 16);
#pragma unroll
  for (int x = 0; x < kV; ++x) ye[x] = gated_residual(ye[x], re[x], p.gate, g[x]);
  memcpy(&y, ye, 16);
  return y;
}

// Stage a finished tile through shared memory in token slabs, then write contiguous channel runs of each token
// row with 16-byte stores (element stores at the matrix edge or when rows are not 16-byte aligned). The gated
// residual joins here: y is already rounded to T, and the accumulators are dead (only the second slab's y stays
// live while 4-byte outputs take two slabs), so its loads add little register pressure.
template <class T, int MB, int NB, class Tok0, class Sync>
__device__ void store_tile(const Params& p, const Unit& u, const float (&y)[MB][NB][4], const int (&chan)[MB][2],
                           Tok0 tok0, int tid, int nthreads, char* staging, Sync sync) {
  constexpr int kE = sizeof(T);
  constexpr int kSlab = stage_tokens(kE), kStride = stage_stride(kE), kChunks = kTileC * kE / 16;
  const int t = threadIdx.x & 3;
  const int c_base = u.tc * kTileC, t_base = u.tt * kTileT;
  for (int s0 = 0; s0 < kTileT; s0 += kSlab) {
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (chan[mb][h] < 0) continue;
        T* col = reinterpret_cast<T*>(staging) + (chan[mb][h] - c_base);
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int tl = tok0(nb) + 2 * t + e - s0;
            if (kSlab == kTileT || (tl >= 0 && tl < kSlab))
              *reinterpret_cast<T*>(reinterpret_cast<char*>(col) + tl * kStride) = convert_out<T>(y[mb][nb][2 * h + e]);
          }
      }
    sync();
    for (int q = tid; q < kSlab * kChunks; q += nthreads) {
      const int row = q / kChunks, cc = q % kChunks;
      const int tok = t_base + s0 + row;
      const int ch0 = c_base + cc * (16 / kE);
      if (tok >= p.m || ch0 >= p.n) continue;
      const char* src = staging + row * kStride + cc * 16;
      char* dst = static_cast<char*>(p.out) + (static_cast<int64_t>(tok) * p.n + ch0) * kE;
      if (p.out_vec && ch0 + 16 / kE <= p.n) {
        int4 v = *reinterpret_cast<const int4*>(src);
        if (p.residual != nullptr) v = gated_residual_chunk<T>(p, tok, ch0, v);
        *reinterpret_cast<int4*>(dst) = v;
      } else if (p.residual != nullptr) {
        const T* res = static_cast<const T*>(p.residual) + (static_cast<int64_t>(tok) * p.n + ch0);
        const float* gate =
            p.gate != nullptr ? p.gate + (static_cast<int64_t>(tok / p.gate_rows) * p.n + ch0) : nullptr;
        for (int x = 0; x < min(16 / kE, p.n - ch0); ++x)
          reinterpret_cast<T*>(dst)[x] =
              gated_residual(reinterpret_cast<const T*>(src)[x], res[x], gate, gate != nullptr ? gate[x] : 0.0f);
      } else {
        for (int x = 0; x < min(16 / kE, p.n - ch0); ++x)
          reinterpret_cast<T*>(dst)[x] = reinterpret_cast<const T*>(src)[x];
      }
    }
    sync();
  }
}

// The epilogue of one tile. `row0(mb)` and `tok0(nb)` give this warp's tile-local fragment bases; `sync()` is a
// barrier over the `nthreads` threads that run it (tid in [0, nthreads)). `staging` holds kStagingBytes.
template <int MB, int NB, class Row0, class Tok0, class Sync>
__device__ void epilogue(const Params& p, const Unit& u, const int32_t (&acc)[MB][NB][4], Row0 row0, Tok0 tok0,
                         int tid, int nthreads, char* staging, TileVecs* vecs, Sync sync) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int c_base = u.tc * kTileC, t_base = u.tt * kTileT;

  for (int i = tid; i < kTileT; i += nthreads) {
    const int tok = t_base + i;
    const bool ok = tok < p.m;
    vecs->sa[i] = ok ? p.a_scale[tok] : 0.0f;
    const int32_t za = ok ? p.a_zp[tok] : 0;
    vecs->za[i] = za;
    // ra − K·za (mod 2^32): corr = acc − uzp·(ra − K·za) − za·ucs
    vecs->ra[i] = static_cast<int32_t>(static_cast<uint32_t>(ok ? p.a_rowsum[tok] : 0) -
                                       static_cast<uint32_t>(p.k) * static_cast<uint32_t>(za));
  }

  // The two rows (channels) of each row block this thread holds.
  int chan[MB][2];
  float sw[MB][2];
  uint32_t uzp[MB][2], ucs[MB][2];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = p.row_chan[c_base + row0(mb) + g + 8 * h];
      chan[mb][h] = c;
      sw[mb][h] = c >= 0 ? p.w_scale[c] : 0.0f;
      uzp[mb][h] = c >= 0 ? static_cast<uint32_t>(p.w_uzp[c]) : 0u;
      ucs[mb][h] = c >= 0 ? static_cast<uint32_t>(p.w_ucs[c]) : 0u;
    }
  sync();

  // Zero-point corrections (exact, modulo 2^32): corr = acc − uzp·ra − za·ucs + K·za·uzp
  //                                                   = acc − uzp·(ra − K·za) − za·ucs  (vecs->ra holds ra − K·za)
  auto corr_of = [&](int mb, int nb, int i) -> int32_t {
    const int h = i >> 1, tl = tok0(nb) + 2 * t + (i & 1);
    const uint32_t za = static_cast<uint32_t>(vecs->za[tl]), rk = static_cast<uint32_t>(vecs->ra[tl]);
    return static_cast<int32_t>(static_cast<uint32_t>(acc[mb][nb][i]) - uzp[mb][h] * rk - za * ucs[mb][h]);
  };
  float y[MB][NB][4];
  if (p.out_kind == kOutI32) {  // the exact integer result itself (tests), carried as float bits
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) y[mb][nb][i] = __int_as_float(corr_of(mb, nb, i));
    store_tile<float>(p, u, y, chan, tok0, tid, nthreads, staging, sync);
    return;
  }
  // (float(corr) · sa) · sw, in the oracle's order, never contracted.
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        y[mb][nb][i] = __fmul_rn(__fmul_rn(static_cast<float>(corr_of(mb, nb, i)), vecs->sa[tok0(nb) + 2 * t + (i & 1)]),
                                 sw[mb][i >> 1]);

  // Monarch stage 2: y[m, j·Nb + l] += Σ_c w2[j, l, c] · z[m, j, c]. Output blocks are contiguous, so a 16-row
  // block meets one or two j (more only when Nb < 16) and the tile reads z for just the ~256/Nb + 1 blocks it
  // overlaps; one masked bf16 mma pass per (row block, j, 16-wide c chunk, token block).
  if (p.z != nullptr) {
    const int b = p.blocks, brp = p.brp;
    const uint32_t* z32 = reinterpret_cast<const uint32_t*>(p.z);
    const uint32_t* w32 = reinterpret_cast<const uint32_t*>(p.w2);
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      int jr[2], lr[2];
      int jlo = 0x7fffffff, jhi = -1;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = chan[mb][h];
        jr[h] = c >= 0 ? c / p.nb : -1;
        lr[h] = c >= 0 ? c - jr[h] * p.nb : 0;
        if (c >= 0) {
          jlo = min(jlo, jr[h]);
          jhi = max(jhi, jr[h]);
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        jlo = min(jlo, __shfl_xor_sync(0xffffffffu, jlo, off));
        jhi = max(jhi, __shfl_xor_sync(0xffffffffu, jhi, off));
      }
      for (int j = jlo; j <= jhi; ++j) {  // warp-uniform
        // bf16x2 word offsets: w2 rows (j, l), z rows (token, j); + c/2 within a row
        const int w_off0 = ((j * p.nb + lr[0]) * brp) / 2 + t, w_off1 = ((j * p.nb + lr[1]) * brp) / 2 + t;
        const int z_off = ((t_base + g) * b + j) * (brp / 2) + t;
        const int z_step = 8 * b * (brp / 2);  // 8 tokens
        for (int c0 = 0; c0 < brp; c0 += 16) {
          const int cw = c0 / 2;
          uint32_t a[4];  // register q: row half h = q & 1 (row g / g + 8), k half q >> 1 (c + 2t / + 8)
          a[0] = jr[0] == j ? __ldg(w32 + w_off0 + cw) : 0u;
          a[1] = jr[1] == j ? __ldg(w32 + w_off1 + cw) : 0u;
          a[2] = jr[0] == j ? __ldg(w32 + w_off0 + cw + 4) : 0u;
          a[3] = jr[1] == j ? __ldg(w32 + w_off1 + cw + 4) : 0u;
#pragma unroll
          for (int nb = 0; nb < NB; ++nb) {
            if (nb % 4 == 0) compiler_fence();  // bound the loads the compiler hoists (register pressure)
            const uint32_t* zp = z32 + z_off + (tok0(nb) / 8) * z_step + cw;
            ptx::mma_m16n8k16_bf16(y[mb][nb], a, __ldg(zp), __ldg(zp + 4));
          }
        }
      }
    }
  }
  // bias, activation
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float bv = (p.bias != nullptr && chan[mb][h] >= 0) ? p.bias[chan[mb][h]] : 0.0f;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = y[mb][nb][2 * h + e];
          if (p.bias != nullptr) v = __fadd_rn(v, bv);
          if (p.gelu) v = gelu_tanh(v);
          y[mb][nb][2 * h + e] = v;
        }
    }

  switch (p.out_kind) {
    case kOutBF16: store_tile<__nv_bfloat16>(p, u, y, chan, tok0, tid, nthreads, staging, sync); break;
    case kOutF16: store_tile<__half>(p, u, y, chan, tok0, tid, nthreads, staging, sync); break;
    default: store_tile<float>(p, u, y, chan, tok0, tid, nthreads, staging, sync);
  }
}

}  // namespace treeq::gemm
