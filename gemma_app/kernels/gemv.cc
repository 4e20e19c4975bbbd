// The decoder's weight products on CPU, fp32 math on fp32 or bf16 weights:
//
//   contract_last:  y[g, m, n] = sum_k x[m, k] * w[l * G + g, n, k]     (w [L * G, N, K])
//   contract_first: y[g, m, n] = sum_k x[m, k] * w[l * G + g, k, n]     (w [L * G, K, N])
//
// L stacks the decoder's layers (the scanned decoder passes every layer's weights at once) and
// l, an int32 scalar operand, picks one: the layer is read in place, never sliced into a copy.
// G comes from y [G, M, N]; unstacked weights are [G, *, *] with l = 0. (Layers and groups
// share w's leading axis because a separate unit axis can make XLA copy the whole stack into
// another layout on every call.)
//
// GemmaAppGemv: M <= 4 rows (decode steps). GemmaAppGemm: any M (prefill chunks), of which only
// the first `rows` (an int32 operand) are computed.
//
// A decode step reads every weight once, so it runs at the speed memory delivers them. XLA:CPU
// reaches ~35 GB/s on an fp32 GEMV here and ~1.5 GB/s on a bf16 one (bench/README.md); these
// loops stream both dtypes at memory speed, widening bf16 to fp32 in registers, so bf16
// storage halves the bytes per token without changing the math.
//
// The loops are plain C++ written for the auto-vectoriser (fixed-width inner loops over
// contiguous memory), built with -O3 -march=native by gemma_app/kernels/build.py: AVX-512,
// AVX2 and NEON machines all get vector code from the same source. Work is split over XLA's
// intra-op thread pool; the calling thread takes units too, so the call never waits on a
// pool that is busy elsewhere.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "pool.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

#ifdef __AVX512F__  // intrinsics where the vectoriser needs help: transposes, bf16 pairs
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && !defined(GEMMA_APP_NO_DPBF16)
#define GEMMA_APP_DPBF16 1  // vdpbf16ps: 32 bf16 products summed into 16 fp32 lanes per op
#endif

namespace gemma_app {  // ffi, ParallelFor (pool.h), F32x16, Load16, Sum, Widen (vec.h)
namespace {

constexpr int kMaxRows = 4;            // x rows (batch x tokens) per call; more go to XLA's GEMM
constexpr int64_t kSerialBytes = 1 << 18;  // smaller weights are not worth waking a thread
constexpr int64_t kUnitsPerWorker = 8;     // granularity of the dynamic split
constexpr int64_t kPrefetchWeights = 8192;  // how far ahead Prefetch (AVX512-BF16 GEMVs) runs

// A linear software prefetch running kPrefetchWeights ahead through one contiguous block of w,
// for the AVX512-BF16 loops (RowsBlockDp, ColsBlockDp; the other GEMV loops read quarters, see
// QuarterPrefetch). Left to the hardware prefetcher, each call starts cold. Measured on the
// AVX-512 machines of earlier sessions, when every GEMV loop used it: the 270M bf16 logits GEMV
// 38 -> 43-51 GB/s, 1B's layer GEMVs 6-12% (bf16) and 4-8% (fp32) faster; on a Xeon with
// ~30 GB/s and higher latency, requests into L2 rather than L1 (a software prefetch into L1
// holds one of the few line-fill buffers until its line arrives) and twice the distance: 1B
// bf16 logits GEMV 18.8 -> 24.9 GB/s. The first stretch is requested at once, then each
// Advance requests as many bytes as the caller has just consumed, that far ahead.
class Prefetch {
 public:
  template <typename W>
  Prefetch(const W* begin, const W* end)
      : base_(reinterpret_cast<const char*>(begin)),
        size_(reinterpret_cast<const char*>(end) - base_) {
    Advance(kPrefetchWeights * static_cast<int64_t>(sizeof(W)));
  }
  void Advance(int64_t bytes) {
    for (const int64_t stop = std::min(size_, next_ + bytes); next_ < stop; next_ += 64)
      __builtin_prefetch(base_ + next_, 0, 2);  // 2: into L2
  }

 private:
  const char* base_;
  int64_t size_;
  int64_t next_ = 0;
};

// A GEMV unit's four rows per pass come one from each quarter of its block, not four adjacent
// rows: every quarter is then one long stream in memory order. Four adjacent rows are four
// short streams (a row of 1B is 2304 bytes of bf16) that restart every pass, which the
// hardware prefetcher follows less well. A standalone C++ probe (two threads, 1 GiB of bf16
// rows of 1152, alternated) read 24-25 GB/s with adjacent rows, 28-29 adding the linear
// software prefetch, 32-36 from quarters with a prefetch stream each; a plain read of the
// same bytes 33-35.
constexpr int kRowsPerPass = 4;

struct Quarters {
  int64_t first, len;  // quarter j is rows [first + j * len, first + (j + 1) * len)
  int64_t tail;        // the block's last rows [first + 4 * len, n1) follow the quarters
  Quarters(int64_t n0, int64_t n1) : first(n0), len((n1 - n0) / kRowsPerPass) {
    tail = n0 + kRowsPerPass * len;
  }
  int64_t Row(int j, int64_t i) const { return first + j * len + i; }
};

// Software prefetch for the quarters of a block of rows of `row` weights, kAhead bytes ahead of
// each quarter's reads. The quarters advance in step, so one counter serves them: a request
// goes to each quarter whenever they have consumed another line. With quarters the hardware
// prefetcher does most of the work. In-process A/B, Gemma 3 1B and 270M layer and logits GEMVs
// on the EPYC: bf16 read 2-5% faster with 1 KB than with none (2 and 4 KB no better, 8 KB
// worse); fp32 read 3-6% faster with none than with 1 or 2 KB, so fp32 requests nothing.
template <typename W>
class QuarterPrefetch {
 public:
  static constexpr int64_t kAhead = std::is_same_v<W, float> ? 0 : 1024;

  QuarterPrefetch(const W* w, int64_t row, const Quarters& q)
      : size_(q.len * row * static_cast<int64_t>(sizeof(W))) {
    for (int j = 0; j < kRowsPerPass; ++j)
      base_[j] = reinterpret_cast<const char*>(w + q.Row(j, 0) * row);
    Advance(kAhead);
  }
  void Advance(int64_t bytes) {  // bytes consumed per quarter since the last call
    if constexpr (kAhead == 0) return;
    want_ += bytes;
    for (const int64_t stop = std::min(size_, want_); next_ < stop; next_ += 64)
      for (const char* base : base_) __builtin_prefetch(base + next_, 0, 2);  // 2: into L2
  }

 private:
  const char* base_[kRowsPerPass];
  int64_t size_, want_ = 0, next_ = 0;
};

// A prefill GEMM unit packs its weights, then computes on the packed panel; a cold block made
// the pack wait on memory while the FMA units idled (Gemma 3 1B's bf16 gate product ran 15%
// faster on weights already in cache). So each unit requests the next unit's block into L2
// while it computes, a few lines per tile, spread evenly over its tiles: in-process A/B, the
// gate product 4-9% faster. (contract_last only: there a block is one contiguous stretch of w.
// contract_first's is K lines N apart, which the hardware prefetcher follows; requesting them
// as well measured 3-5% slower, and so did packing it in K slices.)
class Lookahead {
 public:
  Lookahead(const void* begin, int64_t bytes, int64_t steps)
      : next_(reinterpret_cast<uintptr_t>(begin) & ~uintptr_t{63}),
        end_(reinterpret_cast<uintptr_t>(begin) + (begin ? bytes : 0)),
        per_step_(((end_ > next_ ? end_ - next_ : 0) / 64 + steps) / std::max<int64_t>(1, steps)) {}
  void Step() {
    for (int64_t n = 0; n < per_step_ && next_ < end_; ++n, next_ += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(next_), 0, 2);  // 2: into L2, not L1
  }

