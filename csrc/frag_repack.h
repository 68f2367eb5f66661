// CPU conversion between packed layout v1 and the CUDA GEMMs' fragment layout v1 (treeq/frag.h).
// Plain loops over raw pointers; treeq_engine/kernels/cuda_layout.py checks shapes and dtypes first.
#pragma once

#include <cstdint>

namespace treeq::frag {

// The original channel of every tile row: channel_tiles(n)·kTileN entries, -1 for padding rows. Rows are in
// channel order (a Monarch branch's output blocks are contiguous, branches/monarch.py); the kernels read the
// map rather than assume it, so a layout that reorders rows within a tile needs no kernel change.
void tile_row_channels(int64_t n, int32_t* row_chan);

// packed: layout-v1 rows (n, packed_cols(k, bits)) (int8 for 8-bit, int32 words otherwise).
// out: total_words(n, k, bits) words.
void repack(const void* packed, int64_t n, int64_t k, int bits, const int32_t* row_chan, uint32_t* out);

// Inverse of repack: codes int8 (n, k). Returns false if a padding field (row -1 or k ≥ K) is not code 0.
bool unrepack(const uint32_t* words, int64_t n, int64_t k, int bits, const int32_t* row_chan, int8_t* codes);

// The A registers the kernels build, by the kernels' own unpack code: out (ct, kt, 16 blocks, 32 lanes,
// 4 k-steps, 4 registers) uint32.
void registers(const uint32_t* words, int64_t n, int64_t k, int bits, uint32_t* out);

}  // namespace treeq::frag
