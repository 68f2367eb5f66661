// Packed mixed-precision GEMM for Hopper (sm_90a): int8 wgmma with the low-bit WEIGHTS as the register operand.
// treeq-ptx-requires(sm_90a): wgmma.mma_async
// treeq-ptx-requires(sm_90a): cp.async.bulk.tensor.2d
// treeq-ptx-requires(sm_90a): setmaxnreg
// treeq-sass-requires(sm_90a): IGMMA
//
// Math: see treeq/gemm_common.cuh (exact int32 accumulation of u-domain weight fields × int8 activation codes,
// zero-point corrections, scales, Monarch stage 2, bias, GELU). Operands:
//   A (wgmma M = output channels): the weight tile in fragment layout v1 (treeq/frag.h), copied per stage into
//     shared memory by one bulk copy (4096·bits bytes), loaded by each thread with 16-byte LDS and unpacked in
//     registers to .u8 (sub-8-bit, one shift + AND per register) or .s8 (8-bit) A fragments.
//   B (wgmma N = tokens): the int8 activation codes (M, K) row-major = K-major, loaded by TMA as 128 tokens ×
//     128 bytes with the 128-byte swizzle, described to wgmma by a SWIZZLE_128B K-major descriptor; the four
//     32-wide k-steps of a stage advance the descriptor start by 32 bytes.
// Tiles: CTA = 256 channels × 128 tokens; each of the 2 consumer warpgroups owns two 64-channel blocks and
// issues two wgmma.m64n128k32 per k-step (128 int32 accumulators per thread: the reason for 2 consumer
// warpgroups with 240 registers rather than 4 with 112). K advances 128 per pipeline stage.
// Warp specialisation: warpgroup 0 is the producer (one thread issues the TMA and bulk copies; registers given
// away with setmaxnreg), warpgroups 1 and 2 consume. Stage handshake: full[s] (expect_tx, completed by the copies)
// and empty[s] (one arrival per consumer warp). The grid is persistent (≤ one CTA per SM), walking work units
// (channel tile, token tile, K split) in the order of gemm_common.cuh; both roles walk the same sequence.
// In the main loop a thread overlaps unpacking k-step s with the tensor cores still running earlier k-steps:
// wgmma.wait_group 3 before reusing a k-step's A registers, so up to 4 wgmma groups stay in flight.
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <mutex>
#include <string>

#include "treeq/gemm_common.cuh"
#include "treeq/gemm_launch.h"