 private:
  uintptr_t next_, end_;
  int64_t per_step_;
};

// bf16 weights multiply x rounded to bf16 (nearest even). The product of two bf16 values is exact
// in fp32, so only the fp32 sums round: the numerics of a bf16 matmul on a GPU or TPU, and of
// `_xla` in __init__.py. With AVX512-BF16 the hardware then takes bf16 pairs directly (twice
// the products per instruction of an fp32 FMA); elsewhere the same rounded x meets widened w.
inline uint16_t ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// x [M, K] rounded to bf16, as fp32 values [M, K] and as bf16 pairs [M, P], P = ceil(K / 2):
// pair p of a row holds k = 2p in its low half and k = 2p + 1 (0 past K) in its high half,
// which is memory order on a little-endian machine, so a row of pairs is also a row of bf16.
inline int64_t RoundUp(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

struct RoundedX {
  typedef uint16_t Bf16 __attribute__((may_alias));  // writes the pairs as plain bf16 rows

  int64_t P;
  std::vector<float> f32;  // empty when built without it (the AVX512-BF16 GEMM reads pairs only)
  std::vector<uint32_t> pairs;

  // `pad` > 1 (the AMX GEMM's tiles): P and the rows of `pairs` rounded up to multiples of
  // it, the padding zeros.
  RoundedX(const float* x, int64_t M, int64_t K, bool with_f32 = true, int64_t pad = 1)
      : P(RoundUp((K + 1) / 2, pad)), f32(with_f32 ? M * K : 0), pairs(RoundUp(M, pad) * P, 0) {
    // Contiguous loops the vectoriser turns into 16-lane code (a prefill chunk rounds up to
    // 128 x 2048 values per product; element by element into pairs, that took ~0.5 ms).
    for (int64_t m = 0; m < M; ++m) {
      const float* __restrict src = x + m * K;
      Bf16* __restrict dst = reinterpret_cast<Bf16*>(pairs.data() + m * P);
      for (int64_t k = 0; k < K; ++k) dst[k] = ToBf16(src[k]);
      if (with_f32)
        for (int64_t k = 0; k < K; ++k) f32[m * K + k] = Widen(static_cast<uint16_t>(dst[k]));
    }
  }
};

// The GEMV loops below work in vectors of one register: 16 floats on AVX-512, 8 on AVX2 (two
// NEON registers). Written in F32x16 on AVX2 they need twice the 16 registers it has.
#ifdef __AVX512F__
typedef F32x16 VecF;
typedef U32x16 VecU;
#else
typedef F32x8 VecF;
typedef U32x8 VecU;
#endif
constexpr int64_t kLanes = sizeof(VecF) / sizeof(float);

inline VecF LoadV(const float* p) { return LoadAs<VecF>(p); }
inline VecF LoadV(const uint16_t* p) { return LoadAs<VecF>(p); }
inline float SumV(VecF v) {
#ifdef __AVX512F__
  return Sum(v);
#else
  return SumTree(v);
#endif
}

// y[m, n] for rows n in [n0, n1) of one w [N, K] (contraction axis contiguous). Four weight
// rows per pass (one per quarter of the block) share each load of x and give four independent
// accumulator chains per x row.
template <typename W, int M>
void RowsBlock(const float* __restrict x, const W* __restrict w, int64_t K, int64_t N, int64_t n0,
               int64_t n1, float* __restrict y) {
  constexpr int R = kRowsPerPass;
  const int64_t kv = K / kLanes * kLanes;
  const Quarters q(n0, n1);
  QuarterPrefetch<W> ahead(w, K, q);
  for (int64_t i = 0; i < q.len; ++i) {
    const W* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = w + q.Row(r, i) * K;
    VecF acc[M][R] = {};
    for (int64_t k = 0; k < kv; k += kLanes) {
      ahead.Advance(kLanes * sizeof(W));
      VecF wv[R];
      for (int r = 0; r < R; ++r) wv[r] = LoadV(wr[r] + k);
      for (int m = 0; m < M; ++m) {
        const VecF xv = LoadV(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] += xv * wv[r];
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        float s = SumV(acc[m][r]);
        for (int64_t k = kv; k < K; ++k) s += x[m * K + k] * Widen(wr[r][k]);
        y[m * N + q.Row(r, i)] = s;
      }
  }
  for (int64_t n = q.tail; n < n1; ++n) {
    for (int m = 0; m < M; ++m) {
      VecF acc = {};
      for (int64_t k = 0; k < kv; k += kLanes) acc += LoadV(x + m * K + k) * LoadV(w + n * K + k);
      float s = SumV(acc);
      for (int64_t k = kv; k < K; ++k) s += x[m * K + k] * Widen(w[n * K + k]);
      y[m * N + n] = s;
    }
  }
}

#ifndef GEMMA_APP_DPBF16
// The bf16 version of RowsBlock. A one-register load holds 2 kLanes weights as kLanes lanes of
// two: element 2j is the low half of lane j, element 2j+1 the high half. `lane << 16` and
// `lane & 0xffff0000` are those two as fp32 with no cross-lane shuffle, against x split the
// same way once per call (xs: per block of 2 kLanes, x's even elements then its odd ones).
// This halves the work per weight, which is what bounded the widening loads on a 2-vCPU
// machine.
template <int M>
void RowsBlockBf16(const float* __restrict x, const float* __restrict xs,
                   const uint16_t* __restrict w, int64_t K, int64_t N, int64_t n0, int64_t n1,
                   float* __restrict y) {
  constexpr int R = kRowsPerPass;
  constexpr int64_t kBlock = 2 * kLanes;
  const int64_t kb = K / kBlock * kBlock;
  const VecU high = VecU{} + 0xffff0000u;
  auto halves = [&](const uint16_t* p, VecF& even, VecF& odd) {
    VecU lanes;
    std::memcpy(&lanes, p, sizeof lanes);
    const VecU e = lanes << 16, o = lanes & high;
    std::memcpy(&even, &e, sizeof even);
    std::memcpy(&odd, &o, sizeof odd);
  };
  // Rows n[0..rows) at once (a pass over the quarters, or the block's last rows).
  auto pass = [&](const int64_t (&n)[R], int rows, QuarterPrefetch<uint16_t>* ahead) {
    VecF acc[M][R] = {};
    for (int64_t k = 0; k < kb; k += kBlock) {
      if (ahead) ahead->Advance(kBlock * sizeof(uint16_t));
      VecF even[R], odd[R];
      for (int r = 0; r < R; ++r) {
        if (r < rows) halves(w + n[r] * K + k, even[r], odd[r]);
        else even[r] = odd[r] = VecF{};
      }
      for (int m = 0; m < M; ++m) {
        const VecF xe = LoadV(xs + m * K + k), xo = LoadV(xs + m * K + k + kLanes);
        for (int r = 0; r < R; ++r) acc[m][r] += xe * even[r] + xo * odd[r];
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < rows; ++r) {
        float s = SumV(acc[m][r]);
        for (int64_t k = kb; k < K; ++k) s += x[m * K + k] * Widen(w[n[r] * K + k]);
        y[m * N + n[r]] = s;
      }
  };
  const Quarters q(n0, n1);
  QuarterPrefetch<uint16_t> ahead(w, K, q);
  for (int64_t i = 0; i < q.len; ++i)
    pass({q.Row(0, i), q.Row(1, i), q.Row(2, i), q.Row(3, i)}, R, &ahead);
  if (q.tail < n1) pass({q.tail, q.tail + 1, q.tail + 2, q.tail + 3}, n1 - q.tail, nullptr);
}

// xs for RowsBlockBf16: per block of 2 kLanes of each row of x [M, K], its even then its odd
// elements.
std::vector<float> SplitEvenOdd(const float* x, int64_t M, int64_t K) {
  std::vector<float> xs(M * K);
  constexpr int64_t kBlock = 2 * kLanes;
  const int64_t kb = K / kBlock * kBlock;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float* out = xs.data() + m * K;
    for (int64_t k = 0; k < kb; k += kBlock)
      for (int64_t j = 0; j < kLanes; ++j) {
        out[k + j] = xr[k + 2 * j];
        out[k + kLanes + j] = xr[k + 2 * j + 1];
      }
    for (int64_t k = kb; k < K; ++k) out[k] = xr[k];
  }
  return xs;
}
#endif

#ifdef GEMMA_APP_DPBF16
// RowsBlock for bf16 weights on AVX512-BF16: a 64-byte load of w is 32 bf16 weights, and one
// vdpbf16ps multiplies them by x's 32 (rounded) bf16 values and adds the pairs into 16 lanes.
// Nothing is widened, so a weight costs a sixteenth of an instruction, and one row at a time
// keeps enough accumulator chains (two per x row). That reads w strictly in memory order:
// four rows abreast (as RowsBlock does) interleave four short streams inside each block, which
// the hardware prefetcher follows less well. On the 270M logits GEMV (two threads, a
// standalone C++ probe alternating both loops) row by row read 9-17% faster whenever the
// machine gave more than ~50 GB/s, and tied when it gave ~43.
template <int M>
void RowsBlockDp(const uint32_t* __restrict xp, int64_t P, const float* __restrict xr,
                 const uint16_t* __restrict w, int64_t K, int64_t N, int64_t n0, int64_t n1,
                 float* __restrict y) {
  const int64_t k64 = K / 64 * 64, k32 = K / 32 * 32;
  Prefetch ahead(w + n0 * K, w + n1 * K);
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    ahead.Advance(K * sizeof(uint16_t));
    __m512 a0[M], a1[M];
    for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < k64; k += 64) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wr + k + 32);
      for (int m = 0; m < M; ++m) {
        const uint32_t* x = xp + m * P + k / 2;
        a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)_mm512_loadu_si512(x), w0);
        a1[m] = _mm512_dpbf16_ps(a1[m], (__m512bh)_mm512_loadu_si512(x + 16), w1);
      }
    }
    for (; k < k32; k += 32) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k);
      for (int m = 0; m < M; ++m)
        a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)_mm512_loadu_si512(xp + m * P + k / 2), w0);
    }
    for (int m = 0; m < M; ++m) {
      float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
      for (int64_t kk = k32; kk < K; ++kk) s += xr[m * K + kk] * Widen(wr[kk]);
      y[m * N + n] = s;
    }
  }
}
#endif

