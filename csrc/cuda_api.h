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

}  // namespace treeq::cuda