namespace treeq::gemm {

namespace {

constexpr int kThreads = 384;          // 1 producer + 2 consumer warpgroups
[[maybe_unused]] constexpr int kConsumers = 256;
[[maybe_unused]] constexpr int kProducerRegs = 24;
[[maybe_unused]] constexpr int kConsumerRegs = 240;     // 128·24 + 256·240 ≤ 65536
constexpr int kSmemLimit = 232448;     // 227 KB per block on sm_90
constexpr int kFixedSmem = kStagingBytes + static_cast<int>(sizeof(TileVecs)) + 1024 /*align*/ + 256 /*barriers*/;

template <int BITS>
constexpr int stages_sm90() {
  const int per_stage = kStageActBytes + frag::tile_bytes(BITS);
  const int s = (kSmemLimit - kFixedSmem) / per_stage;
  return s > 8 ? 8 : s;
}

template <int BITS>
constexpr int smem_bytes_sm90() {
  return stages_sm90<BITS>() * (kStageActBytes + frag::tile_bytes(BITS)) + kFixedSmem;
}

#if TREEQ_SM90A
// acc += A(regs) · B(smem desc), m64n128k32, s32 accumulate. A is .u8 (sub-8-bit fields) or .s8 (8-bit codes).
template <bool A_UNSIGNED>
__device__ __forceinline__ void wgmma_m64n128k32(int32_t (&d)[16][4], const uint32_t (&a)[4], uint64_t desc) {
#define TREEQ_WGMMA_OPERANDS                                                                                          \
  "+r"(d[0][0]), "+r"(d[0][1]), "+r"(d[0][2]), "+r"(d[0][3]), "+r"(d[1][0]), "+r"(d[1][1]), "+r"(d[1][2]),             \
      "+r"(d[1][3]), "+r"(d[2][0]), "+r"(d[2][1]), "+r"(d[2][2]), "+r"(d[2][3]), "+r"(d[3][0]), "+r"(d[3][1]),         \
      "+r"(d[3][2]), "+r"(d[3][3]), "+r"(d[4][0]), "+r"(d[4][1]), "+r"(d[4][2]), "+r"(d[4][3]), "+r"(d[5][0]),         \
      "+r"(d[5][1]), "+r"(d[5][2]), "+r"(d[5][3]), "+r"(d[6][0]), "+r"(d[6][1]), "+r"(d[6][2]), "+r"(d[6][3]),         \
      "+r"(d[7][0]), "+r"(d[7][1]), "+r"(d[7][2]), "+r"(d[7][3]), "+r"(d[8][0]), "+r"(d[8][1]), "+r"(d[8][2]),         \
      "+r"(d[8][3]), "+r"(d[9][0]), "+r"(d[9][1]), "+r"(d[9][2]), "+r"(d[9][3]), "+r"(d[10][0]), "+r"(d[10][1]),       \
      "+r"(d[10][2]), "+r"(d[10][3]), "+r"(d[11][0]), "+r"(d[11][1]), "+r"(d[11][2]), "+r"(d[11][3]), "+r"(d[12][0]),  \
      "+r"(d[12][1]), "+r"(d[12][2]), "+r"(d[12][3]), "+r"(d[13][0]), "+r"(d[13][1]), "+r"(d[13][2]), "+r"(d[13][3]),  \
      "+r"(d[14][0]), "+r"(d[14][1]), "+r"(d[14][2]), "+r"(d[14][3]), "+r"(d[15][0]), "+r"(d[15][1]), "+r"(d[15][2]),  \
      "+r"(d[15][3])
#define TREEQ_WGMMA_D                                                                                                 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "   \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, " \
  "%47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
  if constexpr (A_UNSIGNED) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.u8.s8 " TREEQ_WGMMA_D ", {%64, %65, %66, %67}, %68, p;\n}\n"
        : TREEQ_WGMMA_OPERANDS
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));  // scale-d = 1: D += A·B
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 " TREEQ_WGMMA_D ", {%64, %65, %66, %67}, %68, p;\n}\n"
        : TREEQ_WGMMA_OPERANDS
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));  // scale-d = 1: D += A·B
  }
#undef TREEQ_WGMMA_OPERANDS
#undef TREEQ_WGMMA_D
}