// acc[m, :] += sum_{k in [k0, k1)} x[m, k] * w[k, :] for one w [K, N] (output axis contiguous).
// Four weight rows per pass (one per quarter of [k0, k1)), so the accumulator row is loaded
// and stored once per four.
template <typename W, int M>
void ColsBlock(const float* __restrict x, const W* __restrict w, int64_t K, int64_t N, int64_t k0,
               int64_t k1, float* __restrict acc) {
  constexpr int64_t kStrip = 128;  // outputs per prefetch step; the strip loop still vectorises
  const Quarters q(k0, k1);
  QuarterPrefetch<W> ahead(w, N, q);
  for (int64_t i = 0; i < q.len; ++i) {
    const int64_t r0 = q.Row(0, i), r1 = q.Row(1, i), r2 = q.Row(2, i), r3 = q.Row(3, i);
    const W* __restrict w0 = w + r0 * N;
    const W* __restrict w1 = w + r1 * N;
    const W* __restrict w2 = w + r2 * N;
    const W* __restrict w3 = w + r3 * N;
    for (int64_t j0 = 0; j0 < N; j0 += kStrip) {
      const int64_t j1 = std::min(N, j0 + kStrip);
      ahead.Advance((j1 - j0) * static_cast<int64_t>(sizeof(W)));
      for (int m = 0; m < M; ++m) {
        const float a0 = x[m * K + r0], a1 = x[m * K + r1];
        const float a2 = x[m * K + r2], a3 = x[m * K + r3];
        float* __restrict out = acc + m * N;
        for (int64_t j = j0; j < j1; ++j)
          out[j] += a0 * Widen(w0[j]) + a1 * Widen(w1[j]) + a2 * Widen(w2[j]) + a3 * Widen(w3[j]);
      }
    }
  }
  for (int64_t k = q.tail; k < k1; ++k) {
    const W* __restrict wk = w + k * N;
    for (int m = 0; m < M; ++m) {
      const float a = x[m * K + k];
      float* __restrict out = acc + m * N;
      for (int64_t j = 0; j < N; ++j) out[j] += a * Widen(wk[j]);
    }
  }
}

#ifdef GEMMA_APP_DPBF16
// ColsBlock for bf16 weights on AVX512-BF16. vdpbf16ps wants (k, k + 1) pairs of one output in
// a 32-bit lane, and w [K, N] keeps k's outputs apart: unpacklo/hi_epi16 of rows k and k + 1
// interleave them, but within 128-bit lanes, so a 32-output block of acc holds its outputs in
// the order ColsOrder gives (acc is private to the call; UnpermuteCols restores y's order).
// Columns past the last whole block stay in order, summed with widened weights.
inline int64_t ColsOrder(int64_t a) {  // a-th float of a block of acc -> its output in the block
  const int64_t half = a / 16, i = a % 16;  // unpacklo then unpackhi
  return 8 * (i / 4) + 4 * half + i % 4;
}

template <int M>
void ColsBlockDp(const uint32_t* __restrict xp, int64_t P, const float* __restrict xr,
                 const uint16_t* __restrict w, int64_t K, int64_t N, int64_t k0, int64_t k1,
                 float* __restrict acc) {
  const int64_t n32 = N / 32 * 32;
  Prefetch ahead(w + k0 * N, w + k1 * N);
  // Two pairs of rows per pass (k0 is a multiple of 4), then a last pair whose second row may
  // be past K.
  for (int64_t k = k0; k < k1; k += 4) {
    const bool second = k + 2 < k1;  // pair (k + 2, k + 3) exists
    const uint16_t* r[4];
    for (int i = 0; i < 4; ++i) r[i] = k + i < k1 ? w + (k + i) * N : nullptr;
    __m512bh a0[M], a1[M];
    for (int m = 0; m < M; ++m) {
      a0[m] = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[m * P + k / 2]));
      a1[m] = (__m512bh)_mm512_set1_epi32(second ? static_cast<int>(xp[m * P + k / 2 + 1]) : 0);
    }
    auto row = [&](int i, int64_t n) {
      return r[i] ? _mm512_loadu_si512(r[i] + n) : _mm512_setzero_si512();
    };
    for (int64_t n = 0; n < n32; n += 32) {
      ahead.Advance(4 * 32 * sizeof(uint16_t));
      const __m512i w0 = row(0, n), w1 = row(1, n);
      const __m512bh lo01 = (__m512bh)_mm512_unpacklo_epi16(w0, w1);
      const __m512bh hi01 = (__m512bh)_mm512_unpackhi_epi16(w0, w1);
      __m512bh lo23 = lo01, hi23 = hi01;
      if (second) {
        const __m512i w2 = row(2, n), w3 = row(3, n);
        lo23 = (__m512bh)_mm512_unpacklo_epi16(w2, w3);
        hi23 = (__m512bh)_mm512_unpackhi_epi16(w2, w3);
      }
      for (int m = 0; m < M; ++m) {
        float* out = acc + m * N + n;
        __m512 lo = _mm512_dpbf16_ps(_mm512_loadu_ps(out), a0[m], lo01);
        __m512 hi = _mm512_dpbf16_ps(_mm512_loadu_ps(out + 16), a0[m], hi01);
        if (second) {
          lo = _mm512_dpbf16_ps(lo, a1[m], lo23);
          hi = _mm512_dpbf16_ps(hi, a1[m], hi23);
        }
        _mm512_storeu_ps(out, lo);
        _mm512_storeu_ps(out + 16, hi);
      }
    }
    for (int i = 0; i < 4; ++i) {
      if (!r[i]) continue;
      for (int m = 0; m < M; ++m) {
        const float a = xr[m * K + k + i];
        for (int64_t j = n32; j < N; ++j) acc[m * N + j] += a * Widen(r[i][j]);
      }
    }
  }
}

// y [rows, N] from ColsBlockDp's order back to outputs' order, block by block.
void UnpermuteCols(float* y, int64_t rows, int64_t N) {
  float block[32];
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t n = 0; n + 32 <= N; n += 32) {
      float* out = y + m * N + n;
      for (int64_t a = 0; a < 32; ++a) block[ColsOrder(a)] = out[a];
      std::copy(block, block + 32, out);
    }
}
#endif

template <typename W, int M>
struct Problem {
  const float* x;   // bf16 weights: x rounded to bf16 (RoundedX::f32)
  const float* xs;  // bf16 weights without AVX512-BF16, contract_last: x split by SplitEvenOdd
  const uint32_t* xp;  // bf16 weights: x's bf16 pairs [M, P] (RoundedX::pairs)
  int64_t P;
  const W* w;
  float* y;
  int64_t G, N, K;
  bool contract_last;
  int64_t blocks;  // units per g: row blocks (contract_last) or k chunks (contract_first)

  int64_t Units() const { return G * blocks; }

