// TreeQ packed format, layout v1 — the C++/CUDA mirror of treeq_engine/format/packing.py.
//
// Codes are signed integers q in [qmin, qmax] = [-2^(b-1), 2^(b-1)-1]; a field is q in offset binary,
// u = q + 2^(b-1). Rows of K codes are packed independently:
//   8-bit      int8 (R, K), unpadded.
//   2/4-bit    K padded to a multiple of 32 with code 0; each group of 32 codes -> b int32 words;
//              word w holds codes [w*32/b, (w+1)*32/b), code w*32/b + j in bits [b*j, b*j+b).
//   3-bit      per group: words 0,1 = low two bits of codes 0..15 / 16..31 (as 2-bit);
//              word 2 = high bit of code j in bit j.
// Torch-free and usable from host and device code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TREEQ_HD __host__ __device__ __forceinline__
#else
#define TREEQ_HD inline
#endif

namespace treeq {

constexpr int kLayoutVersion = 1;
constexpr int kGroup = 32;  // codes per packing group

TREEQ_HD bool packable_bits(int bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

TREEQ_HD int64_t padded_k(int64_t k, int bits) { return bits == 8 ? k : (k + kGroup - 1) / kGroup * kGroup; }

// Number of storage elements per row: int8 codes for 8-bit, int32 words otherwise.
TREEQ_HD int64_t packed_cols(int64_t k, int bits) { return bits == 8 ? k : padded_k(k, bits) / kGroup * bits; }

// Field (offset-binary) of code k of one packed row of int32 words (2/3/4-bit only).
TREEQ_HD uint32_t field_at(const int32_t* row_words, int64_t k, int bits) {
  const int64_t g = k / kGroup;
  const int j = static_cast<int>(k % kGroup);
  const uint32_t* w = reinterpret_cast<const uint32_t*>(row_words) + g * bits;
  if (bits == 3) {
    const uint32_t low = (w[j >> 4] >> (2 * (j & 15))) & 3u;
    const uint32_t high = (w[2] >> j) & 1u;
    return low | (high << 2);
  }
  const int per = 32 / bits;
  return (w[j / per] >> (bits * (j % per))) & ((1u << bits) - 1u);
}

// Signed code k of one packed row (any bit-width).
TREEQ_HD int8_t code_at(const void* row, int64_t k, int bits) {
  if (bits == 8) return static_cast<const int8_t*>(row)[k];
  const int32_t* words = static_cast<const int32_t*>(row);
  return static_cast<int8_t>(static_cast<int32_t>(field_at(words, k, bits)) - (1 << (bits - 1)));
}

}  // namespace treeq
