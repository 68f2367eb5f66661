// Host-side entry points of the packed GEMM kernels (one per architecture family), called by cuda_ops.cu.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "gemm_common.cuh"

namespace treeq::gemm {

// sm_90a: persistent warp-specialised wgmma kernel; `grid` CTAs (≤ SMs) walk p.units work units.
std::string launch_sm90(const Params& p, int bits, cudaStream_t stream, int grid);
int sm90_smem_bytes(int bits);

// sm_80+: mma.sync kernel with a cp.async pipeline, one CTA per work unit.
std::string launch_sm80(const Params& p, int bits, cudaStream_t stream);
int sm80_smem_bytes(int bits);

}  // namespace treeq::gemm