  void Run(int64_t unit, float* partial) const {
    const int64_t g = unit / blocks, b = unit % blocks;
    const W* wg = w + g * N * K;
    if (contract_last) {
      const int64_t step = (N + blocks - 1) / blocks;
      const int64_t n0 = b * step, n1 = std::min(N, n0 + step);
      if constexpr (std::is_same_v<W, uint16_t>) {
#ifdef GEMMA_APP_DPBF16
        RowsBlockDp<M>(xp, P, x, wg, K, N, n0, n1, y + g * M * N);
#else
        RowsBlockBf16<M>(x, xs, wg, K, N, n0, n1, y + g * M * N);
#endif
      } else
        RowsBlock<W, M>(x, wg, K, N, n0, n1, y + g * M * N);
    } else {
      const int64_t step = ((K + blocks - 1) / blocks + 3) / 4 * 4;
      const int64_t k0 = std::min(K, b * step), k1 = std::min(K, k0 + step);
#ifdef GEMMA_APP_DPBF16
      if constexpr (std::is_same_v<W, uint16_t>) {
        ColsBlockDp<M>(xp, P, x, wg, K, N, k0, k1, partial + g * M * N);
        return;
      }
#endif
      ColsBlock<W, M>(x, wg, K, N, k0, k1, partial + g * M * N);
    }
  }
};

template <typename W, int M>
void Launch(ffi::ThreadPool& pool, const Problem<W, M>& base, int64_t weight_bytes) {
  Problem<W, M> p = base;
  int64_t threads = weight_bytes < kSerialBytes ? 1 : std::max<int64_t>(1, pool.num_threads());
  const int64_t per_g = p.contract_last ? p.N : p.K / 16;  // k chunks of at least 16 rows
  const int64_t want = std::max<int64_t>(1, threads * kUnitsPerWorker / p.G);
  p.blocks = std::max<int64_t>(1, std::min(per_g, threads == 1 ? 1 : want));
  threads = std::min(threads, p.Units());

  std::vector<float> xs;
  std::unique_ptr<RoundedX> rx;
  if (std::is_same_v<W, uint16_t>) {
    rx = std::make_unique<RoundedX>(p.x, M, p.K);
    p.x = rx->f32.data();
    p.xp = rx->pairs.data();
    p.P = rx->P;
#ifndef GEMMA_APP_DPBF16
    if (p.contract_last) {
      xs = SplitEvenOdd(p.x, M, p.K);
      p.xs = xs.data();
    }
#endif
  }
  // contract_first: each thread sums its k chunks into its own [G, M, N] (zeros if unused).
  std::vector<std::vector<float>> partial;
  if (!p.contract_last) partial.assign(threads, std::vector<float>(p.G * M * p.N, 0.f));
  ParallelFor(
      pool, p.Units(),
      [&](int64_t u, int64_t, int64_t worker) {
        p.Run(u, p.contract_last ? nullptr : partial[worker].data());
      },
      threads);

  if (!p.contract_last) {
    const int64_t size = p.G * M * p.N;
    std::copy(partial[0].begin(), partial[0].end(), p.y);
    for (int64_t t = 1; t < threads; ++t)
      for (int64_t i = 0; i < size; ++i) p.y[i] += partial[t][i];
#ifdef GEMMA_APP_DPBF16
    if (std::is_same_v<W, uint16_t>) UnpermuteCols(p.y, p.G * M, p.N);
#endif
  }
}

template <typename W>
void Dispatch(ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t M, int64_t G,
              int64_t N, int64_t K, bool contract_last) {
  const int64_t bytes = G * N * K * static_cast<int64_t>(sizeof(W));
  auto run = [&](auto rows) {
    constexpr int kM = decltype(rows)::value;
    Launch<W, kM>(pool, {x, nullptr, nullptr, 0, w, y, G, N, K, contract_last, 1}, bytes);
  };
  switch (M) {
    case 1: return run(std::integral_constant<int, 1>());
    case 2: return run(std::integral_constant<int, 2>());
    case 3: return run(std::integral_constant<int, 3>());
    default: return run(std::integral_constant<int, 4>());
  }
}

struct Shapes {
  int64_t M, K, G, N;
  int64_t offset;  // elements of w before layer l
};

// x [M, K], w [L * G, N, K] (contract_last) or [L * G, K, N], y [G, M, N], l in [0, L).
ffi::Error ReadShapes(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
                      ffi::Span<const int64_t> yd, ffi::Buffer<ffi::S32> layer,
                      bool contract_last, Shapes& s) {
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 3 || layer.element_count() != 1)
    return ffi::Error::InvalidArgument(
        "x must be [M, K], w [L * G, *, *], y [G, M, N] and layer a scalar");
  s = {xd[0], xd[1], yd[0], contract_last ? wd[1] : wd[2], 0};
  if ((contract_last ? wd[2] : wd[1]) != s.K)
    return ffi::Error::InvalidArgument("the contraction sizes of x and w differ");
  if (yd[1] != s.M || yd[2] != s.N || s.G < 1 || wd[0] % s.G != 0)
    return ffi::Error::InvalidArgument("y must be [G, M, N] with G dividing w's leading axis");
  const int64_t l = *layer.typed_data();
  if (l < 0 || l >= wd[0] / s.G) return ffi::Error::InvalidArgument("layer index out of range");
  s.offset = l * s.G * s.N * s.K;
  return ffi::Error::Success();
}

// Calls run(weights of layer l) with a typed pointer: const float* or const uint16_t* (bf16).
template <typename Run>
ffi::Error WithLayerWeights(const ffi::AnyBuffer& w, const Shapes& s, Run run) {
  switch (w.element_type()) {
    case ffi::DataType::F32:
      run(static_cast<const float*>(w.untyped_data()) + s.offset);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      run(static_cast<const uint16_t*>(w.untyped_data()) + s.offset);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("weights must be float32 or bfloat16");
  }
}

ffi::Error Gemv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, bool contract_last) {
  Shapes s;
  ffi::Error err = ReadShapes(x.dimensions(), w.dimensions(), y->dimensions(), layer,
                              contract_last, s);
  if (err.failure()) return err;
  if (s.M < 1 || s.M > kMaxRows) return ffi::Error::InvalidArgument("gemv: 1 to 4 rows of x");
  if (s.M * s.K == 0 || s.G * s.N == 0) return ffi::Error::Success();
  return WithLayerWeights(w, s, [&](const auto* wl) {
    Dispatch(pool, x.typed_data(), wl, y->typed_data(), s.M, s.G, s.N, s.K, contract_last);
  });
}

// Prefill products: y[g, m, n] for any M, without an fp32 copy of w. Weights are widened from
// bf16 (or copied from fp32) into thread-local fp32 panels [k][kNR outputs]; x is copied once
// into tiles of kMR rows [k][kMR]. Per k a tile takes two panel loads, kMR broadcasts and
// 2 kMR FMAs into 2 kMR accumulator registers. The tile is sized to the register file:
//   AVX-512 (32 registers of 16 floats): 12 x 32, 24 accumulators (~90% of the FMA peak with
//     both operands in L1, on the Xeon these numbers come from);
//   otherwise (AVX2's 16 registers of 8 floats; NEON's 32 of 4): 6 x 16, 12 accumulators.
//     The 12 x 32 tile there needs 48 AVX2 registers: spilled, it ran at 4 GFLOP/s on a Zen 3
//     EPYC, 30x slower than XLA's dot (tiny -m gemm probe in bench/README.md).
//   contract_last, w [N, K]: a panel is kNR rows of w over all of K, transposed; every tile
//     of x runs against it kKC values of k at a time.
//   contract_first, w [K, N]: blocks of kKCBlock whole rows of w, packed into panels, each
//     against every tile (GemmColsBlocks).
// A materialised fp32 weight would cost more than the product here: fresh 64 MB buffers
// page-fault at ~5 GB/s. (Dot products along K against w's rows, which skip the transpose,
// measured slower: 14 vs 16 ms fp32 and 37 vs 15 ms bf16 on Gemma 3 1B's gates, 100 rows.)
// Measured against the 6-row tiles reading x in place, Gemma 3 1B fp32 at 100 rows (in-process
// A/B): gates 14.4 -> 13.1-14.3 ms, down 8.8-9.3 -> 7.1-7.7 ms; TTFT(100) 994 -> 734 ms with
// the broadcast fix in Tile.
#ifdef __AVX512F__
constexpr int kMR = 12;
constexpr int64_t kNR = 32;
typedef F32x16 PanelVec;  // half a panel row: one register
#else
constexpr int kMR = 6;
constexpr int64_t kNR = 16;
typedef F32x8 PanelVec;  // one AVX2 register, two NEON ones
#endif
constexpr int64_t kHalf = kNR / 2;  // floats in a PanelVec
static_assert(sizeof(PanelVec) == kHalf * sizeof(float));
constexpr int64_t kKC = 256;       // contract_last: k per pass over the tiles (32 KB of panel)
constexpr int64_t kKCBlock = 128;  // contract_first: rows of w per block (5% ahead of 256)

