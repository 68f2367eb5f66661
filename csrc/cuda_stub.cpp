// The CUDA API in a build without CUDA (TREEQ_CUDA=0 or no nvcc): every entry point reports why it cannot run.
#include "cuda_api.h"

namespace treeq::cuda {

static const char* kNotBuilt = "treeq_engine._C was built without CUDA (nvcc absent or TREEQ_CUDA=0); "
                               "rebuild with TREEQ_CUDA=1 on a machine with the CUDA toolkit";

bool built() { return false; }
std::string archs() { return ""; }
int runtime_version() { return 0; }
int driver_version() { return 0; }
int device_count() { return 0; }
std::string device_name(int) { return ""; }
std::string check_runnable() { return kNotBuilt; }
std::string packed_gemm_naive(const int8_t*, const void*, int32_t*, int64_t, int64_t, int64_t, int,
                              std::uintptr_t) {
  return kNotBuilt;
}
std::string quantize_activation(const ActQuantArgs&, std::uintptr_t) { return kNotBuilt; }
std::string plan_packed_linear(int64_t, int64_t, int64_t, int, int, int, GemmPlan*) { return kNotBuilt; }
std::string packed_linear(const GemmArgs&, std::uintptr_t) { return kNotBuilt; }

}  // namespace treeq::cuda
