// loraserve::lora_rows -- the LoRA delta of a decode step on CPU, one row per sequence.
//
//   out[b] = y[b] + (x[b] @ A[s_b, :r]^T) @ B[s_b, :r]     with s_b = slots[b]; slot 0: y[b]
//
// or, for rows that mix adapters (slots [n, K], weights [n, K]; a member on slot 0 is padding):
//
//   out[b] = y[b] + sum_k w_bk * (x[b] @ A[s_bk, :r]^T) @ B[s_bk, :r]
//
// x [n, in], y [n, out], A [S, R, in], B [S, R, out] (the slot tables as BatchedLoRALinear
// stores them: A transposed, the scale folded into B), slots int64. x, y and the result are
// float32; the tables are float32, or bfloat16 / float16 (`--lora-dtype`: half the bytes to
// stream), widened to float32 as they are read, so every product accumulates in float32. The
// weight multiplies the rank-r intermediate, so a weight of 1 gives the unweighted result bit
// for bit.
// Each row reads its own slot's r x in and r x out blocks straight from the tables: no gathered
// copy is written and read again, so the step streams each adapter once (the byte floor). Rows
// are split over torch's intra-op threads. Both products take four ranks per pass (four
// independent sums over x; out[b] read and written once per four rows of B): at hidden 512 the
// op streams the tables at ~17.5 GB/s, against ~14.5 one rank at a time and ~24 for a plain
// read of one large tensor on this 2-core machine. Four consecutive rows routed alike (a batch
// on one adapter) go as a tile: each block of A and B is read once for the four, sixteen sums
// per pass (hidden 2048, 32 rows on one adapter, a step's 28 calls: 2.3-2.6 -> 1.6-1.9 ms). y
// may be a slice of a wider output (fused projections): its rows are read in place. Built and
// loaded by loraserve.adapters.kernels.cpu.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dots.h"