#ifdef __AVX512F__
// out[c * os + r] = row r's c-th 32-bit value, for 16 rows of 16 values (row r at in + r *
// stride bytes): one 16 x 16 block of a panel's transpose, in 64 shuffles instead of 256
// scalar moves. Values are 32-bit: fp32 weights, or bf16 weights read as (k, k + 1) pairs.
// os (out's row stride, in values): 32 for a panel, 16 for one AMX tile.
inline void Transpose16x16(const char* in, int64_t stride, uint32_t* out, int64_t os = 32) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(in + i * stride);
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: (r_i, r_i+1) of columns 4L..4L+3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + q], lane L: rows i..i+3 of column 4L + q
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int q = 0; q < 4; ++q) {  // gather lane L of the four row groups: column 4L + q
    const __m512i even01 = _mm512_shuffle_i32x4(r[q], r[4 + q], 0x88);  // lanes 0, 2
    const __m512i odd01 = _mm512_shuffle_i32x4(r[q], r[4 + q], 0xdd);   // lanes 1, 3
    const __m512i even23 = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0x88);
    const __m512i odd23 = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0xdd);
    _mm512_storeu_si512(out + (0 + q) * os, _mm512_shuffle_i32x4(even01, even23, 0x88));
    _mm512_storeu_si512(out + (8 + q) * os, _mm512_shuffle_i32x4(even01, even23, 0xdd));
    _mm512_storeu_si512(out + (4 + q) * os, _mm512_shuffle_i32x4(odd01, odd23, 0x88));
    _mm512_storeu_si512(out + (12 + q) * os, _mm512_shuffle_i32x4(odd01, odd23, 0xdd));
  }
}

// The first `*done` columns of a full panel [cols][32] from 32 rows of `cols` 32-bit values
// (row j at in + j * stride bytes), by 16 x 16 blocks; the caller packs the rest.
inline void TransposeRows32(const char* in, int64_t stride, int64_t cols, uint32_t* panel,
                            int64_t* done) {
  *done = cols / 16 * 16;
  for (int64_t c = 0; c < *done; c += 16)
    for (int h = 0; h < 2; ++h)
      Transpose16x16(in + 16 * h * stride + 4 * c, stride, panel + c * 32 + 16 * h);
}
#else
inline void TransposeRows32(const char*, int64_t, int64_t, uint32_t*, int64_t* done) {
  *done = 0;
}
#endif

// contract_last: rows [n0, n0 + kNR) of w [N, K] as the columns of a panel [K][kNR] (columns
// past N zero).
template <typename W>
void PackPanel(const W* __restrict w, int64_t K, int64_t N, int64_t n0,
               float* __restrict panel) {
  const int64_t nr = std::min<int64_t>(kNR, N - n0);
  int64_t start = 0;  // fp32 full panels: 16 x 16 blocks, then the columns left
  if constexpr (std::is_same_v<W, float>) {
    if (nr == kNR)
      TransposeRows32(reinterpret_cast<const char*>(w + n0 * K), K * 4, K,
                      reinterpret_cast<uint32_t*>(panel), &start);
  }
  // In blocks of 64 k, so the panel slice being written stays in L1 across its kNR rows.
  constexpr int64_t kKB = 64;
  for (int64_t k0 = start; k0 < K; k0 += kKB) {
    const int64_t k1 = std::min(K, k0 + kKB);
    for (int64_t j = 0; j < kNR; ++j) {
      const W* src = w + (n0 + std::min(j, nr - 1)) * K;
      const bool pad = j >= nr;
      for (int64_t k = k0; k < k1; ++k) panel[k * kNR + j] = pad ? 0.f : Widen(src[k]);
    }
  }
}

// Unit u of a contract_last GEMM over w [G][N, K]: panel u % panels (kNR rows) of group
// u / panels. Its weights and their bytes, for the unit before it to request (Lookahead).
template <typename W>
struct PanelUnits {
  const W* ws;
  int64_t N, K, panels;
  const W* Weights(int64_t u) const {  // null for no unit (u < 0)
    return u < 0 ? nullptr : ws + (u / panels) * N * K + (u % panels) * kNR * K;
  }
  int64_t Bytes(int64_t u) const {
    return u < 0 ? 0 : std::min(kNR, N - u % panels * kNR) * K * static_cast<int64_t>(sizeof(W));
  }
};

// x [M, K] as tiles of kMR rows [M / kMR][K][kMR] (rows past M zero): a tile's kMR values
// for one k are adjacent, so its broadcasts read one stream, not kMR rows K apart. Written in
// order, reading kMR rows abreast (2.4x faster than row by row into the tiles).
std::vector<float> TilesOfRows(const float* x, int64_t M, int64_t K) {
  std::vector<float> xt(RoundUp(M, kMR) * K);
  for (int64_t m0 = 0; m0 < M; m0 += kMR) {
    const float* src[kMR];
    for (int r = 0; r < kMR; ++r) src[r] = m0 + r < M ? x + (m0 + r) * K : nullptr;
    float* __restrict dst = xt.data() + m0 * K;
    for (int64_t k = 0; k < K; ++k)
      for (int r = 0; r < kMR; ++r) dst[k * kMR + r] = src[r] ? src[r][k] : 0.f;
  }
  return xt;
}

// y[0:R, 0:nr] (+)= xt[0:kc] @ panel[0:kc] for one tile of x (xt [kc][kMR], panel [kc][kNR]);
// with `add` the sums continue from y's, so blocking K keeps each output's summation order.
template <int R>
void Tile(const float* __restrict xt, int64_t kc, const float* __restrict panel,
          float* __restrict y, int64_t N, int64_t nr, bool add) {
  auto load = [](const float* p) { return LoadAs<PanelVec>(p); };
  PanelVec acc[R][2] = {};
  if (add && nr == kNR)
    for (int i = 0; i < R; ++i) acc[i][0] = load(y + i * N), acc[i][1] = load(y + i * N + kHalf);
  for (int64_t k = 0; k < kc; ++k) {
    const PanelVec b0 = load(panel + k * kNR), b1 = load(panel + k * kNR + kHalf);
    for (int i = 0; i < R; ++i) {
      // Scalar times vector: a bare broadcast load. (PanelVec{} + x costs a vaddss per row on
      // the FMA ports, since x + 0 is not x for x = -0: the kernel ran at half the FMA peak.)
      const float a = xt[k * kMR + i];
      acc[i][0] += a * b0;
      acc[i][1] += a * b1;
    }
  }
  for (int i = 0; i < R; ++i) {
    float out[kNR];
    std::memcpy(out, &acc[i][0], sizeof acc[i][0]);
    std::memcpy(out + kHalf, &acc[i][1], sizeof acc[i][1]);
    float* dst = y + i * N;
    if (add && nr < kNR)
      for (int64_t j = 0; j < nr; ++j) dst[j] += out[j];
    else
      std::copy(out, out + nr, dst);
  }
}

// Tile for `rows` in [1, kMR].
template <int R = kMR>
void TileRows(int rows, const float* xt, int64_t kc, const float* panel, float* y, int64_t N,
              int64_t nr, bool add) {
  if constexpr (R > 1) {
    if (rows < R) return TileRows<R - 1>(rows, xt, kc, panel, y, N, nr, add);
  }
  Tile<R>(xt, kc, panel, y, N, nr, add);
}

// contract_last, w [N, K]: panel n0 over all of K (its rows are one contiguous stretch of w),
// then every tile of x against it, kKC values of k at a time so the panel's slice stays in L1.
template <typename W>
void GemmRowsPanel(const float* xt, const W* w, float* y, int64_t M, int64_t N, int64_t K,
                   int64_t n0) {
  thread_local std::vector<float> panel;
  if (static_cast<int64_t>(panel.size()) < K * kNR) panel.resize(K * kNR);
  PackPanel(w, K, N, n0, panel.data());
  const int64_t nr = std::min<int64_t>(kNR, N - n0);
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(K, k0 + kKC) - k0;
    for (int64_t m = 0; m < M; m += kMR) {
      const int rows = static_cast<int>(std::min<int64_t>(kMR, M - m));
      TileRows(rows, xt + m * K + k0 * kMR, kc, panel.data() + k0 * kNR, y + m * N + n0, N, nr,
               k0 > 0);
    }
  }
}

