// pybind11 module treeq_engine._C: the CPU reference ops (numpy arrays in, numpy arrays out) and the CUDA
// entry points (raw device pointers and a stream as integers). Shapes and dtypes are checked in Python
// (treeq_engine/core.py) before calling in; the checks here guard against misuse of the raw module.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cpu_ops.h"
#include "cuda_api.h"
#include "treeq/format.h"

namespace py = pybind11;

namespace {

using I8 = py::array_t<int8_t, py::array::c_style>;
using I32 = py::array_t<int32_t, py::array::c_style>;

void require_bits(int bits) {
  if (!treeq::packable_bits(bits))
    throw std::invalid_argument("unsupported bit-width " + std::to_string(bits) + ": expected 2, 3, 4 or 8");
}

void require_2d(const py::array& a, const char* name) {
  if (a.ndim() != 2) throw std::invalid_argument(std::string(name) + " must be 2-D");
}

py::array pack(const I8& codes, int bits) {
  require_bits(bits);
  require_2d(codes, "codes");
  const int64_t rows = codes.shape(0), k = codes.shape(1);
  const int64_t cols = treeq::packed_cols(k, bits);
  py::array out = bits == 8 ? py::array(I8({rows, cols})) : py::array(I32({rows, cols}));
  bool ok;
  {
    py::gil_scoped_release release;
    ok = treeq::cpu::pack(codes.data(), rows, k, bits, out.mutable_data());
  }
  if (!ok) throw std::invalid_argument("codes out of range for " + std::to_string(bits) + "-bit");
  return out;
}

I8 unpack(const py::array& packed, int bits, int64_t k) {
  require_bits(bits);
  require_2d(packed, "packed");
  if (k <= 0) throw std::invalid_argument("k must be positive");
  const bool want_i8 = bits == 8;
  if (want_i8 ? !py::isinstance<I8>(packed) : !py::isinstance<I32>(packed))
    throw std::invalid_argument(std::string("packed must be a C-contiguous ") + (want_i8 ? "int8" : "int32") +
                                " array for " + std::to_string(bits) + "-bit");
  if (packed.shape(1) != treeq::packed_cols(k, bits))
    throw std::invalid_argument("packed has " + std::to_string(packed.shape(1)) + " columns, expected " +
                                std::to_string(treeq::packed_cols(k, bits)) + " for K=" + std::to_string(k));
  const int64_t rows = packed.shape(0);
  I8 out({rows, k});
  {
    py::gil_scoped_release release;
    treeq::cpu::unpack(packed.data(), rows, k, bits, out.mutable_data());
  }
  return out;
}

I32 packed_gemm(const I8& a, const py::array& w, int w_bits, int64_t k) {
  require_bits(w_bits);
  require_2d(a, "a");
  require_2d(w, "w");
  if (a.shape(1) != k) throw std::invalid_argument("a has K=" + std::to_string(a.shape(1)) + ", expected " +
                                                   std::to_string(k));
  const bool want_i8 = w_bits == 8;
  if (want_i8 ? !py::isinstance<I8>(w) : !py::isinstance<I32>(w))
    throw std::invalid_argument(std::string("w must be a C-contiguous ") + (want_i8 ? "int8" : "int32") + " array");
  if (w.shape(1) != treeq::packed_cols(k, w_bits))
    throw std::invalid_argument("w has " + std::to_string(w.shape(1)) + " columns, expected " +
                                std::to_string(treeq::packed_cols(k, w_bits)));
  const int64_t m = a.shape(0), n = w.shape(0);
  I32 acc({m, n});
  {
    py::gil_scoped_release release;
    treeq::cpu::packed_gemm(a.data(), w.data(), m, n, k, w_bits, acc.mutable_data());
  }
  return acc;
}

void raise_if(const std::string& why) {
  if (!why.empty()) throw std::runtime_error(why);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "TreeQ Engine compiled core (torch-free): CPU reference ops and CUDA kernels";
  m.attr("LAYOUT_VERSION") = treeq::kLayoutVersion;
  m.attr("GROUP") = treeq::kGroup;

  m.def("cpu_pack", &pack, py::arg("codes"), py::arg("bits"), "Pack int8 codes (R, K) into layout v1.");
  m.def("cpu_unpack", &unpack, py::arg("packed"), py::arg("bits"), py::arg("k"), "Unpack layout v1 to int8 codes.");
  m.def("cpu_packed_gemm", &packed_gemm, py::arg("a"), py::arg("w"), py::arg("w_bits"), py::arg("k"),
        "int32 acc (M, N) = int8 a (M, K) x packed weight (N, K)^T.");

  m.def("build_info", [] {
    py::dict d;
    d["cxx"] = true;
    d["cuda"] = treeq::cuda::built();
    d["cuda_archs"] = treeq::cuda::archs();
    d["cuda_runtime_version"] = treeq::cuda::runtime_version();
    d["layout_version"] = treeq::kLayoutVersion;
#if defined(__VERSION__)
    d["compiler"] = __VERSION__;
#endif
    return d;
  });
  m.def("cuda_device_count", &treeq::cuda::device_count);
  m.def("cuda_driver_version", &treeq::cuda::driver_version);
  m.def("cuda_device_name", &treeq::cuda::device_name, py::arg("device") = 0);
  m.def("cuda_check_runnable", [] { raise_if(treeq::cuda::check_runnable()); });
  m.def(
      "cuda_packed_gemm_naive",
      [](std::uintptr_t a, std::uintptr_t w, std::uintptr_t acc, int64_t m, int64_t n, int64_t k, int w_bits,
         std::uintptr_t stream) {
        raise_if(treeq::cuda::packed_gemm_naive(reinterpret_cast<const int8_t*>(a), reinterpret_cast<const void*>(w),
                                                reinterpret_cast<int32_t*>(acc), m, n, k, w_bits, stream));
      },
      py::arg("a_ptr"), py::arg("w_ptr"), py::arg("acc_ptr"), py::arg("m"), py::arg("n"), py::arg("k"),
      py::arg("w_bits"), py::arg("stream"));
}