namespace {

using loraserve::widen;

constexpr int64_t kTile = 4;      // rows on the same slots computed together
constexpr int64_t kColumns = 256;  // output columns a tile's expand updates at a time

// One row: out[b] = y[b] + sum_m w_bm * (x[b] @ A[s_bm, :r]^T) @ B[s_bm, :r].
template <typename T>
void row(const float* xb, const float* yb, const T* Ap, const T* Bp, const int64_t* sb,
         const float* wb, float* ob, int64_t in, int64_t o, int64_t R, int64_t K, int64_t r,
         float* h) {
  std::copy(yb, yb + o, ob);
  for (int64_t m = 0; m < K; ++m) {
    const int64_t s = sb[m];
    if (s == 0 || r == 0) continue;  // slot 0 is all zeros: the base model (or padding)
    const float w = wb ? wb[m] : 1.f;
    const T* As = Ap + s * R * in;
    const T* Bs = Bp + s * R * o;
    loraserve::scaled_dots(xb, As, in, in, r, w, h);  // shrink: h = w * A[s, :r] x
    int64_t k = 0;
    for (; k + 4 <= r; k += 4) {  // expand, four ranks at a time: out[b] updated once per four
      const float h0 = h[k], h1 = h[k + 1], h2 = h[k + 2], h3 = h[k + 3];
      const T* b0 = Bs + k * o;
      const T* b1 = b0 + o;
      const T* b2 = b1 + o;
      const T* b3 = b2 + o;
#pragma omp simd
      for (int64_t j = 0; j < o; ++j) {
        ob[j] += h0 * widen(b0[j]) + h1 * widen(b1[j]) + h2 * widen(b2[j]) + h3 * widen(b3[j]);
      }
    }
    for (; k < r; ++k) {
      const float hk = h[k];
      const T* bk = Bs + k * o;
#pragma omp simd
      for (int64_t j = 0; j < o; ++j) ob[j] += hk * widen(bk[j]);
    }
  }
}

// kTile consecutive rows routed to the same slots (a batch on one adapter): each block of A
// and B is read once for the tile, not once per row. Weights may differ per row.
template <typename T>
void tile(const float* xb, const float* yb, int64_t ys, const T* Ap, const T* Bp,
          const int64_t* sb, const float* wb, float* ob, int64_t in, int64_t o, int64_t R,
          int64_t K, int64_t r, float* h) {
  const float *x0 = xb, *x1 = x0 + in, *x2 = x1 + in, *x3 = x2 + in;
  float *o0 = ob, *o1 = o0 + o, *o2 = o1 + o, *o3 = o2 + o;
  for (int64_t t = 0; t < kTile; ++t) std::copy(yb + t * ys, yb + t * ys + o, ob + t * o);
  for (int64_t m = 0; m < K; ++m) {
    const int64_t s = sb[m];
    if (s == 0 || r == 0) continue;
    float w[kTile];
    for (int64_t t = 0; t < kTile; ++t) w[t] = wb ? wb[t * K + m] : 1.f;
    const T* As = Ap + s * R * in;
    const T* Bs = Bp + s * R * o;
    int64_t k = 0;
    for (; k + 4 <= r; k += 4) {  // shrink: four ranks by four rows (16 sums) per pass
      const T* a0 = As + k * in;
      const T *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;
      float c00 = 0.f, c01 = 0.f, c02 = 0.f, c03 = 0.f, c10 = 0.f, c11 = 0.f, c12 = 0.f,
            c13 = 0.f, c20 = 0.f, c21 = 0.f, c22 = 0.f, c23 = 0.f, c30 = 0.f, c31 = 0.f,
            c32 = 0.f, c33 = 0.f;
#pragma omp simd reduction(+ : c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, \
                               c30, c31, c32, c33)
      for (int64_t i = 0; i < in; ++i) {
        const float v0 = widen(a0[i]), v1 = widen(a1[i]), v2 = widen(a2[i]), v3 = widen(a3[i]);
        const float y0 = x0[i], y1 = x1[i], y2 = x2[i], y3 = x3[i];
        c00 += y0 * v0, c01 += y0 * v1, c02 += y0 * v2, c03 += y0 * v3;
        c10 += y1 * v0, c11 += y1 * v1, c12 += y1 * v2, c13 += y1 * v3;
        c20 += y2 * v0, c21 += y2 * v1, c22 += y2 * v2, c23 += y2 * v3;
        c30 += y3 * v0, c31 += y3 * v1, c32 += y3 * v2, c33 += y3 * v3;
      }
      const float sums[kTile][4] = {
          {c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
      for (int64_t t = 0; t < kTile; ++t) {
        for (int64_t q = 0; q < 4; ++q) h[t * r + k + q] = sums[t][q] * w[t];
      }
    }
    for (; k < r; ++k) {  // the ranks past a multiple of four, one at a time
      const T* a = As + k * in;
      float c0 = 0.f, c1 = 0.f, c2 = 0.f, c3 = 0.f;
#pragma omp simd reduction(+ : c0, c1, c2, c3)
      for (int64_t i = 0; i < in; ++i) {
        const float ai = widen(a[i]);
        c0 += x0[i] * ai, c1 += x1[i] * ai, c2 += x2[i] * ai, c3 += x3[i] * ai;
      }
      h[k] = c0 * w[0], h[r + k] = c1 * w[1], h[2 * r + k] = c2 * w[2], h[3 * r + k] = c3 * w[3];
    }
    for (int64_t j0 = 0; j0 < o; j0 += kColumns) {  // expand: a block of columns in L1
      const int64_t j1 = std::min(o, j0 + kColumns);
      int64_t q = 0;
      for (; q + 4 <= r; q += 4) {  // four ranks into the four rows per pass
        const T* b0 = Bs + q * o;
        const T *b1 = b0 + o, *b2 = b1 + o, *b3 = b2 + o;
        const float* g0 = h + q;
        const float *g1 = g0 + r, *g2 = g1 + r, *g3 = g2 + r;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          const float v0 = widen(b0[j]), v1 = widen(b1[j]), v2 = widen(b2[j]), v3 = widen(b3[j]);
          o0[j] += g0[0] * v0 + g0[1] * v1 + g0[2] * v2 + g0[3] * v3;
          o1[j] += g1[0] * v0 + g1[1] * v1 + g1[2] * v2 + g1[3] * v3;
          o2[j] += g2[0] * v0 + g2[1] * v1 + g2[2] * v2 + g2[3] * v3;
          o3[j] += g3[0] * v0 + g3[1] * v1 + g3[2] * v2 + g3[3] * v3;
        }
      }
      for (; q < r; ++q) {
        const T* bq = Bs + q * o;
        const float h0 = h[q], h1 = h[r + q], h2 = h[2 * r + q], h3 = h[3 * r + q];
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          const float bj = widen(bq[j]);
          o0[j] += h0 * bj, o1[j] += h1 * bj, o2[j] += h2 * bj, o3[j] += h3 * bj;
        }
      }
    }
  }
}