// contract_first, w [K, N]: rows [k0, k1) of w, one contiguous stretch, as panels
// [Nt / kNR][k1 - k0][kNR] (columns past N zero), read front to back.
template <typename W>
void PackBlock(const W* __restrict w, int64_t N, int64_t k0, int64_t k1, int64_t Nt,
               float* __restrict block) {
  const int64_t kc = k1 - k0;
  for (int64_t k = k0; k < k1; ++k) {
    const W* __restrict src = w + k * N;
    for (int64_t n0 = 0; n0 < Nt; n0 += kNR) {
      float* __restrict dst = block + (n0 / kNR * kc + k - k0) * kNR;
      if (n0 + kNR <= N)
        for (int64_t j = 0; j < kNR; ++j) dst[j] = Widen(src[n0 + j]);
      else
        for (int64_t j = 0; j < kNR; ++j) dst[j] = n0 + j < N ? Widen(src[n0 + j]) : 0.f;
    }
  }
}

// contract_first by blocks of kKC rows of w: each block packed whole (one sequential read), then
// every panel of it against every tile of x. Panel by panel over all of K, as contract_last
// goes, each k of a panel was 128 bytes of another page, which the hardware prefetcher does
// not follow: Gemma 3 1B's down product ran at ~40% of the FMA peak. Threads take fixed runs
// of the G x blocks blocks, each summed into its own [G, Mt, Nt] and added up in order, as
// the AMX GEMM does: the same sums however threads are scheduled.
template <typename W>
void GemmColsBlocks(ffi::ThreadPool& pool, const float* xt, const W* ws, float* ys,
                    const Shapes& s, int64_t M) {
  const int64_t K = s.K, N = s.N, Nt = RoundUp(N, kNR), Mt = RoundUp(M, kMR);
  const int64_t blocks = (K + kKCBlock - 1) / kKCBlock, total = s.G * blocks;
  const int64_t parts = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), total);
  std::vector<std::vector<float>> acc(parts, std::vector<float>(s.G * Mt * Nt, 0.f));
  ParallelFor(pool, parts, [&](int64_t part, int64_t, int64_t) {
    thread_local std::vector<float> block;
    if (static_cast<int64_t>(block.size()) < Nt * kKCBlock) block.resize(Nt * kKCBlock);
    const int64_t end = (part + 1) * total / parts;
    for (int64_t i = part * total / parts; i < end; ++i) {
      const int64_t g = i / blocks, k0 = i % blocks * kKCBlock;
      const int64_t kc = std::min(K, k0 + kKCBlock) - k0;
      PackBlock(ws + g * N * K, N, k0, k0 + kc, Nt, block.data());
      float* a = acc[part].data() + g * Mt * Nt;
      for (int64_t n0 = 0; n0 < Nt; n0 += kNR)
        for (int64_t m = 0; m < M; m += kMR) {
          const int rows = static_cast<int>(std::min<int64_t>(kMR, M - m));
          TileRows(rows, xt + m * K + k0 * kMR, kc, block.data() + n0 * kc, a + m * Nt + n0, Nt,
                   kNR, true);
        }
    }
  }, parts, /*claim_next=*/false);
  for (int64_t g = 0; g < s.G; ++g)
    for (int64_t m = 0; m < M; ++m) {
      float* dst = ys + (g * s.M + m) * N;
      std::copy_n(acc[0].data() + (g * Mt + m) * Nt, N, dst);
      for (int64_t t = 1; t < parts; ++t) {
        const float* src = acc[t].data() + (g * Mt + m) * Nt;
        for (int64_t n = 0; n < N; ++n) dst[n] += src[n];
      }
    }
}

#ifdef GEMMA_APP_DPBF16
// The GEMM for bf16 weights on AVX512-BF16. Panels hold bf16 pairs [P][32] (pair p of output j:
// its weights for k = 2p and 2p + 1) and are copied, not widened; x's rows are bf16 pairs too.
// Per pair of k an 8-row tile takes two panel loads, eight broadcasts and 16 vdpbf16ps, each
// 32 products: twice an fp32 FMA's.
constexpr int kMRDp = 8;

// The 32 bf16 pairs (r0[j], r1[j]) of two rows' 32 values: j < 16 to lo, the rest to hi.
inline void InterleavePairs32(const uint16_t* r0, const uint16_t* r1, uint32_t* lo,
                              uint32_t* hi) {
  alignas(64) static constexpr uint16_t kLo[32] = {
      0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i first = _mm512_load_si512(kLo);
  const __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
  const __m512i a = _mm512_loadu_si512(r0), b = _mm512_loadu_si512(r1);
  _mm512_storeu_si512(lo, _mm512_permutex2var_epi16(a, first, b));
  _mm512_storeu_si512(hi, _mm512_permutex2var_epi16(a, second, b));
}

template <bool kLast>
void PackPanelDp(const uint16_t* __restrict w, int64_t K, int64_t N, int64_t n0,
                 uint32_t* __restrict panel) {
  const int64_t nr = std::min<int64_t>(kNR, N - n0), P = (K + 1) / 2;
  auto pair = [](uint16_t lo, uint16_t hi) { return lo | static_cast<uint32_t>(hi) << 16; };
  if (kLast) {  // w [N, K]: output j's row, read in pairs, becomes column j of the panel
    // The panel's rows are one contiguous block of w. Requested front to back before the
    // transpose walks it 32 rows abreast (more streams than the hardware prefetcher follows),
    // it arrives from memory sooner: Gemma 3 1B's gate product ran 4-7% faster.
    const char* block = reinterpret_cast<const char*>(w + n0 * K);
    for (int64_t b = 0; b < nr * K * 2; b += 64) _mm_prefetch(block + b, _MM_HINT_T0);
    int64_t start = 0;  // full panels: 16 x 16 blocks of whole pairs, then the pairs left
    if (nr == kNR)
      TransposeRows32(reinterpret_cast<const char*>(w + n0 * K), K * 2, K / 2, panel, &start);
    constexpr int64_t kPB = 64;  // in blocks of 64 pairs: the 8 KB being written stays in L1
    for (int64_t p0 = start; p0 < P; p0 += kPB) {
      const int64_t p1 = std::min(P, p0 + kPB);
      for (int64_t j = 0; j < kNR; ++j) {
        const uint16_t* src = w + (n0 + std::min(j, nr - 1)) * K;
        for (int64_t p = p0; p < p1; ++p) {
          const uint16_t hi = 2 * p + 1 < K ? src[2 * p + 1] : 0;
          panel[p * kNR + j] = j < nr ? pair(src[2 * p], hi) : 0u;
        }
      }
    }
  } else {  // w [K, N]: pair p interleaves rows 2p and 2p + 1 of w
    int64_t p = 0;
    if (nr == kNR)  // full panels: one two-source word permute per 16 outputs
      for (; 2 * p + 1 < K; ++p)
        InterleavePairs32(w + 2 * p * N + n0, w + (2 * p + 1) * N + n0, panel + p * kNR,
                          panel + p * kNR + 16);
    for (; p < P; ++p) {
      const uint16_t* r0 = w + 2 * p * N + n0;
      const uint16_t* r1 = 2 * p + 1 < K ? r0 + N : nullptr;
      for (int64_t j = 0; j < kNR; ++j)
        panel[p * kNR + j] = j < nr ? pair(r0[j], r1 ? r1[j] : 0) : 0u;
    }
  }
}

// y[m0:m0+R, n0:n0+nr] (+)= x's pairs [R, p0:p1] @ panel[p0:p1] (x's rows P apart). R is a
// template argument so the last tile of a chunk (100 rows: 12 x 8 + 4) computes only its rows.
template <int R>
void TileDp(const uint32_t* __restrict xp, int64_t P, int64_t p0, int64_t p1,
            const uint32_t* __restrict panel, float* __restrict y, int64_t N, int64_t nr,
            bool add) {
  __m512 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + p * kNR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + p * kNR + 16);
    for (int i = 0; i < R; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[i * P + p]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, b1);
    }
  }
  for (int i = 0; i < R; ++i) {
    float out[kNR];
    _mm512_storeu_ps(out, acc[i][0]);
    _mm512_storeu_ps(out + 16, acc[i][1]);
    float* dst = y + i * N;
    for (int64_t j = 0; j < nr; ++j) dst[j] = add ? dst[j] + out[j] : out[j];
  }
}

