// Packed mixed-precision GEMM with warp-level int8 MMA (mma.sync.m16n8k32), for Ampere and Ada (sm_80, sm_86,
// sm_89) and as a fallback on Hopper. Same operands, tiles, work units and epilogue as the sm_90a kernel
// (treeq/gemm_common.cuh); only the main loop differs.
// treeq-ptx-requires(sm_80): mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32
// treeq-ptx-requires(sm_80): ldmatrix.sync.aligned.m8n8.x4
// treeq-sass-requires(sm_80): IMMA
//
// CTA = 256 channels × 128 tokens, 16 warps as 8 (channels) × 2 (tokens): a warp owns 32 channels (two m16
// row blocks of the fragment-layout tile) × 64 tokens (eight n8 blocks) = 64 int32 accumulators per thread.
// Per 128-wide K stage, cp.async brings (a) the activation tile, 128 tokens × 128 bytes, into shared memory with
// the 16-byte chunks of row r XOR-swizzled by r mod 8 (conflict-free ldmatrix), zero-filling rows ≥ M and
// columns ≥ K; (b) the weight tile, one contiguous 4096·bits-byte block of fragment layout v1. B fragments come
// from ldmatrix.x4 (two n8 blocks per instruction), A fragments from the thread's own fragment-layout words
// (16-byte LDS) unpacked in registers (treeq/frag.h). 3 stages (2 for 8-bit weights) keep shared memory under
// the 99 KB an sm_89 block may use; the epilogue reuses the pipeline buffers for its output staging.
#include <cuda_runtime.h>

#include <mutex>
#include <string>
#include <type_traits>

#include "treeq/gemm_common.cuh"
#include "treeq/gemm_launch.h"

namespace treeq::gemm {

namespace {

constexpr int kThreads = 512;

template <int BITS>
constexpr int stages_sm80() {
  return BITS == 8 ? 2 : 3;
}

template <int BITS>
constexpr int smem_bytes_sm80() {
  const int pipe = stages_sm80<BITS>() * (kStageActBytes + frag::tile_bytes(BITS));
  const int epi = kStagingBytes + static_cast<int>(sizeof(TileVecs));
  return (pipe > epi ? pipe : epi) + 128;  // + alignment slack
}

template <int BITS>
__global__ void __launch_bounds__(kThreads, 1) gemm_sm80_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kStages = stages_sm80<BITS>();
  constexpr int kWBytes = frag::tile_bytes(BITS);
  constexpr int kWords = frag::words_per_slot(BITS);

  // Aligned by an offset from the shared array itself, so the compiler keeps the shared address space (LDS/STS).
  extern __shared__ __align__(128) char smem_raw[];
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  char* smem = smem_raw + ((128u - (smem_base & 127u)) & 127u);
  char* act_s = smem;
  char* w_s = act_s + kStages * kStageActBytes;
  char* staging = smem;  // epilogue only, after the pipeline has drained
  TileVecs* vecs = reinterpret_cast<TileVecs*>(smem + kStagingBytes);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wc = warp >> 1, wt = warp & 1;
  const Unit un = unit_of(p, blockIdx.x);
  const int t_base = un.tt * kTileT;
  const int nkt = un.kt1 - un.kt0;

  auto load_stage = [&](int kt, int st) {
    for (int q = tid; q < kTileT * 8; q += kThreads) {
      const int row = q >> 3, ch = q & 7;
      const int tok = t_base + row, kb = kt * kTileK + ch * 16;
      // Bounded by the true K, not k_act: the zero fill past K keeps junk in padding columns out of the sums
      // (fragment-layout padding is code 0 = field value 2^(bits-1), which would multiply it).
      const bool ok = tok < p.m && kb < p.k;
      const int8_t* src = ok ? p.act + static_cast<int64_t>(tok) * p.lda + kb : p.act;
      ptx::cp_async_16(ptx::smem_addr(act_s + st * kStageActBytes + row * 128 + ((ch ^ (row & 7)) << 4)), src,
                       ok ? min(16, p.k - kb) : 0);
    }
    const char* wsrc = reinterpret_cast<const char*>(
        p.wfrag + (static_cast<int64_t>(un.tc) * p.tiles_k + kt) * frag::tile_words(BITS));
    for (int q = tid; q < kWBytes / 16; q += kThreads)
      ptx::cp_async_16(ptx::smem_addr(w_s + st * kWBytes + q * 16), wsrc + q * 16, 16);
  };

