// CPU conversion between layout v1 and fragment layout v1: see frag_repack.h and treeq/frag.h.
#include "frag_repack.h"

#include <algorithm>
#include <cstring>

#include "treeq/frag.h"

namespace treeq::frag {

namespace {

// Calls f(tile_word_base, m16, lane, s, r, p, row_in_tile_offset, k_abs, ct) for every register byte.
template <class F>
void for_each_element(int64_t n, int64_t k, int bits, F&& f) {
  const int64_t nct = channel_tiles(n), nkt = k_tiles(k);
  for (int64_t ct = 0; ct < nct; ++ct)
    for (int64_t kt = 0; kt < nkt; ++kt) {
      const int64_t base = (ct * nkt + kt) * tile_words(bits);
      for (int m16 = 0; m16 < kBlocks; ++m16)
        for (int lane = 0; lane < kLanes; ++lane)
          for (int s = 0; s < kKSteps; ++s)
            for (int r = 0; r < 4; ++r)
              for (int p = 0; p < 4; ++p) {
                int row, kk;
                element_coords(m16, lane, s, r, p, &row, &kk);
                f(base, m16, lane, s, r, p, ct * kTileN + row, kt * kTileK + kk);
              }
    }
}

}  // namespace

void tile_row_channels(int64_t n, int32_t* row_chan) {
  const int64_t rows = channel_tiles(n) * kTileN;
  for (int64_t r = 0; r < rows; ++r) row_chan[r] = r < n ? static_cast<int32_t>(r) : -1;
}

void repack(const void* packed, int64_t n, int64_t k, int bits, const int32_t* row_chan, uint32_t* out) {
  std::memset(out, 0, static_cast<size_t>(total_words(n, k, bits)) * sizeof(uint32_t));
  const int64_t cols = packed_cols(k, bits);
  const size_t elt = bits == 8 ? 1 : 4;
  const char* base = static_cast<const char*>(packed);
  for_each_element(n, k, bits, [&](int64_t tbase, int m16, int lane, int s, int r, int p, int64_t row, int64_t kk) {
    const int32_t c = row_chan[row];
    const int8_t q = (c >= 0 && kk < k) ? code_at(base + static_cast<size_t>(c * cols) * elt, kk, bits) : int8_t{0};
    const uint32_t f = field_of(q, bits);
    int w, bit, w_hi, bit_hi;
    field_location(bits, s, r, p, &w, &bit, &w_hi, &bit_hi);
    if (bits == 3) {
      out[tbase + word_index(bits, m16, lane, w)] |= (f & 3u) << bit;
      out[tbase + word_index(bits, m16, lane, w_hi)] |= ((f >> 2) & 1u) << bit_hi;
    } else {
      out[tbase + word_index(bits, m16, lane, w)] |= f << bit;
    }
  });
}

bool unrepack(const uint32_t* words, int64_t n, int64_t k, int bits, const int32_t* row_chan, int8_t* codes) {
  bool padding_ok = true;
  const uint32_t zero_field = field_of(0, bits);
  const uint32_t mask = bits == 8 ? 0xFFu : bits == 3 ? 3u : (1u << bits) - 1u;
  for_each_element(n, k, bits, [&](int64_t tbase, int m16, int lane, int s, int r, int p, int64_t row, int64_t kk) {
    int w, bit, w_hi, bit_hi;
    field_location(bits, s, r, p, &w, &bit, &w_hi, &bit_hi);
    uint32_t f = (words[tbase + word_index(bits, m16, lane, w)] >> bit) & mask;
    if (bits == 3) f |= ((words[tbase + word_index(bits, m16, lane, w_hi)] >> bit_hi) & 1u) << 2;
    const int32_t c = row_chan[row];
    if (c >= 0 && kk < k) {
      codes[c * k + kk] = bits == 8 ? static_cast<int8_t>(f) : static_cast<int8_t>(static_cast<int>(f) - field_offset(bits));
    } else if (f != zero_field) {
      padding_ok = false;
    }
  });
  (void)n;
  return padding_ok;
}

void registers(const uint32_t* words, int64_t n, int64_t k, int bits, uint32_t* out) {
  const int64_t tiles = channel_tiles(n) * k_tiles(k);
  const int nw = words_per_slot(bits);
  uint32_t slot[16];
  for (int64_t tile = 0; tile < tiles; ++tile)
    for (int m16 = 0; m16 < kBlocks; ++m16)
      for (int lane = 0; lane < kLanes; ++lane) {
        for (int w = 0; w < nw; ++w) slot[w] = words[tile * tile_words(bits) + word_index(bits, m16, lane, w)];
        for (int s = 0; s < kKSteps; ++s) {
          uint32_t reg[4];
          switch (bits) {
            case 8: unpack_rt<8>(slot, s, reg); break;
            case 4: unpack_rt<4>(slot, s, reg); break;
            case 3: unpack_rt<3>(slot, s, reg); break;
            default: unpack_rt<2>(slot, s, reg);
          }
          uint32_t* dst = out + (((tile * kBlocks + m16) * kLanes + lane) * kKSteps + s) * 4;
          std::copy(reg, reg + 4, dst);
        }
      }
}

}  // namespace treeq::frag
