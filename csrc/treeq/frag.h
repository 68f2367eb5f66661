// TreeQ fragment layout v1: the packed-weight arrangement the CUDA GEMMs read, derived offline from layout v1
// (treeq/format.h). Host and device code share every function here, so the CPU repack, its tests and the
// kernels' in-register unpacking cannot drift apart.
//
// The GEMM computes acc[m, n] = Σ_k qa[m, k] · qw[n, k] with the WEIGHT as the MMA's A operand (M side = output
// channels n) and the activation codes as B (N side = tokens m). A is held in registers, 16 channels × 32 k per
// warp and MMA k-step, in the fragment layout that `mma.sync.m16n8k32 .s8/.u8` and each warp of a
// `wgmma.mma_async.m64nNk32 .s8/.u8` warpgroup share (PTX ISA "Matrix Fragments for mma.m16n8k32";
// CUTLASS SM90 GMMA ALayout_64x32). For lane l (g = l >> 2, t = l & 3), register r ∈ 0..3, byte p ∈ 0..3:
//
//     row = g + 8·(r & 1)                  (within the 16-row block)
//     k   = 4·t + p + 16·(r >> 1)          (within the 32-wide k-step)
//
// Tiles. Channels are cut into tiles of kTileN = 256 rows, K into tiles of kTileK = 128 (one 128-byte TMA
// swizzle row of int8 activations = 4 k-steps). A tile holds 16 row blocks (m16) × 32 lanes; each (m16, lane)
// "thread slot" owns 64 codes per tile (4 k-steps × 4 registers × 4 bytes), stored as W = 2·bits words:
//
//   8-bit  W = 16  word 4s + r = register r of k-step s, byte p = the int8 code (two's complement).
//   4-bit  W = 8   word 2s + h holds registers 2h and 2h+1 interleaved by nibble: register 2h byte p in bits
//                  [8p, 8p+4), register 2h+1 byte p in bits [8p+4, 8p+8). Unpack: w & 0x0F0F0F0F, (w >> 4) & ...
//   2-bit  W = 4   word s: register r byte p in bits [8p + 2r, 8p + 2r + 2). Unpack: (w >> 2r) & 0x03030303.
//   3-bit  W = 6   words 0..3 = the low two bits, exactly as 2-bit; words 4, 5 = the high bit for k-step pairs
//                  (0,1), (2,3): k-step s, register r, byte p at bit 8p + 4·(s & 1) + r.
//
// Sub-8-bit fields are offset binary, u = q + 2^(bits-1) ∈ [0, 2^bits): the kernels multiply them as .u8 and
// fold the offset into the zero point (uzp = zp + 2^(bits-1), Σ_k u = col_sum + 2^(bits-1)·K), so unpacking is
// one shift and one AND per register. 8-bit codes stay signed (.s8).
//
// Word order inside a tile, chosen so a warp's shared-memory loads are 16-byte (8-byte for 3-bit), consecutive
// across lanes and free of bank conflicts: [m16][chunk][lane][CW words], with CW = 4 words per chunk (2 for
// 3-bit) and W / CW chunks. Tiles are stored [channel tile][k tile], so the weights of one channel tile across K
// are contiguous and one tile is one bulk copy (4096·bits bytes). Padding (channels ≥ N, k ≥ K) is code 0.
//
// Row order inside a channel tile: the channels themselves, in order. Tile ct covers the original channels
// [256·ct, 256·ct + 256) ∩ [0, N), and since the Monarch branch's output blocks are contiguous (block j holds
// channels j·Nb … j·Nb + Nb − 1) the rows of one block are already adjacent: the epilogue adds the branch with a
// masked `mma.m16n8k16` pass per overlapped block, and the tile's stores stay coalesced.
// `row_chan[256·ct + row]` names the original channel of each row (-1 for padding rows), the map the kernels read.
#pragma once

#include <cstdint>

#include "format.h"

