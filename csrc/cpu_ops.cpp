// CPU reference ops: see cpu_ops.h. Bit-exact with treeq_engine/format (layout v1, int32 accumulation).
#include "cpu_ops.h"

#include <cstring>
#include <vector>

#include "treeq/format.h"

namespace treeq::cpu {

bool pack(const int8_t* codes, int64_t rows, int64_t k, int bits, void* out) {
  const int qmin = -(1 << (bits - 1)), qmax = (1 << (bits - 1)) - 1;
  for (int64_t i = 0; i < rows * k; ++i)
    if (codes[i] < qmin || codes[i] > qmax) return false;
  if (bits == 8) {
    std::memcpy(out, codes, static_cast<size_t>(rows * k));
    return true;
  }
  const int64_t kp = padded_k(k, bits), cols = packed_cols(k, bits);
  const uint32_t pad_field = 1u << (bits - 1);  // code 0
  uint32_t* words = static_cast<uint32_t*>(out);
  std::memset(words, 0, static_cast<size_t>(rows * cols) * sizeof(uint32_t));
  for (int64_t r = 0; r < rows; ++r) {
    uint32_t* rw = words + r * cols;
    for (int64_t kk = 0; kk < kp; ++kk) {
      const uint32_t u = kk < k ? static_cast<uint32_t>(codes[r * k + kk] + (1 << (bits - 1))) : pad_field;
      uint32_t* g = rw + (kk / kGroup) * bits;
      const int j = static_cast<int>(kk % kGroup);
      if (bits == 3) {
        g[j >> 4] |= (u & 3u) << (2 * (j & 15));
        g[2] |= ((u >> 2) & 1u) << j;
      } else {
        const int per = 32 / bits;
        g[j / per] |= u << (bits * (j % per));
      }
    }
  }
  return true;
}

void unpack(const void* packed, int64_t rows, int64_t k, int bits, int8_t* out) {
  const int64_t cols = packed_cols(k, bits);
  const size_t elt = bits == 8 ? 1 : 4;
  const char* base = static_cast<const char*>(packed);
  for (int64_t r = 0; r < rows; ++r) {
    const void* row = base + static_cast<size_t>(r * cols) * elt;
    for (int64_t kk = 0; kk < k; ++kk) out[r * k + kk] = code_at(row, kk, bits);
  }
}

void packed_gemm(const int8_t* a, const void* w, int64_t m, int64_t n, int64_t k, int w_bits, int32_t* acc) {
  // Unpack one weight row at a time, then a plain dot per token: the reference favours obviousness.
  const int64_t cols = packed_cols(k, w_bits);
  const size_t elt = w_bits == 8 ? 1 : 4;
  const char* base = static_cast<const char*>(w);
  std::vector<int8_t> wrow(static_cast<size_t>(k));
  for (int64_t j = 0; j < n; ++j) {
    unpack(base + static_cast<size_t>(j * cols) * elt, 1, k, w_bits, wrow.data());
    for (int64_t i = 0; i < m; ++i) {
      const int8_t* ar = a + i * k;
      int32_t s = 0;
      for (int64_t kk = 0; kk < k; ++kk) s += static_cast<int32_t>(ar[kk]) * static_cast<int32_t>(wrow[kk]);
      acc[i * n + j] = s;
    }
  }
}

}  // namespace treeq::cpu
