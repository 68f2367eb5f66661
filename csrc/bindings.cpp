// pybind11 module treeq_engine._C: the CPU reference ops (numpy arrays in, numpy arrays out) and the CUDA
// entry points (raw device pointers and a stream as integers). Shapes and dtypes are checked in Python
// (treeq_engine/core.py) before calling in; the checks here guard against misuse of the raw module.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_ops.h"
#include "cuda_api.h"
#include "frag_repack.h"
#include "treeq/format.h"
#include "treeq/frag.h"

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

// Channel and reduction sizes the kernels index with int32 (and whose word counts must not wrap in int64).
constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;
// The int32 accumulator with its zero-point correction is exact while K·255² < 2³¹ (format/gemm_ref.py MAX_K).
constexpr int64_t kMaxK = (int64_t{1} << 31) / (255 * 255);

void require_dims(int64_t n, int64_t k) {
  if (n <= 0 || k <= 0) throw std::invalid_argument("N and K must be positive");
  if (n > kMaxDim || k > kMaxDim)
    throw std::invalid_argument("N and K must fit int32, got N=" + std::to_string(n) + ", K=" + std::to_string(k));
}

I32 packed_gemm(const I8& a, const py::array& w, int w_bits, int64_t k) {
  require_bits(w_bits);
  require_2d(a, "a");
  require_2d(w, "w");
  if (k > kMaxK)   // signed int32 overflow otherwise: undefined behaviour, not just a wrong number
    throw std::invalid_argument("K=" + std::to_string(k) + " exceeds MAX_K=" + std::to_string(kMaxK) +
                                ", where int32 accumulation could overflow");
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

// ---- fragment layout v1 (CUDA GEMM weights), CPU side ----

// row_chan maps each tile row to its channel: every channel of [0, N) exactly once, -1 for the padding rows. The
// repacking loops index the codes by these values, so anything else would read or write outside the arrays (and
// a channel named by no row would leave its codes unwritten).
void require_row_chan(const I32& row_chan, int64_t n) {
  if (row_chan.ndim() != 1 || row_chan.shape(0) != treeq::frag::channel_tiles(n) * treeq::frag::kTileN)
    throw std::invalid_argument("row_chan must be 1-D with channel_tiles(N)·256 entries");
  std::vector<char> seen(static_cast<size_t>(n), 0);
  const int32_t* rc = row_chan.data();
  for (int64_t r = 0; r < row_chan.shape(0); ++r) {
    const int32_t c = rc[r];
    if (c == -1) continue;
    if (c < 0 || c >= n || seen[static_cast<size_t>(c)])
      throw std::invalid_argument("row_chan[" + std::to_string(r) + "] = " + std::to_string(c) +
                                  ": every channel of [0, N=" + std::to_string(n) +
                                  ") must appear exactly once (-1 for padding rows)");
    seen[static_cast<size_t>(c)] = 1;
  }
  if (std::find(seen.begin(), seen.end(), 0) != seen.end())
    throw std::invalid_argument("row_chan leaves channels of [0, N=" + std::to_string(n) + ") unnamed");
}

I32 frag_tile_rows(int64_t n) {
  require_dims(n, 1);
  I32 out({treeq::frag::channel_tiles(n) * treeq::frag::kTileN});
  treeq::frag::tile_row_channels(n, out.mutable_data());
  return out;
}

I32 frag_repack(const py::array& packed, int bits, int64_t n, int64_t k, const I32& row_chan) {
  require_bits(bits);
  require_2d(packed, "packed");
  require_dims(n, k);
  if (packed.shape(0) != n || packed.shape(1) != treeq::packed_cols(k, bits))
    throw std::invalid_argument("packed must be layout v1 of shape (N, packed_cols(K, bits))");
  const bool want_i8 = bits == 8;
  if (want_i8 ? !py::isinstance<I8>(packed) : !py::isinstance<I32>(packed))
    throw std::invalid_argument(std::string("packed must be a C-contiguous ") + (want_i8 ? "int8" : "int32") + " array");
  require_row_chan(row_chan, n);
  I32 out({treeq::frag::total_words(n, k, bits)});
  {
    py::gil_scoped_release release;
    treeq::frag::repack(packed.data(), n, k, bits, row_chan.data(), reinterpret_cast<uint32_t*>(out.mutable_data()));
  }
  return out;
}

py::tuple frag_unrepack(const I32& words, const I32& row_chan, int bits, int64_t n, int64_t k) {
  require_bits(bits);
  require_dims(n, k);
  if (words.ndim() != 1 || words.shape(0) != treeq::frag::total_words(n, k, bits))
    throw std::invalid_argument("words must be 1-D with total_words(N, K, bits) entries");
  require_row_chan(row_chan, n);
  I8 codes({n, k});
  std::fill_n(codes.mutable_data(), n * k, int8_t{0});   // (every code is written; zeros if one were not)
  bool ok;
  {
    py::gil_scoped_release release;
    ok = treeq::frag::unrepack(reinterpret_cast<const uint32_t*>(words.data()), n, k, bits, row_chan.data(),
                               codes.mutable_data());
  }
  return py::make_tuple(codes, ok);
}

I32 frag_registers(const I32& words, int bits, int64_t n, int64_t k) {
  require_bits(bits);
  require_dims(n, k);
  if (words.ndim() != 1 || words.shape(0) != treeq::frag::total_words(n, k, bits))
    throw std::invalid_argument("words must be 1-D with total_words(N, K, bits) entries");
  using namespace treeq::frag;
  I32 out({channel_tiles(n), k_tiles(k), int64_t{kBlocks}, int64_t{kLanes}, int64_t{kKSteps}, int64_t{4}});
  {
    py::gil_scoped_release release;
    registers(reinterpret_cast<const uint32_t*>(words.data()), n, k, bits,
              reinterpret_cast<uint32_t*>(out.mutable_data()));
  }
  return out;
}

template <class T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
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

  m.attr("FRAG_VERSION") = treeq::frag::kVersion;
  m.attr("FRAG_TILE_N") = treeq::frag::kTileN;
  m.attr("FRAG_TILE_K") = treeq::frag::kTileK;
  m.def("frag_tile_rows", &frag_tile_rows, py::arg("n"),
        "The original channel of each row of the 256-channel tiles (-1 = padding).");
  m.def("frag_repack", &frag_repack, py::arg("packed"), py::arg("bits"), py::arg("n"), py::arg("k"),
        py::arg("row_chan"), "Layout v1 -> fragment layout v1 (CUDA GEMM weights), int32 words.");
  m.def("frag_unrepack", &frag_unrepack, py::arg("words"), py::arg("row_chan"), py::arg("bits"), py::arg("n"),
        py::arg("k"), "Fragment layout v1 -> (int8 codes (N, K), padding is code 0).");
  m.def("frag_registers", &frag_registers, py::arg("words"), py::arg("bits"), py::arg("n"), py::arg("k"),
        "The A registers the kernels unpack, (ct, kt, 16, 32, 4 k-steps, 4 registers), by the kernels' code.");

  m.def("build_info", [] {
    py::dict d;
    d["cxx"] = true;
    d["cuda"] = treeq::cuda::built();
    d["cuda_archs"] = treeq::cuda::archs();
    d["cuda_runtime_version"] = treeq::cuda::runtime_version();
    d["layout_version"] = treeq::kLayoutVersion;
#if defined(TREEQ_SOURCE_DIGEST)
    d["source_digest"] = TREEQ_SOURCE_DIGEST;  // csrc/ as built (CMakeLists.txt; core.source_digest)
#endif
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

  m.def(
      "cuda_quantize_activation",
      [](std::uintptr_t x, int x_dtype, int64_t m, int64_t k, int norm, float ln_eps, std::uintptr_t shift,
         std::uintptr_t mod_scale, int64_t groups, int bits, bool symmetric, float clip, std::uintptr_t w1,
         int blocks, int rank, int kb, int brp, std::uintptr_t codes, std::uintptr_t scale, std::uintptr_t zp,
         std::uintptr_t row_sum, std::uintptr_t z, int64_t z_rows, std::uintptr_t stream) {
        treeq::cuda::ActQuantArgs a;
        a.x = ptr<const void>(x);
        a.x_dtype = x_dtype;
        a.m = m;
        a.k = k;
        a.norm = norm;
        a.ln_eps = ln_eps;
        a.shift = ptr<const float>(shift);
        a.mod_scale = ptr<const float>(mod_scale);
        a.groups = groups;
        a.bits = bits;
        a.symmetric = symmetric;
        a.clip = clip;
        a.w1 = ptr<const uint16_t>(w1);
        a.blocks = blocks;
        a.rank = rank;
        a.kb = kb;
        a.brp = brp;
        a.codes = ptr<int8_t>(codes);
        a.scale = ptr<float>(scale);
        a.zp = ptr<int32_t>(zp);
        a.row_sum = ptr<int32_t>(row_sum);
        a.z = ptr<uint16_t>(z);
        a.z_rows = z_rows;
        raise_if(treeq::cuda::quantize_activation(a, stream));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("m"), py::arg("k"), py::arg("norm"), py::arg("ln_eps"),
      py::arg("shift"), py::arg("mod_scale"), py::arg("groups"), py::arg("bits"), py::arg("symmetric"),
      py::arg("clip"), py::arg("w1"), py::arg("blocks"), py::arg("rank"), py::arg("kb"), py::arg("brp"),
      py::arg("codes"), py::arg("scale"), py::arg("zp"), py::arg("row_sum"), py::arg("z"), py::arg("z_rows"),
      py::arg("stream"), "Activation quantization (device pointers as integers; 0 = absent).");

  m.def(
      "cuda_plan_packed_linear",
      [](int64_t m, int64_t n, int64_t k, int bits, int arch, int splits) {
        treeq::cuda::GemmPlan plan;
        raise_if(treeq::cuda::plan_packed_linear(m, n, k, bits, arch, splits, &plan));
        py::dict d;
        d["arch"] = plan.arch;
        d["splits"] = plan.splits;
        d["units"] = plan.units;
        d["grid"] = plan.grid;
        d["partial_ints"] = plan.partial_ints;
        d["counter_ints"] = plan.counter_ints;
        d["smem_bytes"] = plan.smem_bytes;
        return d;
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("bits"), py::arg("arch") = 0, py::arg("splits") = 0,
      "Kernel, split-K and workspace sizes for a packed_linear call on the current device.");

  m.def(
      "cuda_packed_linear",
      [](std::uintptr_t act, int64_t lda, int64_t k_act, std::uintptr_t a_scale, std::uintptr_t a_zp,
         std::uintptr_t a_rowsum, std::uintptr_t wfrag, std::uintptr_t row_chan, int bits, std::uintptr_t w_scale,
         std::uintptr_t w_uzp, std::uintptr_t w_ucs, std::uintptr_t bias, std::uintptr_t z, std::uintptr_t w2,
         int blocks, int brp, int nb, std::uintptr_t out, int out_kind, bool gelu, int64_t m, int64_t n, int64_t k,
         int arch, int splits, std::uintptr_t partials, std::uintptr_t counters, std::uintptr_t stream,
         std::uintptr_t residual, std::uintptr_t gate, int64_t gate_rows) {
        treeq::cuda::GemmArgs a;
        a.act = ptr<const int8_t>(act);
        a.lda = lda;
        a.k_act = k_act;
        a.a_scale = ptr<const float>(a_scale);
        a.a_zp = ptr<const int32_t>(a_zp);
        a.a_rowsum = ptr<const int32_t>(a_rowsum);
        a.wfrag = ptr<const uint32_t>(wfrag);
        a.row_chan = ptr<const int32_t>(row_chan);
        a.bits = bits;
        a.w_scale = ptr<const float>(w_scale);
        a.w_uzp = ptr<const int32_t>(w_uzp);
        a.w_ucs = ptr<const int32_t>(w_ucs);
        a.bias = ptr<const float>(bias);
        a.z = ptr<const uint16_t>(z);
        a.w2 = ptr<const uint16_t>(w2);
        a.blocks = blocks;
        a.brp = brp;
        a.nb = nb;
        a.out = ptr<void>(out);
        a.out_kind = out_kind;
        a.gelu = gelu;
        a.m = m;
        a.n = n;
        a.k = k;
        a.arch = arch;
        a.splits = splits;
        a.partials = ptr<int32_t>(partials);
        a.counters = ptr<int32_t>(counters);
        a.residual = ptr<const void>(residual);
        a.gate = ptr<const float>(gate);
        a.gate_rows = gate_rows;
        raise_if(treeq::cuda::packed_linear(a, stream));
      },
      py::arg("act"), py::arg("lda"), py::arg("k_act"), py::arg("a_scale"), py::arg("a_zp"), py::arg("a_rowsum"),
      py::arg("wfrag"), py::arg("row_chan"), py::arg("bits"), py::arg("w_scale"), py::arg("w_uzp"),
      py::arg("w_ucs"), py::arg("bias"), py::arg("z"), py::arg("w2"), py::arg("blocks"), py::arg("brp"),
      py::arg("nb"), py::arg("out"), py::arg("out_kind"), py::arg("gelu"), py::arg("m"), py::arg("n"),
      py::arg("k"), py::arg("arch"), py::arg("splits"), py::arg("partials"), py::arg("counters"),
      py::arg("stream"), py::arg("residual") = 0, py::arg("gate") = 0, py::arg("gate_rows") = 0,
      "Packed GEMM with the fused epilogue (device pointers as integers; 0 = absent); residual (M, N) of the output\n"
      "type and gate fp32 (M / gate_rows, N) fuse out = residual + gate * y.");
}