namespace treeq::frag {

constexpr int kVersion = 1;
constexpr int kTileN = 256;              // output channels per tile (MMA M side)
constexpr int kTileK = 128;              // K per tile
constexpr int kBlocks = kTileN / 16;     // m16 row blocks per tile
constexpr int kLanes = 32;
constexpr int kKSteps = kTileK / 32;     // MMA k-steps per tile

TREEQ_HD constexpr int words_per_slot(int bits) { return 2 * bits; }
TREEQ_HD constexpr int chunk_words(int bits) { return (2 * bits) % 4 == 0 ? 4 : 2; }
TREEQ_HD constexpr int num_chunks(int bits) { return words_per_slot(bits) / chunk_words(bits); }
TREEQ_HD constexpr int tile_words(int bits) { return kBlocks * kLanes * words_per_slot(bits); }  // 1024·bits
TREEQ_HD constexpr int tile_bytes(int bits) { return 4 * tile_words(bits); }

TREEQ_HD int64_t channel_tiles(int64_t n) { return (n + kTileN - 1) / kTileN; }
TREEQ_HD int64_t k_tiles(int64_t k) { return (k + kTileK - 1) / kTileK; }
TREEQ_HD int64_t total_words(int64_t n, int64_t k, int bits) { return channel_tiles(n) * k_tiles(k) * tile_words(bits); }

// Index, within a tile, of word w (0 ≤ w < 2·bits) of the slot (m16 block, lane).
TREEQ_HD int word_index(int bits, int m16, int lane, int w) {
  const int cw = chunk_words(bits);
  return ((m16 * num_chunks(bits) + w / cw) * kLanes + lane) * cw + w % cw;
}

// Tile-local (row, k) of byte p of register r of k-step s in slot (m16, lane): the PTX A-fragment table.
TREEQ_HD void element_coords(int m16, int lane, int s, int r, int p, int* row, int* k) {
  *row = 16 * m16 + (lane >> 2) + 8 * (r & 1);
  *k = 32 * s + 4 * (lane & 3) + p + 16 * (r >> 1);
}

// Where the field of (k-step s, register r, byte p) lives among a slot's words: the low `min(bits, 2 or 4 or 8)`
// bits at (word *w, bit *bit); for 3-bit also the high bit at (*w_hi, *bit_hi) (else *w_hi = -1).
TREEQ_HD void field_location(int bits, int s, int r, int p, int* w, int* bit, int* w_hi, int* bit_hi) {
  *w_hi = -1;
  *bit_hi = 0;
  switch (bits) {
    case 8: *w = 4 * s + r; *bit = 8 * p; break;
    case 4: *w = 2 * s + (r >> 1); *bit = 8 * p + 4 * (r & 1); break;
    case 2: *w = s; *bit = 8 * p + 2 * r; break;
    default:  // 3
      *w = s; *bit = 8 * p + 2 * r;
      *w_hi = 4 + (s >> 1); *bit_hi = 8 * p + 4 * (s & 1) + r;
  }
}

// The four A registers of k-step S from a slot's words. Byte p of register r is the field of element
// (row, k) above: the int8 code for 8-bit, the offset-binary u otherwise.
template <int BITS, int S>
TREEQ_HD void unpack(const uint32_t* words, uint32_t (&reg)[4]) {
  static_assert(BITS == 2 || BITS == 3 || BITS == 4 || BITS == 8, "bits");
  static_assert(S >= 0 && S < kKSteps, "k-step");
  if constexpr (BITS == 8) {
    for (int r = 0; r < 4; ++r) reg[r] = words[4 * S + r];
  } else if constexpr (BITS == 4) {
    const uint32_t w0 = words[2 * S], w1 = words[2 * S + 1];
    reg[0] = w0 & 0x0F0F0F0Fu;
    reg[1] = (w0 >> 4) & 0x0F0F0F0Fu;
    reg[2] = w1 & 0x0F0F0F0Fu;
    reg[3] = (w1 >> 4) & 0x0F0F0F0Fu;
  } else if constexpr (BITS == 2) {
    const uint32_t w = words[S];
    for (int r = 0; r < 4; ++r) reg[r] = (w >> (2 * r)) & 0x03030303u;
  } else {
    const uint32_t lo = words[S];
    const uint32_t hi = words[4 + (S >> 1)] >> (4 * (S & 1));
    for (int r = 0; r < 4; ++r) reg[r] = ((lo >> (2 * r)) & 0x03030303u) | (((hi >> r) & 0x01010101u) << 2);
  }
}

// Runtime-s form for host code and tests.
template <int BITS>
TREEQ_HD void unpack_rt(const uint32_t* words, int s, uint32_t (&reg)[4]) {
  switch (s) {
    case 0: unpack<BITS, 0>(words, reg); break;
    case 1: unpack<BITS, 1>(words, reg); break;
    case 2: unpack<BITS, 2>(words, reg); break;
    default: unpack<BITS, 3>(words, reg);
  }
}

// Field stored for a signed code q: the code's byte for 8-bit, q + 2^(bits-1) below.
TREEQ_HD uint32_t field_of(int8_t q, int bits) {
  return bits == 8 ? static_cast<uint32_t>(static_cast<uint8_t>(q)) : static_cast<uint32_t>(q + (1 << (bits - 1)));
}

// Offset the kernels subtract from sub-8-bit fields (0 for 8-bit): u = q + offset.
TREEQ_HD int field_offset(int bits) { return bits == 8 ? 0 : 1 << (bits - 1); }

}  // namespace treeq::frag