// Every row, split over threads; ys: y's row stride (a slice of a wider output is read in
// place).
template <typename T>
void rows(const float* xp, const float* yp, int64_t ys, const T* Ap, const T* Bp,
          const int64_t* sp, const float* wp, float* op, int64_t n, int64_t in, int64_t o,
          int64_t R, int64_t K, int64_t r) {
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> h(kTile * std::max<int64_t>(r, 1));
    for (int64_t b = lo; b < hi;) {
      const float* wb = wp ? wp + b * K : nullptr;
      int64_t run = 1;  // the rows from b on routed as b is, up to a tile
      while (run < kTile && b + run < hi &&
             std::equal(sp + b * K, sp + (b + 1) * K, sp + (b + run) * K)) {
        ++run;
      }
      if (run == kTile) {
        tile(xp + b * in, yp + b * ys, ys, Ap, Bp, sp + b * K, wb, op + b * o, in, o, R, K, r,
             h.data());
        b += kTile;
      } else {
        row(xp + b * in, yp + b * ys, Ap, Bp, sp + b * K, wb, op + b * o, in, o, R, K, r,
            h.data());
        b += 1;
      }
    }
  });
}

at::Tensor lora_rows(const at::Tensor& x, const at::Tensor& y, const at::Tensor& A,
                     const at::Tensor& B, const at::Tensor& slots, int64_t r,
                     const c10::optional<at::Tensor>& weights) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && A.dim() == 3 && B.dim() == 3 &&
                  (slots.dim() == 1 || slots.dim() == 2),
              "lora_rows wants x [n, in], y [n, out], A [S, R, in], B [S, R, out], "
              "slots [n] or [n, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat,
              "lora_rows wants float32 x and y");
  const auto table = A.scalar_type();
  TORCH_CHECK(table == B.scalar_type() &&
                  (table == at::kFloat || table == at::kBFloat16 || table == at::kHalf),
              "lora_rows wants both tables float32, bfloat16 or float16");
  TORCH_CHECK(slots.scalar_type() == at::kLong, "lora_rows wants int64 slots");
  TORCH_CHECK(x.device().is_cpu(), "lora_rows runs on CPU tensors");
  const int64_t n = x.size(0), in = x.size(1), o = y.size(1), S = A.size(0), R = A.size(1);
  const int64_t K = slots.dim() == 2 ? slots.size(1) : 1;
  TORCH_CHECK(y.size(0) == n && slots.size(0) == n, "lora_rows: x, y and slots differ in rows");
  TORCH_CHECK(A.size(2) == in && B.size(0) == S && B.size(1) == R && B.size(2) == o,
              "lora_rows: the tables do not fit x and y");
  TORCH_CHECK(0 <= r && r <= R, "lora_rows: rank outside the tables' max rank");
  at::Tensor wc;
  if (weights.has_value()) {
    wc = weights->contiguous();
    TORCH_CHECK(wc.scalar_type() == at::kFloat && wc.numel() == n * K,
                "lora_rows: weights must be float32, one per slot");
  }

  // y may be a slice of a wider output (fused projections): read in place, row by row
  const at::Tensor xc = x.contiguous(), Ac = A.contiguous();
  const at::Tensor yc = y.stride(1) == 1 && y.stride(0) >= o ? y : y.contiguous();
  const at::Tensor Bc = B.contiguous(), sc = slots.contiguous();
  at::Tensor out = at::empty({n, o}, y.options());
  const int64_t* sp = sc.data_ptr<int64_t>();
  for (int64_t i = 0; i < n * K; ++i) {  // a bad slot is an error, never an out-of-bounds read
    TORCH_CHECK(0 <= sp[i] && sp[i] < S, "lora_rows: slot ", sp[i], " outside 0..", S - 1);
  }
  const float* wp = weights.has_value() ? wc.data_ptr<float>() : nullptr;
  const float *xp = xc.data_ptr<float>(), *yp = yc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ys = yc.stride(0);
  if (table == at::kBFloat16) {
    rows(xp, yp, ys, Ac.data_ptr<c10::BFloat16>(), Bc.data_ptr<c10::BFloat16>(), sp, wp, op, n,
         in, o, R, K, r);
  } else if (table == at::kHalf) {
    rows(xp, yp, ys, Ac.data_ptr<c10::Half>(), Bc.data_ptr<c10::Half>(), sp, wp, op, n, in, o, R,
         K, r);
  } else {
    rows(xp, yp, ys, Ac.data_ptr<float>(), Bc.data_ptr<float>(), sp, wp, op, n, in, o, R, K, r);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(loraserve_cpu, m) {
  m.def(
      "lora_rows(Tensor x, Tensor y, Tensor A, Tensor B, Tensor slots, SymInt r, "
      "Tensor? weights=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraserve_cpu, CPU, m) { m.impl("lora_rows", &lora_rows); }
