// CPU reference ops of the compiled core: pack, unpack and the exact integer GEMM.
// Plain loops over raw pointers; the Python side checks shapes and dtypes before calling in.
#pragma once

#include <cstdint>

namespace treeq::cpu {

// codes: int8 (rows, k) row-major, each in the bits grid. out: packed_cols(k, bits) elements per row
// (int8 for 8-bit, int32 words otherwise). Returns false if a code is outside the grid.
bool pack(const int8_t* codes, int64_t rows, int64_t k, int bits, void* out);

// Inverse of pack: out int8 (rows, k).
void unpack(const void* packed, int64_t rows, int64_t k, int bits, int8_t* out);

// acc[m, n] = sum_k a[m, k] * w_code(n, k), int32 (m, n). a: int8 (m, k) codes;
// w: packed rows of the weight (n, k) at w_bits (8 = plain int8 codes).
void packed_gemm(const int8_t* a, const void* w, int64_t m, int64_t n, int64_t k, int w_bits, int32_t* acc);

}  // namespace treeq::cpu
