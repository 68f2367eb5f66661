// CUDA runtime queries and a naive reference packed GEMM.
//
// Math: acc[m, n] = Σ_k a[m, k] · w(n, k), int32, with a int8 (M, K) activation codes and w the layout-v1
// packed weight (see treeq/format.h). One thread per output element, no tiling: this kernel exists to check
// the packed format on the device and to serve as a slow, obviously-correct GPU oracle for the fast kernels.
// Linked against the static CUDA runtime so the module imports on machines without a driver.
#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "cuda_api.h"
#include "treeq/format.h"

#ifndef TREEQ_CUDA_ARCHS
#define TREEQ_CUDA_ARCHS ""
#endif

namespace treeq::cuda {

namespace {

std::string err(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

std::string check_device_pointer(const void* p, const char* name) {
  cudaPointerAttributes attr{};
  cudaError_t e = cudaPointerGetAttributes(&attr, p);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error of the failed query
    return err((std::string("cudaPointerGetAttributes(") + name + ")").c_str(), e);
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    return std::string(name) + " is not a CUDA device pointer (pass CUDA tensors)";
  return "";
}

__global__ void packed_gemm_naive_kernel(const int8_t* __restrict__ a,  // (M, K) int8 codes
                                         const char* __restrict__ w,    // (N, packed_cols) layout v1
                                         int32_t* __restrict__ acc,     // (M, N) int32
                                         int64_t m, int64_t n, int64_t k, int w_bits) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;  // output channel
  const int64_t i = blockIdx.y;                                                   // token
  if (j >= n || i >= m) return;
  const size_t elt = w_bits == 8 ? 1 : 4;
  const void* wrow = w + static_cast<size_t>(j * packed_cols(k, w_bits)) * elt;
  int32_t s = 0;
  for (int64_t kk = 0; kk < k; ++kk) s += static_cast<int32_t>(a[i * k + kk]) * code_at(wrow, kk, w_bits);
  acc[i * n + j] = s;
}

}  // namespace

bool built() { return true; }
std::string archs() { return TREEQ_CUDA_ARCHS; }

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
  cudaGetLastError();
  return v;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;  // no driver / no device: report 0, not an error
  cudaGetLastError();
  return n;
}

std::string device_name(int device) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  return prop.name;
}

std::string check_runnable() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return err("no CUDA device available (cudaGetDeviceCount)", e);
  }
  if (n == 0) return "no CUDA device available";
  return "";
}

std::string packed_gemm_naive(const int8_t* a, const void* w, int32_t* acc, int64_t m, int64_t n, int64_t k,
                              int w_bits, std::uintptr_t stream) {
  if (std::string why = check_runnable(); !why.empty()) return why;
  if (!packable_bits(w_bits)) return "unsupported weight bit-width " + std::to_string(w_bits);
  if (m <= 0 || n <= 0 || k <= 0) return "M, N and K must be positive";
  if (m > 65535) return "packed_gemm_naive supports at most 65535 tokens per call";
  for (auto [p, name] : {std::pair<const void*, const char*>{a, "a"}, {w, "w"}, {acc, "acc"}})
    if (std::string why = check_device_pointer(p, name); !why.empty()) return why;
  const dim3 block(128), grid(static_cast<unsigned>((n + 127) / 128), static_cast<unsigned>(m));
  packed_gemm_naive_kernel<<<grid, block, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      a, static_cast<const char*>(w), acc, m, n, k, w_bits);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : err("packed_gemm_naive launch", e);
}

}  // namespace treeq::cuda