  int32_t acc[2][8][4];
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mb][nb][i] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nkt) load_stage(un.kt0 + s, s);
    ptx::cp_async_commit();
  }
  for (int i = 0; i < nkt; ++i) {
    ptx::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage i landed for everyone; everyone finished stage i - 1, which is refilled next
    if (i + kStages - 1 < nkt) load_stage(un.kt0 + i + kStages - 1, (i + kStages - 1) % kStages);
    ptx::cp_async_commit();

    const int st = i % kStages;
    uint32_t words[2][kWords];
    const uint32_t* wt_s = reinterpret_cast<const uint32_t*>(w_s + st * kWBytes);
#pragma unroll
    for (int mb = 0; mb < 2; ++mb)
#pragma unroll
      for (int c = 0; c < frag::num_chunks(BITS); ++c) load_slot_chunk<BITS>(words[mb], wt_s, 2 * wc + mb, lane, c);
    const uint32_t act_base = ptx::smem_addr(act_s + st * kStageActBytes);
    auto kstep = [&](auto s_const) {
      constexpr int S = decltype(s_const)::value;
      uint32_t a[2][4];
      frag::unpack<BITS, S>(words[0], a[0]);
      frag::unpack<BITS, S>(words[1], a[1]);
#pragma unroll
      for (int pr = 0; pr < 4; ++pr) {
        const int mat = lane >> 3;
        const int tok = 64 * wt + 16 * pr + (lane & 7) + 8 * (mat >> 1);
        const int kc = 2 * S + (mat & 1);
        uint32_t b[4];
        ptx::ldmatrix_x4(b, act_base + tok * 128 + ((kc ^ (tok & 7)) << 4));
#pragma unroll
        for (int mb = 0; mb < 2; ++mb) {
          ptx::mma_m16n8k32_s8<BITS != 8>(acc[mb][2 * pr], a[mb], b[0], b[1]);
          ptx::mma_m16n8k32_s8<BITS != 8>(acc[mb][2 * pr + 1], a[mb], b[2], b[3]);
        }
      }
    };
    kstep(std::integral_constant<int, 0>{});
    kstep(std::integral_constant<int, 1>{});
    kstep(std::integral_constant<int, 2>{});
    kstep(std::integral_constant<int, 3>{});
  }
  ptx::cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the epilogue's staging area

  auto sync = [] { ptx::named_barrier(1, kThreads); };
  auto row0 = [wc](int mb) { return 32 * wc + 16 * mb; };
  auto tok0 = [wt](int nb) { return 64 * wt + 8 * nb; };
  if (!splitk_fixup<2, 8>(p, un, acc, tid, kThreads, vecs, sync)) return;
  epilogue<2, 8>(p, un, acc, row0, tok0, tid, kThreads, staging, vecs, sync);
#endif
}

template <int BITS>
std::string launch(const Params& p, cudaStream_t stream) {
  constexpr int smem = smem_bytes_sm80<BITS>();
  if (const cudaError_t e = set_max_dynamic_smem(reinterpret_cast<const void*>(gemm_sm80_kernel<BITS>), smem);
      e != cudaSuccess) {
    cudaGetLastError();
    return std::string("gemm_sm80: cudaFuncSetAttribute: ") + cudaGetErrorString(e);
  }
  gemm_sm80_kernel<BITS><<<p.units, kThreads, smem, stream>>>(p);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : std::string("gemm_sm80 launch: ") + cudaGetErrorString(e);
}

}  // namespace

int sm80_smem_bytes(int bits) {
  switch (bits) {
    case 2: return smem_bytes_sm80<2>();
    case 3: return smem_bytes_sm80<3>();
    case 4: return smem_bytes_sm80<4>();
    default: return smem_bytes_sm80<8>();
  }
}

std::string launch_sm80(const Params& p, int bits, cudaStream_t stream) {
  switch (bits) {
    case 2: return launch<2>(p, stream);
    case 3: return launch<3>(p, stream);
    case 4: return launch<4>(p, stream);
    case 8: return launch<8>(p, stream);
    default: return "gemm_sm80: unsupported weight bit-width " + std::to_string(bits);
  }
}

}  // namespace treeq::gemm