// Pin register values in program order relative to the asynchronous wgmma (CUTLASS's fence_operand idea):
// the compiler may not move reads or writes of `r` across this point.
__device__ __forceinline__ void fence_reg(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void fence_reg(int32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// First k-step that needs chunk c of a slot's words (treeq/frag.h): chunks are loaded just before first use,
// so only the words still to be unpacked occupy registers.
template <int BITS>
constexpr int first_use(int c) {
  return BITS == 8 ? c : BITS == 4 ? 2 * c : BITS == 2 ? 0 : (c == 2 ? 0 : 2 * c);
}

template <int BITS, int S>
__device__ __forceinline__ void load_chunks(uint32_t (&words)[2][2 * BITS], const uint32_t* wt, const int (&blk)[2],
                                            int lane) {
#pragma unroll
  for (int c = 0; c < frag::num_chunks(BITS); ++c) {
    if (first_use<BITS>(c) != S) continue;
#pragma unroll
    for (int mb = 0; mb < 2; ++mb) load_slot_chunk<BITS>(words[mb], wt, blk[mb], lane, c);
  }
}

template <int BITS, int S>
__device__ __forceinline__ void kstep(int32_t (&acc)[2][16][4], uint32_t (&words)[2][2 * BITS], const uint32_t* wt,
                                      const int (&blk)[2], int lane, uint32_t (&a)[2][4][4], uint64_t desc0) {
  load_chunks<BITS, S>(words, wt, blk, lane);
  ptx::wgmma_wait<3>();  // the group that last read a[.][S] (4 groups ago) has completed
#pragma unroll
  for (int mb = 0; mb < 2; ++mb) {
    frag::unpack<BITS, S>(words[mb], a[mb][S]);
#pragma unroll
    for (int r = 0; r < 4; ++r) fence_reg(a[mb][S][r]);
  }
  ptx::wgmma_fence();
  wgmma_m64n128k32<BITS != 8>(acc[0], a[0][S], desc0 + 2 * S);  // +32 bytes per k-step, in 16-byte units
  wgmma_m64n128k32<BITS != 8>(acc[1], a[1][S], desc0 + 2 * S);
  ptx::wgmma_commit();
}
#endif

template <int BITS>
__global__ void __launch_bounds__(kThreads, 1) gemm_sm90_kernel(const __grid_constant__ CUtensorMap act_map,
                                                                 const Params p) {
#if TREEQ_SM90A
  constexpr int kStages = stages_sm90<BITS>();
  constexpr int kWBytes = frag::tile_bytes(BITS);
  constexpr int kWords = frag::words_per_slot(BITS);

  // 1024-align by an offset from the shared array itself (not through an integer round trip), so the compiler
  // keeps the shared address space and emits LDS/STS rather than generic loads and stores.
  extern __shared__ __align__(1024) char smem_raw[];
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  char* smem = smem_raw + ((1024u - (smem_base & 1023u)) & 1023u);
  char* act_s = smem;                                 // kStages × 16 KB, 1024-aligned (swizzle atoms)
  char* w_s = act_s + kStages * kStageActBytes;       // kStages × weight tile
  char* staging = w_s + kStages * kWBytes;            // output staging
  TileVecs* vecs = reinterpret_cast<TileVecs*>(staging + kStagingBytes);
  uint64_t* full = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(vecs + 1) + 7) & ~uintptr_t{7});
  uint64_t* empty = full + kStages;

  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      ptx::mbar_init(&full[s], 1);
      ptx::mbar_init(&empty[s], kConsumers / 32);
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer ----
    ptx::setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == 0) {
      ptx::prefetch_tmap(&act_map);
      int stage = 0;
      uint32_t phase = 0;
      for (int u = blockIdx.x; u < p.units; u += gridDim.x) {
        const Unit un = unit_of(p, u);
        for (int kt = un.kt0; kt < un.kt1; ++kt) {
          ptx::mbar_wait(&empty[stage], phase ^ 1);  // first pass: the preceding phase counts as completed
          ptx::mbar_arrive_expect_tx(&full[stage], kStageActBytes + kWBytes);
          ptx::tma_load_2d(act_s + stage * kStageActBytes, &act_map, kt * kTileK, un.tt * kTileT, &full[stage]);
          const uint32_t* src = p.wfrag + (static_cast<int64_t>(un.tc) * p.tiles_k + kt) * frag::tile_words(BITS);
          ptx::bulk_copy_g2s(w_s + stage * kWBytes, src, kWBytes, &full[stage]);
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
  // ---- consumers ----
  ptx::setmaxnreg_inc<kConsumerRegs>();
  const int ctid = threadIdx.x - 128;            // 0..255
  const int cwg = ctid / 128, warp = (ctid / 32) % 4, lane = threadIdx.x & 31;
  // This warp's two 16-row blocks of the 256-row tile: block w of each of its warpgroup's 64-row wgmma slabs.
  const int blk[2] = {8 * cwg + warp, 8 * cwg + 4 + warp};
  auto sync = [] { ptx::named_barrier(1, kConsumers); };
  auto row0 = [cwg, warp](int mb) { return 16 * (8 * cwg + 4 * mb + warp); };
  auto tok0 = [](int nb) { return 8 * nb; };

  int stage = 0;
  uint32_t phase = 0;
  for (int u = blockIdx.x; u < p.units; u += gridDim.x) {
    const Unit un = unit_of(p, u);
    int32_t acc[2][16][4];
#pragma unroll
    for (int mb = 0; mb < 2; ++mb)
#pragma unroll
      for (int i = 0; i < 16; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc[mb][i][j] = 0;
          fence_reg(acc[mb][i][j]);
        }
    uint32_t a[2][4][4];
    int pending = -1;  // stage whose last wgmma group may still be reading shared memory
    for (int kt = un.kt0; kt < un.kt1; ++kt) {
      ptx::mbar_wait(&full[stage], phase);
      uint32_t words[2][kWords];
      const uint32_t* wt = reinterpret_cast<const uint32_t*>(w_s + stage * kWBytes);
      const uint64_t desc0 = ptx::smem_desc_k_sw128(ptx::smem_addr(act_s + stage * kStageActBytes));
      kstep<BITS, 0>(acc, words, wt, blk, lane, a, desc0);
      kstep<BITS, 1>(acc, words, wt, blk, lane, a, desc0);
      kstep<BITS, 2>(acc, words, wt, blk, lane, a, desc0);
      // ≤ 3 groups pending (this stage's k-steps 0..2): every group of the previous stage has completed.
      ptx::wgmma_wait<3>();
      if (pending >= 0 && lane == 0) ptx::mbar_arrive(&empty[pending]);
      kstep<BITS, 3>(acc, words, wt, blk, lane, a, desc0);
      pending = stage;
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
    ptx::wgmma_wait<0>();
#pragma unroll
    for (int mb = 0; mb < 2; ++mb)
#pragma unroll
      for (int i = 0; i < 16; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) fence_reg(acc[mb][i][j]);
    if (pending >= 0 && lane == 0) ptx::mbar_arrive(&empty[pending]);

    if (!splitk_fixup<2, 16>(p, un, acc, ctid, kConsumers, vecs, sync)) continue;
    epilogue<2, 16>(p, un, acc, row0, tok0, ctid, kConsumers, staging, vecs, sync);
  }
  }
#else
  __trap();  // compiled without sm_90a features (e.g. for compute_90): fail loudly, never leave `out` unwritten
#endif
}

template <int BITS>
std::string launch(const Params& p, const CUtensorMap& map, cudaStream_t stream, int grid) {
  constexpr int smem = smem_bytes_sm90<BITS>();
  static_assert(smem <= kSmemLimit, "sm90 shared memory budget");
  const void* kernel = reinterpret_cast<const void*>(gemm_sm90_kernel<BITS>);
  // setmaxnreg only moves registers inside the CTA's launch allocation: the consumers' raise to kConsumerRegs
  // waits until the producer's release covers it, so an allocation below the sum would hang the kernel.
  static const int regs = [kernel] {
    cudaFuncAttributes fa{};
    const int r = cudaFuncGetAttributes(&fa, kernel) == cudaSuccess ? fa.numRegs : -1;
    cudaGetLastError();
    return r;
  }();
  if (regs >= 0 && regs * kThreads < (kThreads - kConsumers) * kProducerRegs + kConsumers * kConsumerRegs)
    return "gemm_sm90: ptxas allocated " + std::to_string(regs) + " registers per thread, too few for the "
           "setmaxnreg split (producer " + std::to_string(kProducerRegs) + ", consumers " +
           std::to_string(kConsumerRegs) + ")";
  if (const cudaError_t e = set_max_dynamic_smem(kernel, smem); e != cudaSuccess) {
    cudaGetLastError();
    return std::string("gemm_sm90: cudaFuncSetAttribute: ") + cudaGetErrorString(e);
  }
  gemm_sm90_kernel<BITS><<<grid, kThreads, smem, stream>>>(map, p);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : std::string("gemm_sm90 launch: ") + cudaGetErrorString(e);
}

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static std::once_flag once;
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  std::call_once(once, [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q) ==
            cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
    cudaGetLastError();
  });
  return fn;
}

}  // namespace