// TileDp for `rows` in [1, kMRDp].
template <int R = kMRDp>
void TileDpRows(int rows, const uint32_t* xp, int64_t P, int64_t p0, int64_t p1,
                const uint32_t* panel, float* y, int64_t N, int64_t nr, bool add) {
  if constexpr (R > 1) {
    if (rows < R) return TileDpRows<R - 1>(rows, xp, P, p0, p1, panel, y, N, nr, add);
  }
  TileDp<R>(xp, P, p0, p1, panel, y, N, nr, add);
}

template <bool kLast>
void GemmPanelDp(const RoundedX& x, const uint16_t* w, float* y, int64_t M, int64_t N,
                 int64_t K, int64_t n0, const uint16_t* next, int64_t next_bytes, bool amx) {
  // Pairs per pass over the tiles: a 64 KB slice of the panel, reused by every tile from L2.
  constexpr int64_t kPB = 512;
  thread_local std::vector<uint32_t> panel;
  if (static_cast<int64_t>(panel.size()) < x.P * kNR) panel.resize(x.P * kNR);
  PackPanelDp<kLast>(w, K, N, n0, panel.data());
  const int64_t nr = std::min<int64_t>(kNR, N - n0);
#ifdef GEMMA_APP_AMX
  if (amx) {  // contract_last units GemmRowsAmx cannot take: the panel as column tiles
    std::fill(panel.data() + (K + 1) / 2 * kNR, panel.data() + x.P * kNR, 0u);  // x's padding
    Lookahead ahead(next, next_bytes, (M + 31) / 32 * (x.P / kAmxPairs));
    AmxConfigure();
    alignas(64) float out[32 * 32];
    for (int64_t m = 0; m < M; m += 32) {
      const int64_t rows = std::min<int64_t>(32, M - m);
      const char* xm = reinterpret_cast<const char*>(x.pairs.data() + m * x.P);
      const char* pb = reinterpret_cast<const char*>(panel.data());
      const TileOperand a{{xm, xm + 16 * x.P * 4}, x.P * 4, 64};
      const TileOperand b{{pb, pb + 64}, 128, 16 * 128};
      AmxBlockOf(rows > 16, true, a, b, x.P / kAmxPairs, out, 128, false, [&] { ahead.Step(); });
      for (int64_t i = 0; i < rows; ++i)
        std::memcpy(y + (m + i) * N + n0, out + i * 32, nr * sizeof(float));
    }
    _tile_release();
    return;
  }
#endif
  // next, next_bytes: the weights of this thread's next panel (rows of w), or null.
  Lookahead ahead(next, next_bytes, (x.P + kPB - 1) / kPB * ((M + kMRDp - 1) / kMRDp));
  for (int64_t p0 = 0; p0 < x.P; p0 += kPB) {
    const int64_t p1 = std::min(x.P, p0 + kPB);
    for (int64_t m = 0; m < M; m += kMRDp) {
      ahead.Step();
      const int rows = static_cast<int>(std::min<int64_t>(kMRDp, M - m));
      TileDpRows(rows, x.pairs.data() + m * x.P, x.P, p0, p1, panel.data(), y + m * N + n0, N,
                 nr, p0 > 0);
    }
  }
}
#endif

#ifdef GEMMA_APP_AMX
// The bf16 GEMM on AMX tiles (amx.h). Both operands go in as 1 KB tiles: a tile loads fastest
// from contiguous memory, and rows of a large array mostly come from L2 (measured on this
// Xeon, one core: ~1.9 TFLOP/s with the tiles in L1, ~1.0 from L2, ~0.5 from strided rows).
//   contract_last, w [N, K]: units of 32 rows of w, read in place as row tiles (they already
//     are bf16 pairs along K), against x's transposed tiles: the tiles compute y's transpose.
//   contract_first, w [K, N]: slices of kSliceRows rows of w (one contiguous stretch), their
//     row pairs interleaved into column tiles, against x's tiles; one run of slices per
//     thread, each summed into its own [G, M, N], added up at the end.
// Each unit requests the next one's weights into L2 while it computes (Lookahead). On Gemma 3
// 1B's products at 100 rows, against the vdpbf16ps loops: 4.6 -> 2.9 ms for the gates, 3.4 ->
// 2.6 ms for the down projection (in-process A/B, interleaved).
constexpr int64_t kSliceRows = 256;

// x's pairs [Mt][P] (RoundedX padded to whole tiles) as contiguous tiles [Mt / 16][P / 16]:
// each 16 rows x 16 pairs, or its transpose (16 pairs x 16 rows) with `transposed`.
std::vector<uint32_t> TilesOfX(const RoundedX& x, int64_t Mt, bool transposed) {
  const int64_t steps = x.P / kAmxPairs;
  std::vector<uint32_t> tiles(Mt * x.P);
  for (int64_t mb = 0; mb < Mt / kAmxRows; ++mb)
    for (int64_t i = 0; i < steps; ++i) {
      const uint32_t* src = x.pairs.data() + mb * kAmxRows * x.P + i * kAmxPairs;
      uint32_t* dst = tiles.data() + (mb * steps + i) * 256;
      if (transposed) Transpose16x16(reinterpret_cast<const char*>(src), x.P * 4, dst, 16);
      else
        for (int r = 0; r < kAmxRows; ++r) std::memcpy(dst + r * 16, src + r * x.P, 64);
    }
  return tiles;
}

// y[:, n0:n0 + 32] for 32 rows of w [N, K] (K a multiple of 32), xt = TilesOfX(transposed).
void GemmRowsAmx(const uint32_t* xt, const uint16_t* w, float* y, int64_t M, int64_t N,
                 int64_t K, int64_t n0, const uint16_t* next) {
  const int64_t steps = K / 2 / kAmxPairs;
  Lookahead ahead(next, 32 * K * 2, (M + 31) / 32 * steps);
  AmxConfigure();
  alignas(64) float out[32 * 32];
  alignas(64) uint32_t t[32 * 32];
  const char* wn = reinterpret_cast<const char*>(w + n0 * K);
  const TileOperand a{{wn, wn + 16 * K * 2}, K * 2, 64};
  for (int64_t m = 0; m < M; m += 32) {
    const int64_t rows = std::min<int64_t>(32, M - m);
    const char* xm = reinterpret_cast<const char*>(xt + m / 16 * steps * 256);
    const TileOperand b{{xm, xm + steps * 1024}, 64, 1024};
    AmxBlockOf(true, rows > 16, a, b, steps, out, 128, false, [&] { ahead.Step(); });
    for (int hn = 0; hn < 2; ++hn)  // out [n][m] -> t [m][n]
      for (int hm = 0; hm < 2; ++hm)
        Transpose16x16(reinterpret_cast<const char*>(out + hn * 16 * 32 + hm * 16), 128,
                       t + hm * 16 * 32 + hn * 16);
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(y + (m + i) * N + n0, t + i * 32, 32 * sizeof(float));
  }
  _tile_release();
}

