// What the library's ops share: widening a table value to float32, and the scaled dot products
// of one vector with consecutive rows (a LoRA shrink: x against the rows of A; a decode
// step's scores: q against the rows of K).

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace loraserve {

// A table value widened to float32. A bfloat16 is the top half of a float32: a shift and a bit
// cast, which the compiler vectorises. A float16 goes through c10::Half's conversion.
inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float widen(c10::Half v) { return static_cast<float>(v); }

// out[i] = scale * sum_d v[d] * rows[i * stride + d], for i < n and d < len. Four rows per
// pass: four independent sums, v read once for four.
template <typename T>
inline void scaled_dots(const float* v, const T* rows, int64_t stride, int64_t len, int64_t n,
                        float scale, float* out) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const T* r0 = rows + i * stride;
    const T *r1 = r0 + stride, *r2 = r1 + stride, *r3 = r2 + stride;
    float c0 = 0.f, c1 = 0.f, c2 = 0.f, c3 = 0.f;
#pragma omp simd reduction(+ : c0, c1, c2, c3)
    for (int64_t d = 0; d < len; ++d) {
      const float vd = v[d];
      c0 += vd * widen(r0[d]);
      c1 += vd * widen(r1[d]);
      c2 += vd * widen(r2[d]);
      c3 += vd * widen(r3[d]);
    }
    out[i] = c0 * scale;
    out[i + 1] = c1 * scale;
    out[i + 2] = c2 * scale;
    out[i + 3] = c3 * scale;
  }
  for (; i < n; ++i) {
    const T* r = rows + i * stride;
    float c = 0.f;
#pragma omp simd reduction(+ : c)
    for (int64_t d = 0; d < len; ++d) c += v[d] * widen(r[d]);
    out[i] = c * scale;
  }
}

}  // namespace loraserve
