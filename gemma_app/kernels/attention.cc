// Attention of a decode step on CPU: a few query positions against the used slots of a KV
// cache, read in place:
//
//   o[b, t, k, g, :] = sum_s softmax_s(cap(q[b, t, k, g, :] . kc[l, b, s, k, :])) vc[l, b, s, k, :]
//
// over the slots s in (p - window, p] and [0, S), p = q_pos[b, t] (slot == position, as in
// nn/attention.py). q [B, T, K, G, H] fp32, already scaled and rotated; the caches
// [L, B, S, K, H] fp32 or bf16 (L stacks the scanned decoder's layers, `layer` picks one);
// cap(x) = cap * tanh(x / cap), or x when the `cap` attribute is 0. A query that sees no slot
// gets zeros, as the XLA loop gives.
//
// Why: XLA's chunked loop copies every 256-slot chunk of K (transposed) and V before its dots.
// On Gemma 3 270M at ~160 tokens that is ~0.1 ms of a layer's ~0.45 ms decode step, for 0.3 MB
// of cache. Here each used slot is read once, in memory order.
//
// Work: each (b, k) head's slot range is cut into parts; a part computes, for every query of
// the head, its logits, their max m, sum l of exp(logit - m) and acc = sum exp(.) v, and the
// calling thread merges the parts (flash-decoding). Within a part the logits are exact (no
// online rescaling): three passes over the part's slots (logits, exp, values), whose K and V
// stay in L2 between passes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "pool.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace gemma_app {  // ffi, ParallelFor (pool.h), F32x16, Load16, Sum, Widen (vec.h)
namespace {

constexpr int64_t kMinPartSlots = 128;  // smaller parts cost more to merge than they save
constexpr int64_t kMaxPartSlots = 256;  // a part's K and V (256 KB each at H = 256) stay in L2
constexpr int64_t kPartsPerThread = 2;
constexpr int64_t kSlotBlock = 32;  // slots of V per block of the value pass (32 KB at H = 256)
constexpr int64_t kAheadSlots = 8;  // how far ahead of pass 1 key rows are requested
constexpr int kQ = 4;  // queries per pass: kQ accumulators of 16 lanes, one load of k or v

typedef int32_t I32x16 __attribute__((vector_size(64)));

// e^x for x <= 0 (logits minus their max), 16 lanes: 2^n e^r with n = round(x / ln 2) and
// |r| <= ln 2 / 2, e^r from Cephes' expf polynomial (~1 ulp). Below -87 the result is ~1e-38,
// not 0: a term that small never moves a sum that holds e^0 = 1.
inline F32x16 Exp(F32x16 x) {
  const F32x16 lo = F32x16{} - 87.f;
  x = x < lo ? lo : x;
  const F32x16 magic = F32x16{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const F32x16 n = (x * 1.44269504f + magic) - magic;
  const F32x16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  F32x16 p = F32x16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const I32x16 bits = (__builtin_convertvector(n, I32x16) + 127) << 23;
  F32x16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct Dims {
  int64_t B, T, K, G, H, S;
  int64_t Q() const { return T * G; }  // queries of one (b, k) head
};

// One part of one head: slots [s0, s1) for the queries of head (b, k). Writes, per query,
// m, l and acc [H] into out [Q, H + 2] (m, l, then acc). Queries go kQ at a time, the last
// group padded with copies of its last query, so every inner loop has a constant trip count
// and its accumulators stay in registers.
template <typename C>
void AttendPart(const Dims& d, const float* q, const C* kc, const C* vc, const int64_t* lo,
                const int64_t* hi, float cap, int64_t b, int64_t k, int64_t s0, int64_t s1,
                float* out) {
  const int64_t H = d.H, h16 = H / 16 * 16, Q = d.Q(), n = s1 - s0;
  const int64_t n16 = (n + 15) / 16 * 16;  // a row of `weights`, padded to whole vectors
  const int64_t row = d.K * H;             // cache elements from one slot to the next
  const C* k0 = kc + (b * d.S + s0) * row + k * H;
  const C* v0 = vc + (b * d.S + s0) * row + k * H;
  thread_local std::vector<float> weights;  // [kQ, n16]: logits, then softmax numerators
  weights.resize(static_cast<size_t>(kQ * n16));
  // Query j = t * G + g is q[b, t, k, g, :]; its valid slots are [lo, hi) of its t.
  auto query = [&](int64_t j) { return q + (((b * d.T + j / d.G) * d.K + k) * d.G + j % d.G) * H; };
  I32x16 iota;
  for (int e = 0; e < 16; ++e) iota[e] = e;

  for (int64_t j0 = 0; j0 < Q; j0 += kQ) {
    const int qn = static_cast<int>(std::min<int64_t>(kQ, Q - j0));
    const float* qs[kQ];
    for (int i = 0; i < kQ; ++i) qs[i] = query(j0 + std::min(i, qn - 1));
    // Pass 1: logits, one read of each key row for kQ queries.
    for (int64_t s = 0; s < n; ++s) {
      const C* kr = k0 + s * row;
      if (j0 == 0) {  // first read of the part's K and V: request them ahead of use
        const char* ka = reinterpret_cast<const char*>(kr + kAheadSlots * row);
        const char* va = reinterpret_cast<const char*>(v0 + s * row);
        for (int64_t byte = 0; byte < H * static_cast<int64_t>(sizeof(C)); byte += 64) {
          if (s + kAheadSlots < n) __builtin_prefetch(ka + byte);
          __builtin_prefetch(va + byte, 0, 2);  // for the value pass: into L2
        }
      }
      F32x16 acc[kQ] = {};
      for (int64_t h = 0; h < h16; h += 16) {
        const F32x16 kv = Load16(kr + h);
        for (int i = 0; i < kQ; ++i) acc[i] += Load16(qs[i] + h) * kv;
      }
      for (int i = 0; i < kQ; ++i) {
        float x = Sum(acc[i]);
        for (int64_t h = h16; h < H; ++h) x += qs[i][h] * Widen(kr[h]);
        weights[i * n16 + s] = cap > 0.f ? cap * std::tanh(x / cap) : x;
      }
    }
    // Pass 2: per query, m and l over its valid slots [a, z); the weights become
    // exp(logit - m) there and 0 elsewhere (padding past n included).
    for (int i = 0; i < kQ; ++i) {
      const int64_t t = (j0 + std::min(i, qn - 1)) / d.G;
      const int32_t a = static_cast<int32_t>(std::clamp<int64_t>(lo[b * d.T + t] - s0, 0, n));
      const int32_t z = static_cast<int32_t>(std::clamp<int64_t>(hi[b * d.T + t] - s0, a, n));
      float* w = weights.data() + i * n16;
      const float low = -std::numeric_limits<float>::infinity();
      F32x16 mv = F32x16{} + low;
      for (int64_t s = 0; s < n16; s += 16) {
        const I32x16 slot = iota + static_cast<int32_t>(s);
        mv = (slot >= a) & (slot < z) & (Load16(w + s) > mv) ? Load16(w + s) : mv;
      }
      float m = low;
      for (int e = 0; e < 16; ++e) m = std::max(m, mv[e]);
      const float shift = z > a ? m : 0.f;  // no valid slot: every weight is 0 anyway
      F32x16 lv = {};
      for (int64_t s = 0; s < n16; s += 16) {
        const I32x16 slot = iota + static_cast<int32_t>(s);
        const F32x16 e = (slot >= a) & (slot < z) ? Exp(Load16(w + s) - shift) : F32x16{};
        std::memcpy(w + s, &e, sizeof e);
        lv += e;
      }
      if (i < qn) {
        out[(j0 + i) * (H + 2)] = m;
        out[(j0 + i) * (H + 2) + 1] = Sum(lv);
      }
    }
    // Pass 3: acc = sum_s weight[s] v[s] for kQ queries, kSlotBlock slots at a time: the
    // block's V stays in L1 while 16 lanes of H at a time run over it, with the kQ
    // accumulators in registers (one pass over all n slots per 16 lanes missed L1 each time).
    thread_local std::vector<float> sums;  // [kQ, H16]
    const int64_t H16 = (H + 15) / 16 * 16;
    sums.assign(static_cast<size_t>(kQ * H16), 0.f);
    for (int64_t sb = 0; sb < n; sb += kSlotBlock) {
      const int64_t se = std::min(n, sb + kSlotBlock);
      for (int64_t h = 0; h < H; h += 16) {
        const int64_t width = std::min<int64_t>(16, H - h);
        F32x16 acc[kQ];
        for (int i = 0; i < kQ; ++i) acc[i] = Load16(sums.data() + i * H16 + h);
        for (int64_t s = sb; s < se; ++s) {
          const C* vr = v0 + s * row + h;
          F32x16 vv = {};
          if (width == 16) vv = Load16(vr);
          else
            for (int64_t e = 0; e < width; ++e) vv[e] = Widen(vr[e]);
          for (int i = 0; i < kQ; ++i) acc[i] += weights[i * n16 + s] * vv;
        }
        for (int i = 0; i < kQ; ++i) std::memcpy(sums.data() + i * H16 + h, &acc[i], sizeof acc[i]);
      }
    }
    for (int i = 0; i < qn; ++i)
      std::copy(sums.data() + i * H16, sums.data() + i * H16 + H, out + (j0 + i) * (H + 2) + 2);
  }
}

// o [Q, H] of one head from its parts' (m, l, acc): the parts' sums rescaled to the largest m.
void Merge(const float* parts, int64_t count, int64_t Q, int64_t H, float* o, int64_t o_stride) {
  for (int64_t j = 0; j < Q; ++j) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < count; ++p) m = std::max(m, parts[(p * Q + j) * (H + 2)]);
    float l = 0.f;
    float* oj = o + j * o_stride;
    std::fill(oj, oj + H, 0.f);
    for (int64_t p = 0; p < count; ++p) {
      const float* part = parts + (p * Q + j) * (H + 2);
      if (part[1] == 0.f) continue;  // no valid slot in this part
      const float w = std::exp(part[0] - m);
      l += w * part[1];
      for (int64_t h = 0; h < H; ++h) oj[h] += w * part[2 + h];
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int64_t h = 0; h < H; ++h) oj[h] *= inv;
  }
}

template <typename C>
void Attend(ffi::ThreadPool& pool, const Dims& d, const float* q, const C* kc, const C* vc,
            const int32_t* q_pos, int64_t window, float cap, float* o) {
  // Valid slots of each query: [lo, hi).
  std::vector<int64_t> lo(d.B * d.T), hi(d.B * d.T);
  for (int64_t i = 0; i < d.B * d.T; ++i) {
    const int64_t p = q_pos[i];
    lo[i] = std::clamp<int64_t>(p - window + 1, 0, d.S);
    hi[i] = std::clamp<int64_t>(p + 1, 0, d.S);
  }
  // Each head's span (the union of its queries' ranges) cut into equal parts.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  std::vector<int64_t> start(d.B), stop(d.B), parts(d.B), first_unit(d.B + 1, 0);
  for (int64_t b = 0; b < d.B; ++b) {
    start[b] = *std::min_element(lo.begin() + b * d.T, lo.begin() + (b + 1) * d.T);
    stop[b] = std::max(start[b], *std::max_element(hi.begin() + b * d.T, hi.begin() + (b + 1) * d.T));
    const int64_t span = stop[b] - start[b];
    const int64_t fit = (span + kMaxPartSlots - 1) / kMaxPartSlots;
    const int64_t spread = std::min(span / kMinPartSlots, threads * kPartsPerThread / (d.B * d.K));
    parts[b] = std::max<int64_t>({1, fit, spread});
    first_unit[b + 1] = first_unit[b] + parts[b] * d.K;
  }
  const int64_t units = first_unit[d.B], Q = d.Q(), H = d.H;
  std::vector<float> results(static_cast<size_t>(units * Q * (H + 2)));
  auto run = [&](int64_t u, int64_t, int64_t) {
    const int64_t b = std::upper_bound(first_unit.begin(), first_unit.end(), u) - first_unit.begin() - 1;
    const int64_t r = u - first_unit[b], k = r / parts[b], part = r % parts[b];
    const int64_t span = stop[b] - start[b];
    const int64_t s0 = start[b] + span * part / parts[b];
    const int64_t s1 = start[b] + span * (part + 1) / parts[b];
    AttendPart(d, q, kc, vc, lo.data(), hi.data(), cap, b, k, s0, s1,
               results.data() + u * Q * (H + 2));
  };
  ParallelFor(pool, units, run);
  // o [B, T, K, G, H]: query j = t * G + g of head (b, k) sits at ((b * T + t) * K + k) * G + g.
  std::vector<float> merged(static_cast<size_t>(Q * H));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t k = 0; k < d.K; ++k) {
      const int64_t u = first_unit[b] + k * parts[b];
      Merge(results.data() + u * Q * (H + 2), parts[b], Q, H, merged.data(), H);
      for (int64_t t = 0; t < d.T; ++t)
        std::copy(merged.data() + t * d.G * H, merged.data() + (t + 1) * d.G * H,
                  o + ((b * d.T + t) * d.K + k) * d.G * H);
    }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer kc,
                           ffi::AnyBuffer vc, ffi::Buffer<ffi::S32> layer,
                           ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> window,
                           ffi::ResultBuffer<ffi::F32> o, float cap) {
  const auto qd = q.dimensions(), kd = kc.dimensions(), vd = vc.dimensions();
  if (qd.size() != 5 || kd.size() != 5 || vd.size() != 5)
    return ffi::Error::InvalidArgument("q must be [B, T, K, G, H], the caches [L, B, S, K, H]");
  const Dims d{qd[0], qd[1], qd[2], qd[3], qd[4], kd[2]};
  for (int i = 0; i < 5; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("the K and V caches differ in shape");
  if (kd[1] != d.B || kd[3] != d.K || kd[4] != d.H)
    return ffi::Error::InvalidArgument("q and the caches differ in batch, heads or head width");
  const auto pd = q_pos.dimensions();
  if (pd.size() != 2 || pd[0] != d.B || pd[1] != d.T)
    return ffi::Error::InvalidArgument("q_pos must be [B, T]");
  if (layer.element_count() != 1 || window.element_count() != 1)
    return ffi::Error::InvalidArgument("layer and window must be scalars");
  const int64_t l = *layer.typed_data();
  if (l < 0 || l >= kd[0]) return ffi::Error::InvalidArgument("layer index out of range");
  if (kc.element_type() != vc.element_type())
    return ffi::Error::InvalidArgument("the K and V caches differ in dtype");
  if (d.B * d.T * d.K * d.G * d.H == 0) return ffi::Error::Success();
  const int64_t offset = l * d.B * d.S * d.K * d.H;
  const int64_t win = std::max<int64_t>(1, *window.typed_data());
  auto run = [&](auto* k, auto* v) {
    Attend(pool, d, q.typed_data(), k + offset, v + offset, q_pos.typed_data(), win, cap,
           o->typed_data());
  };
  switch (kc.element_type()) {
    case ffi::DataType::F32:
      run(static_cast<const float*>(kc.untyped_data()), static_cast<const float*>(vc.untyped_data()));
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      run(static_cast<const uint16_t*>(kc.untyped_data()),
          static_cast<const uint16_t*>(vc.untyped_data()));
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("the caches must be float32 or bfloat16");
  }
}

// A KV cache's buffer, left as the allocator hands it out. Zeroing a new conversation's cache
// (Gemma 3 270M: 151 MB) took ~15 ms of its first token's ~95 ms at bf16, and no slot is read
// before it is written: this kernel reads only slots up to each query's position, and XLA's
// loop selects zeros for the V slots past them (nn/attention.py, _attention_loop).
ffi::Error Unwritten(ffi::Result<ffi::AnyBuffer>) { return ffi::Error::Success(); }

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaAppUnwritten, Unwritten,
                              ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaAppDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("cap"));

}  // namespace gemma_app
