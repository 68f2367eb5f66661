// Host-side entry points of the packed GEMM kernels (one per architecture family), called by cuda_ops.cu.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "gemm_common.cuh"

namespace treeq::gemm {

// cudaFuncSetAttribute acts on the current device only: set the dynamic shared-memory limit once per (kernel,
// device), and retry after a failure rather than remembering it.
inline cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  std::lock_guard<std::mutex> lock(mu);
  if (done.count({kernel, dev}) != 0) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess) done.insert({kernel, dev});
  return e;
}

// sm_90a: persistent warp-specialised wgmma kernel; `grid` CTAs (≤ SMs) walk p.units work units.
std::string launch_sm90(const Params& p, int bits, cudaStream_t stream, int grid);
int sm90_smem_bytes(int bits);

// sm_80+: mma.sync kernel with a cp.async pipeline, one CTA per work unit.
std::string launch_sm80(const Params& p, int bits, cudaStream_t stream);
int sm80_smem_bytes(int bits);

}  // namespace treeq::gemm
