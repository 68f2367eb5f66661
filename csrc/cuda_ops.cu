// Host glue for the packed GEMM: picks the kernel for the device, plans the work decomposition (split-K for
// grids that would leave SMs idle), validates the raw arguments and launches. Device code lives in
// gemm_sm90.cu / gemm_sm80.cu; semantics in treeq/gemm_common.cuh.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda_api.h"
#include "treeq/gemm_launch.h"

namespace treeq::cuda {

namespace {

constexpr int64_t kMaxK = (int64_t{1} << 31) / (255 * 255);  // 33025: int32 zero-point correction is exact

struct Device {
  int major = 0, minor = 0, sms = 0;
};

std::string current_device(Device* d) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&d->major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&d->minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&d->sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string("querying the CUDA device: ") + cudaGetErrorString(e);
  }
  return "";
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#ifndef TREEQ_CUDA_ARCHS
#define TREEQ_CUDA_ARCHS ""
#endif

// The wgmma kernel has a body only in an sm_90a image ("90" alone compiles it to a trap).
bool built_with_sm90a() {
  const std::string archs = TREEQ_CUDA_ARCHS;  // "80,90a"
  for (size_t start = 0; start <= archs.size();) {
    size_t end = archs.find(',', start);
    if (end == std::string::npos) end = archs.size();
    // "90a", "90a-real" or "90a-virtual" (CMake's spellings); the PTX of "90a-virtual" JITs to sm_90a too
    if (archs.compare(start, 3, "90a") == 0 && (end - start == 3 || archs[start + 3] == '-')) return true;
    start = end + 1;
  }
  return false;
}

}  // namespace

std::string plan_packed_linear(int64_t m, int64_t n, int64_t k, int bits, int arch, int splits, GemmPlan* plan) {
  if (std::string why = check_runnable(); !why.empty()) return why;
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    return "weight bit-width must be 2, 3, 4 or 8, got " + std::to_string(bits);
  if (m <= 0 || n <= 0 || k <= 0) return "M, N and K must be positive";
  if (k > kMaxK) return "K=" + std::to_string(k) + " exceeds MAX_K=" + std::to_string(kMaxK);
  if (m >= (int64_t{1} << 31) || n >= (int64_t{1} << 31)) return "M and N must be below 2^31";
  Device d;
  if (std::string why = current_device(&d); !why.empty()) return why;
  const bool hopper = d.major == 9 && d.minor == 0;
  if (d.major < 8) return "the packed GEMM needs compute capability 8.0 or newer";
  if (arch == 0) arch = hopper && built_with_sm90a() ? 90 : 80;
  if (arch == 90 && !hopper)
    return "the sm_90a wgmma kernel runs only on compute capability 9.0 (H100/H200); this device is " +
           std::to_string(d.major) + "." + std::to_string(d.minor);
  if (arch == 90 && !built_with_sm90a())
    return std::string("this build has no sm_90a image (CUDA archs \"") + TREEQ_CUDA_ARCHS +
           "\"): rebuild with TREEQ_CUDA_ARCHS containing 90a, or run the mma.sync kernel (arch=80)";
  if (arch != 90 && arch != 80) return "arch must be 0 (auto), 80 or 90, got " + std::to_string(arch);

  const int64_t tiles_c = ceil_div(n, gemm::kTileC), tiles_t = ceil_div(m, gemm::kTileT);
  const int64_t tiles_k = ceil_div(k, gemm::kTileK), tiles = tiles_c * tiles_t;
  if (tiles_t * gemm::kTileT >= (int64_t{1} << 31) || tiles_c * gemm::kTileC >= (int64_t{1} << 31))
    return "M and N rounded up to whole tiles must stay below 2^31 (32-bit token and channel indices)";
  int64_t s;
  if (splits > 0) {
    s = std::min<int64_t>(splits, tiles_k);
  } else if (tiles >= d.sms) {
    s = 1;
  } else {
    // Fill the SMs, but keep ≥ 3 K tiles per split: the fix-up moves a 128 KB partial per extra split.
    s = std::max<int64_t>(1, std::min<int64_t>(tiles_k / 3, d.sms / tiles));
  }
  plan->arch = arch;
  plan->splits = static_cast<int>(s);
  plan->units = tiles * s;
  if (plan->units >= (int64_t{1} << 31) - d.sms) return "too many work units";  // u += grid stays in int
  plan->grid = static_cast<int>(arch == 90 ? std::min<int64_t>(plan->units, d.sms) : plan->units);
  plan->partial_ints = s > 1 ? tiles * s * gemm::kTileC * gemm::kTileT : 0;
  plan->counter_ints = s > 1 ? tiles : 0;
  plan->smem_bytes = arch == 90 ? gemm::sm90_smem_bytes(bits) : gemm::sm80_smem_bytes(bits);
  return "";
}

