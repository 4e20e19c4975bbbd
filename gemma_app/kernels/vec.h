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

inline float Widen(float v) { return v; }
inline float Widen(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline F32x16 Load16(const float* p) {
  F32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline F32x16 Load16(const uint16_t* p) {
  U16x16 h;
  std::memcpy(&h, p, sizeof h);
  const U32x16 u = __builtin_convertvector(h, U32x16) << 16;
  F32x16 v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// The sum of the 16 lanes as a tree (halves, quarters, ...): 4 dependent adds, not 15.
inline float Sum(F32x16 v) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  float s[16];
  std::memcpy(s, &v, sizeof s);
  for (int width = 8; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) s[i] += s[i + width];
  return s[0];
#endif
}

}  // namespace gemma_app
