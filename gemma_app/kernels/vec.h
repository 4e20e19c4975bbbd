// 16-lane fp32 vectors for the CPU kernels (gemv.cc, attention.cc), as GCC/Clang vector
// extensions: one register on AVX-512, two on AVX2 or NEON, so every machine gets vector code
// from the same source. bf16 values are the top halves of fp32 ones.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace gemma_app {

typedef float F32x16 __attribute__((vector_size(64)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef float F32x8 __attribute__((vector_size(32)));  // one AVX2 register
typedef uint32_t U32x8 __attribute__((vector_size(32)));
typedef uint16_t U16x8 __attribute__((vector_size(16)));

// The integer vectors that widen bf16 values into a vector V of fp32 lanes.
template <typename V>
struct WidenTypes;
template <>
struct WidenTypes<F32x16> {
  typedef U16x16 Half;
  typedef U32x16 Word;
};
template <>
struct WidenTypes<F32x8> {
  typedef U16x8 Half;
  typedef U32x8 Word;
};

inline float Widen(float v) { return v; }
inline float Widen(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// A vector V of fp32 lanes from as many floats, or from as many bf16 values (widened).
template <typename V>
inline V LoadAs(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V>
inline V LoadAs(const uint16_t* p) {
  typedef typename WidenTypes<V>::Half Half;
  typedef typename WidenTypes<V>::Word Word;
  Half h;
  std::memcpy(&h, p, sizeof h);
  const Word u = __builtin_convertvector(h, Word) << 16;
  V v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline F32x16 Load16(const float* p) { return LoadAs<F32x16>(p); }
inline F32x16 Load16(const uint16_t* p) { return LoadAs<F32x16>(p); }

// The sum of V's lanes as a tree (halves, quarters, ...): log2(lanes) dependent adds.
template <typename V>
inline float SumTree(V v) {
  constexpr int kN = sizeof(V) / sizeof(float);
  float s[kN];
  std::memcpy(s, &v, sizeof s);
  for (int width = kN / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) s[i] += s[i + width];
  return s[0];
}
inline float Sum(F32x16 v) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  return SumTree(v);
#endif
}

}  // namespace gemma_app