std::string packed_linear(const GemmArgs& a, std::uintptr_t stream) {
  GemmPlan plan;
  if (std::string why = plan_packed_linear(a.m, a.n, a.k, a.bits, a.arch, a.splits, &plan); !why.empty()) return why;
  if (plan.splits != a.splits) return "splits must come from plan_packed_linear";
  if (a.act == nullptr || a.wfrag == nullptr || a.row_chan == nullptr || a.a_scale == nullptr ||
      a.a_zp == nullptr || a.a_rowsum == nullptr || a.w_scale == nullptr || a.w_uzp == nullptr ||
      a.w_ucs == nullptr || a.out == nullptr)
    return "a required pointer is null";
  if (a.k_act < a.k || a.k_act % 16 != 0 || a.lda < a.k_act || a.lda % 16 != 0)
    return "activation rows must hold k_act ≥ K columns, k_act and the row stride multiples of 16";
  if (reinterpret_cast<std::uintptr_t>(a.act) % 16 != 0 || reinterpret_cast<std::uintptr_t>(a.wfrag) % 16 != 0)
    return "activation codes and packed weights must be 16-byte aligned";
  if (a.out_kind < 0 || a.out_kind > 3) return "out_kind must be 0 (bf16), 1 (fp16), 2 (fp32) or 3 (int32)";
  if (a.out_kind == 3 && (a.z != nullptr || a.bias != nullptr || a.gelu || a.residual != nullptr))
    return "int32 output is the bare corrected accumulator: no branch, bias, GELU or residual";
  const int esize = (a.out_kind == 0 || a.out_kind == 1) ? 2 : 4;
  const auto addr = [](const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr); };
  if (a.gate != nullptr && a.residual == nullptr) return "gate scales the output before the residual add: no residual";
  if (a.gate != nullptr && (a.gate_rows < 1 || a.m % a.gate_rows != 0))
    return "gate_rows (tokens per gate row, M / G) must be ≥ 1 and divide M=" + std::to_string(a.m) + ", got " +
           std::to_string(a.gate_rows);
  if (a.residual != nullptr) {
    const std::uintptr_t res = addr(a.residual), out = addr(a.out), bytes = a.m * a.n * esize;
    // In place is exact (each element is read, then written, by the same thread); a shifted overlap would race.
    if (res != out && res < out + bytes && out < res + bytes)
      return "residual partly overlaps out: pass out itself (in place) or a separate tensor";
    if (res % esize != 0 || addr(a.gate) % 4 != 0) return "residual and gate must be aligned to their element size";
  }
  if (a.z != nullptr) {
    if (a.w2 == nullptr || a.blocks <= 0 || a.nb <= 0 || a.brp <= 0 || a.brp % 16 != 0)
      return "Monarch stage 2 needs w2, blocks, nb > 0 and brp a positive multiple of 16";
    if (static_cast<int64_t>(a.blocks) * a.nb < a.n) return "Monarch w2 does not cover N";
    const int64_t z_rows = ceil_div(a.m, gemm::kTileT) * gemm::kTileT;
    if (z_rows * a.blocks * a.brp >= (int64_t{1} << 31) || int64_t{a.blocks} * a.nb * a.brp >= (int64_t{1} << 31))
      return "Monarch z or w2 too large for 32-bit indexing";
    if (reinterpret_cast<std::uintptr_t>(a.z) % 4 != 0 || reinterpret_cast<std::uintptr_t>(a.w2) % 4 != 0)
      return "z and w2 must be 4-byte aligned";
  }
  if (plan.splits > 1 && (a.partials == nullptr || a.counters == nullptr))
    return "split-K needs the partials and counters workspaces";

  gemm::Params p{};
  p.act = a.act;
  p.lda = a.lda;
  p.a_scale = a.a_scale;
  p.a_zp = a.a_zp;
  p.a_rowsum = a.a_rowsum;
  p.wfrag = a.wfrag;
  p.row_chan = a.row_chan;
  p.w_scale = a.w_scale;
  p.w_uzp = a.w_uzp;
  p.w_ucs = a.w_ucs;
  p.bias = a.bias;
  p.z = a.z;
  p.w2 = a.w2;
  p.blocks = a.blocks;
  p.brp = a.brp;
  p.nb = a.nb;
  p.out = a.out;
  p.out_kind = a.out_kind;
  p.gelu = a.gelu ? 1 : 0;
  p.residual = a.residual;
  p.gate = a.gate;
  p.gate_rows = a.gate != nullptr ? static_cast<int>(a.gate_rows) : 0;
  p.out_vec = (a.n * esize) % 16 == 0 && addr(a.out) % 16 == 0 && addr(a.residual) % 16 == 0 &&
              addr(a.gate) % 16 == 0;
  p.m = static_cast<int>(a.m);
  p.n = static_cast<int>(a.n);
  p.k = static_cast<int>(a.k);
  p.k_act = static_cast<int>(a.k_act);
  p.tiles_c = static_cast<int>(ceil_div(a.n, gemm::kTileC));
  p.tiles_t = static_cast<int>(ceil_div(a.m, gemm::kTileT));
  p.tiles_k = static_cast<int>(ceil_div(a.k, gemm::kTileK));
  p.splits = plan.splits;
  p.units = static_cast<int>(plan.units);
  p.partials = a.partials;
  p.counters = a.counters;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  return plan.arch == 90 ? gemm::launch_sm90(p, a.bits, s, plan.grid) : gemm::launch_sm80(p, a.bits, s);
}

}  // namespace treeq::cuda