// acc [M][Nt] += x[:, k0:k1] @ w[k0:k1, :] for the slice of w [K, N] from row k0 (even), with
// xa = TilesOfX (x's P / 16 p-steps a row of tiles).
void GemmSliceAmx(const uint32_t* xa, int64_t x_steps, const uint16_t* w, float* acc,
                  int64_t Nt, int64_t M, int64_t N, int64_t K, int64_t k0, const uint16_t* next,
                  int64_t next_bytes) {
  const int64_t k1 = std::min(K, k0 + kSliceRows);
  const int64_t steps = RoundUp((k1 - k0 + 1) / 2, kAmxPairs) / kAmxPairs;
  // Row pairs (2p, 2p + 1) interleaved, as tiles [Nt / 16][steps][16 pairs][16 columns].
  thread_local std::vector<uint32_t> panel;
  if (static_cast<int64_t>(panel.size()) < steps * kAmxPairs * Nt)
    panel.resize(steps * kAmxPairs * Nt);
  auto at = [&](int64_t p, int64_t j) {
    return panel.data() + ((j / 16 * steps + p / 16) * 16 + p % 16) * 16 + j % 16;
  };
  for (int64_t p = 0; p < steps * kAmxPairs; ++p) {
    const int64_t k = k0 + 2 * p;
    const uint16_t* r0 = k < k1 ? w + k * N : nullptr;
    const uint16_t* r1 = k + 1 < k1 ? r0 + N : nullptr;
    int64_t j = 0;
    if (r1)
      for (; j + 32 <= N; j += 32) InterleavePairs32(r0 + j, r1 + j, at(p, j), at(p, j + 16));
    for (; j < Nt; ++j)  // the columns left, and zeros past K and N
      *at(p, j) = r0 && j < N ? (r0[j] | static_cast<uint32_t>(r1 ? r1[j] : 0) << 16) : 0u;
  }
  const int64_t first = k0 / 2 / kAmxPairs;  // x's p-step at k0
  Lookahead ahead(next, next_bytes, (Nt + 31) / 32 * ((M + 31) / 32) * steps);
  AmxConfigure();
  for (int64_t n = 0; n < Nt; n += 32)
    for (int64_t m = 0; m < M; m += 32) {
      const char* xm = reinterpret_cast<const char*>(xa + (m / 16 * x_steps + first) * 256);
      const char* wn = reinterpret_cast<const char*>(at(0, n));
      const TileOperand a{{xm, xm + x_steps * 1024}, 64, 1024};
      const TileOperand b{{wn, wn + steps * 1024}, 64, 1024};
      AmxBlockOf(M - m > 16, Nt - n > 16, a, b, steps, acc + m * Nt + n, Nt * 4, true,
                 [&] { ahead.Step(); });
    }
  _tile_release();
}

// GemmAll's bf16 products on AMX: x = RoundedX padded to whole tiles.
void GemmAllAmx(ffi::ThreadPool& pool, const RoundedX& x, const uint16_t* ws, float* ys,
                const Shapes& s, int64_t M, bool contract_last) {
  const int64_t K = s.K, N = s.N, stride = s.M * N, Mt = RoundUp(M, kAmxRows);
  if (contract_last) {
    const bool direct = K % (2 * kAmxPairs) == 0;  // else every unit packs a panel
    const std::vector<uint32_t> xt = direct ? TilesOfX(x, Mt, true) : std::vector<uint32_t>();
    const int64_t panels = (N + kNR - 1) / kNR;
    const PanelUnits<uint16_t> units{ws, N, K, panels};
    ParallelFor(pool, s.G * panels, [&](int64_t u, int64_t next, int64_t) {
      const int64_t g = u / panels, n0 = (u % panels) * kNR;
      if (direct && n0 + kNR <= N)
        GemmRowsAmx(xt.data(), ws + g * N * K, ys + g * stride, M, N, K, n0,
                    units.Weights(next));
      else
        GemmPanelDp<true>(x, ws + g * N * K, ys + g * stride, M, N, K, n0, units.Weights(next),
                          units.Bytes(next), true);
    });
    return;
  }
  // The G x slices slices in `parts` runs of consecutive ones, one per thread, each summed
  // into its own [G, Mt, Nt], then added in order: the same sums whichever thread takes which
  // run (no claiming ahead, or the calling thread would take every run).
  const std::vector<uint32_t> xa = TilesOfX(x, Mt, false);
  const int64_t x_steps = x.P / kAmxPairs, Nt = RoundUp(N, 16);
  const int64_t slices = (K + kSliceRows - 1) / kSliceRows, total = s.G * slices;
  const int64_t parts = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), total);
  std::vector<std::vector<float>> acc(parts, std::vector<float>(s.G * Mt * Nt, 0.f));
  ParallelFor(pool, parts, [&](int64_t part, int64_t, int64_t) {
    const int64_t end = (part + 1) * total / parts;
    for (int64_t i = part * total / parts; i < end; ++i) {
      const int64_t g = i / slices, k0 = i % slices * kSliceRows;
      const int64_t next_k0 = (i + 1) % slices * kSliceRows;  // this run's next slice, if any
      const uint16_t* next = i + 1 < end ? ws + (i + 1) / slices * N * K + next_k0 * N : nullptr;
      GemmSliceAmx(xa.data(), x_steps, ws + g * N * K, acc[part].data() + g * Mt * Nt, Nt, M,
                   N, K, k0, next, (std::min(K, next_k0 + kSliceRows) - next_k0) * N * 2);
    }
  }, parts, /*claim_next=*/false);
  for (int64_t g = 0; g < s.G; ++g)
    for (int64_t m = 0; m < M; ++m) {
      float* dst = ys + g * stride + m * N;
      std::copy_n(acc[0].data() + (g * Mt + m) * Nt, N, dst);
      for (int64_t t = 1; t < parts; ++t) {
        const float* src = acc[t].data() + (g * Mt + m) * Nt;
        for (int64_t n = 0; n < N; ++n) dst[n] += src[n];
      }
    }
}
#endif

// y [G, s.M, N]: rows [0, M) of each g; x's rows past M are never read.
template <typename W>
void GemmAll(ffi::ThreadPool& pool, const float* x, const W* ws, float* ys, const Shapes& s,
             int64_t M, bool contract_last) {
  const int64_t K = s.K, N = s.N, stride = s.M * N;
  const int64_t panels = (N + kNR - 1) / kNR;
  std::unique_ptr<RoundedX> rx;
  if constexpr (std::is_same_v<W, uint16_t>) {
#ifdef GEMMA_APP_AMX
    if (AmxReady())
      return GemmAllAmx(pool, RoundedX(x, M, K, /*with_f32=*/false, kAmxPairs), ws, ys, s, M,
                        contract_last);
#endif
#ifdef GEMMA_APP_DPBF16
    rx = std::make_unique<RoundedX>(x, M, K, /*with_f32=*/false);
    const RoundedX& xb = *rx;
    const PanelUnits<uint16_t> units{ws, N, K, panels};
    ParallelFor(pool, s.G * panels, [&](int64_t u, int64_t next, int64_t) {
      const int64_t g = u / panels, n0 = (u % panels) * kNR;
      if (contract_last)
        GemmPanelDp<true>(xb, ws + g * N * K, ys + g * stride, M, N, K, n0,
                          units.Weights(next), units.Bytes(next), false);
      else
        GemmPanelDp<false>(xb, ws + g * N * K, ys + g * stride, M, N, K, n0, nullptr, 0, false);
    });
    return;
#else
    rx = std::make_unique<RoundedX>(x, M, K);
    x = rx->f32.data();
#endif
  }
  const std::vector<float> xt = TilesOfRows(x, M, K);
  if (!contract_last) return GemmColsBlocks(pool, xt.data(), ws, ys, s, M);
  ParallelFor(pool, s.G * panels, [&](int64_t u, int64_t, int64_t) {
    const int64_t g = u / panels, n0 = (u % panels) * kNR;
    GemmRowsPanel(xt.data(), ws + g * N * K, ys + g * stride, M, N, K, n0);
  });
}

// `rows` (an int32 scalar, data): only x's first `rows` rows are needed, e.g. the real tokens
// of a prompt padded to its bucket length. Their products are computed; y's later rows are
// zeros (finite, so padding never turns into NaN in the KV cache).
ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows,
                ffi::ResultBuffer<ffi::F32> y, bool contract_last) {
  Shapes s;
  ffi::Error err = ReadShapes(x.dimensions(), w.dimensions(), y->dimensions(), layer,
                              contract_last, s);
  if (err.failure()) return err;
  if (rows.element_count() != 1) return ffi::Error::InvalidArgument("rows must be a scalar");
  if (s.M * s.K == 0 || s.G * s.N == 0) return ffi::Error::Success();
  const int64_t used = std::clamp<int64_t>(*rows.typed_data(), 0, s.M);
  float* yd = y->typed_data();
  for (int64_t g = 0; g < s.G; ++g)
    std::fill(yd + (g * s.M + used) * s.N, yd + (g + 1) * s.M * s.N, 0.f);
  if (used == 0) return ffi::Error::Success();
  return WithLayerWeights(w, s, [&](const auto* wl) {
    GemmAll(pool, x.typed_data(), wl, yd, s, used, contract_last);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaAppGemv, Gemv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("contract_last"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaAppGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("contract_last"));

}  // namespace gemma_app
