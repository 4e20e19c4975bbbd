// Intel AMX tiles for the bf16 prefill GEMM (gemv.cc): a 16 x 16 fp32 block per instruction.
//
// One TDPBF16PS multiplies a tile of 16 rows x 32 bf16 by a tile of 32 bf16 (16 pairs) x 16
// columns and adds the products into a 16 x 16 fp32 accumulator tile: 16384 flops, where a
// vdpbf16ps does 64. Measured on the project's 2-vCPU Xeon: ~3 TFLOP/s per core for the bare
// instruction, ~1.9 with both operands' tiles loaded from L1. The numerics are those of the
// vdpbf16ps loops: exact bf16 products summed in fp32 (only the summation order differs).
//
// Tiles of the second operand hold bf16 pairs [16 pairs][16 columns] ("VNNI" order): pair p of
// column j is its values at 2p and 2p + 1 of the contraction.
//
// Linux hands the tile registers only to a process that asks (arch_prctl): AmxReady() asks
// once. If the kernel refuses (an old kernel, a VM that hides AMX), the GEMM takes the
// vdpbf16ps loops. GEMMA_APP_NO_AMX builds without this file's code (the tests build it that
// way to check those loops on AMX machines); so does GEMMA_APP_NO_DPBF16, whose portable
// loops share nothing with these.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__linux__) && !defined(GEMMA_APP_NO_AMX) && !defined(GEMMA_APP_NO_DPBF16)
#define GEMMA_APP_AMX 1

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace gemma_app {

constexpr int kAmxRows = 16;   // rows per tile (of either operand, and of the accumulators)
constexpr int kAmxPairs = 16;  // bf16 pairs per row of a first-operand tile (64 bytes)
static_assert(kAmxRows == kAmxPairs, "x is padded to one multiple for both (RoundedX's pad)");

// True once this process may use the tile registers (asked on the first call).
inline bool AmxReady() {
  static const bool ready = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // asm/prctl.h, fpu/xstate
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
}

// Palette 1 with the eight tiles this GEMM uses, all 16 rows x 64 bytes:
// 0-3 accumulators (two row tiles x two column tiles), 4-5 rows, 6-7 columns.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      bytes_per_row[t] = 64;
      rows[t] = kAmxRows;
    }
  }
};

// Tiles of a [rows][pairs] and b [pairs][cols] (bf16 pairs) as this block reads them: row tile
// r (0 or 1) of p-step i at a[r] + i * a_step, 16 rows `a_stride` bytes apart; column tile c of
// p-step i at b[c] + i * b_step, 16 rows of pairs `b_stride` bytes apart. Contiguous 1 KB tiles
// (stride 64) load fastest; strided rows of a larger array work too.
struct TileOperand {
  const char* at[2];
  int64_t stride, step;
};

// c (+)= a . b over `steps` p-steps of 16 pairs: a 32 x 32 fp32 block of c (rows `c_stride`
// bytes apart; its second row tile 16 rows on, its second column tile 64 bytes on) from up to
// two row tiles of a and two column tiles of b. kTwoA / kTwoB: with the second tile; c's rows or
// columns without one are neither read nor written. `add`: c is loaded first, else zeros.
// step() runs once per p-step (the caller's prefetching).
template <bool kTwoA, bool kTwoB, typename Step>
inline void AmxBlock(const TileOperand& a, const TileOperand& b, int64_t steps, float* c,
                     int64_t c_stride, bool add, const Step& step) {
  char* c0 = reinterpret_cast<char*>(c);
  char* c1 = c0 + 16 * c_stride;
  if (add) {
    _tile_loadd(0, c0, c_stride);
    if (kTwoB) _tile_loadd(1, c0 + 64, c_stride);
    if (kTwoA) _tile_loadd(2, c1, c_stride);
    if (kTwoA && kTwoB) _tile_loadd(3, c1 + 64, c_stride);
  } else {
    _tile_zero(0);
    if (kTwoB) _tile_zero(1);
    if (kTwoA) _tile_zero(2);
    if (kTwoA && kTwoB) _tile_zero(3);
  }
  for (int64_t i = 0; i < steps; ++i) {  // [16 rows][16 pairs] x [16 pairs][16 cols]
    _tile_loadd(4, a.at[0] + i * a.step, a.stride);
    _tile_loadd(6, b.at[0] + i * b.step, b.stride);
    _tile_dpbf16ps(0, 4, 6);
    if (kTwoB) {
      _tile_loadd(7, b.at[1] + i * b.step, b.stride);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (kTwoA) {
      _tile_loadd(5, a.at[1] + i * a.step, a.stride);
      _tile_dpbf16ps(2, 5, 6);
      if (kTwoB) _tile_dpbf16ps(3, 5, 7);
    }
    step();
  }
  _tile_stored(0, c0, c_stride);
  if (kTwoB) _tile_stored(1, c0 + 64, c_stride);
  if (kTwoA) _tile_stored(2, c1, c_stride);
  if (kTwoA && kTwoB) _tile_stored(3, c1 + 64, c_stride);
}

// AmxBlock with run-time tile counts.
template <typename Step>
inline void AmxBlockOf(bool two_a, bool two_b, const TileOperand& a, const TileOperand& b,
                       int64_t steps, float* c, int64_t c_stride, bool add, const Step& step) {
  if (two_a && two_b) AmxBlock<true, true>(a, b, steps, c, c_stride, add, step);
  else if (two_a) AmxBlock<true, false>(a, b, steps, c, c_stride, add, step);
  else if (two_b) AmxBlock<false, true>(a, b, steps, c, c_stride, add, step);
  else AmxBlock<false, false>(a, b, steps, c, c_stride, add, step);
}

// Loads this GEMM's tile configuration on the calling thread. Per call: the thread belongs to
// XLA's pool, which may have run other tile code since.
inline void AmxConfigure() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}

}  // namespace gemma_app

#endif