int sm90_smem_bytes(int bits) {
  switch (bits) {
    case 2: return smem_bytes_sm90<2>();
    case 3: return smem_bytes_sm90<3>();
    case 4: return smem_bytes_sm90<4>();
    default: return smem_bytes_sm90<8>();
  }
}

std::string launch_sm90(const Params& p, int bits, cudaStream_t stream, int grid) {
  auto encode = encode_tiled();
  if (encode == nullptr) return "gemm_sm90: cuTensorMapEncodeTiled is unavailable (driver too old?)";
  // Activation codes as a 2-D uint8 tensor (K, m), row stride lda, boxes of 128 bytes × 128 tokens,
  // 128-byte swizzle; out-of-range rows and columns are filled with zeros (code 0 adds nothing). The width is the
  // true K, not k_act, so that whatever the padding columns hold never reaches the sums.
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(p.k), static_cast<cuuint64_t>(p.m)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(p.lda)};
  const cuuint32_t box[2] = {kTileK, kTileT};
  const cuuint32_t estr[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(p.act), dims, strides, box,
                            estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return "gemm_sm90: cuTensorMapEncodeTiled failed with CUresult " + std::to_string(r);
  switch (bits) {
    case 2: return launch<2>(p, map, stream, grid);
    case 3: return launch<3>(p, map, stream, grid);
    case 4: return launch<4>(p, map, stream, grid);
    case 8: return launch<8>(p, map, stream, grid);
    default: return "gemm_sm90: unsupported weight bit-width " + std::to_string(bits);
  }
}

}  // namespace treeq::gemm
