// loraserve_cpu::decode_attention -- a decode step's attention on CPU: one query per row.
//
//   out[b, h] = softmax_t(q[b, h] . k[b, g, t] / sqrt(D), t where mask[b, t]) @ v[b, g, :]
//
// with g = h / (H / Hkv): the query heads that share a KV head read it in HF's repeat_kv order.
// q [B, H, 1, D]; k, v [B, Hkv, T, D] (views of the KV cache: any strides with the last one 1);
// mask bool [B, 1, 1, T]; all float32. Returns [B, H, 1, D], contiguous. A masked position adds
// nothing, even a non-finite value (torch's softmax(...) @ v would pass 0 * NaN on).
//
// Why a kernel of our own: a decode step's attention is bound by the bytes of K and V it reads
// from the cache (hidden 512, batch 32, 48 positions: 6.3 MB a layer, not in any cache by the
// time the layer runs). Written as two batched products around a softmax, inductor lowers the
// product with one query row (as many KV heads as query heads) to pointwise loops with a
// reduction, and with several query heads per KV head writes the scores out and reads them
// back. Here each (row, KV head) is one task: its K and V rows are read once, straight from the
// cache, for all the query heads that share them; the scores stay in a small buffer; the task
// after next is prefetched into L2 while this one computes; and the scores take four K rows
// per pass. Six such layers, cold, on 2 Xeon cores: 1.71 ms against 1.40 ms of bytes at the
// machine's 26.9 GB/s, where torch's products took 2.7-3.0 ms and inductor's loops 2.8-3.5.
// Tasks are split over torch's intra-op threads. Built and loaded by
// loraserve.adapters.kernels.cpu.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "dots.h"

namespace {

void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
            at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  const int64_t Hkv = k.size(1), T = k.size(2), G = H / Hkv;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t qb = q.stride(0), qh = q.stride(1);
  const int64_t kb = k.stride(0), kh = k.stride(1), kt = k.stride(2);
  const int64_t vb = v.stride(0), vh = v.stride(1), vt = v.stride(2);
  const int64_t mb = mask.stride(0), mt = mask.stride(3);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, B * Hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scores(G * T);  // [G, T]
    std::vector<float> acc(G * D);     // [G, D]
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv;
      if (task + 2 < hi) {  // the task after next: its K and V on their way to L2
        const int64_t nb = (task + 2) / Hkv, ng = (task + 2) % Hkv;
        const char* nk = reinterpret_cast<const char*>(kp + nb * kb + ng * kh);
        const char* nv = reinterpret_cast<const char*>(vp + nb * vb + ng * vh);
        for (int64_t t = 0; t < T; ++t) {
          for (int64_t off = 0; off < D * 4; off += 64) {
            __builtin_prefetch(nk + t * kt * 4 + off, 0, 2);
            __builtin_prefetch(nv + t * vt * 4 + off, 0, 2);
          }
        }
      }
      const float* qg = qp + b * qb + g * G * qh;  // query head g * G + j at qg + j * qh
      const float* kg = kp + b * kb + g * kh;
      const float* vg = vp + b * vb + g * vh;
      const bool* m = mp + b * mb;
      for (int64_t j = 0; j < G; ++j) {  // scores, four K rows per pass (four independent sums)
        const float* qj = qg + j * qh;
        float* s = scores.data() + j * T;
        loraserve::scaled_dots(qj, kg, kt, D, T, scale, s);
        for (int64_t t = 0; t < T; ++t) {
          if (!m[t * mt]) s[t] = kNegInf;
        }
      }
      for (int64_t j = 0; j < G; ++j) {  // softmax over t, in place
        float* s = scores.data() + j * T;
        const float top = *std::max_element(s, s + T);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < T; ++t) {
          s[t] = expf(s[t] - top);  // a masked score gives 0 (all masked: NaN, as torch)
          sum += s[t];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < T; ++t) s[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < T; ++t) {  // probabilities @ V, each V row read once
        const float* vr = vg + t * vt;
        for (int64_t j = 0; j < G; ++j) {
          const float p = scores[j * T + t];
          if (p == 0.f) continue;  // masked: adds nothing (torch's 0 * a non-finite V would)
          float* a = acc.data() + j * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * vr[d];
        }
      }
      for (int64_t j = 0; j < G; ++j) {
        std::copy(acc.begin() + j * D, acc.begin() + (j + 1) * D, op + ((b * H) + g * G + j) * D);
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4,
              "decode_attention wants q [B, H, 1, D], k and v [B, Hkv, T, D], "
              "mask [B, 1, 1, T]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat,
              "decode_attention wants float32 q, k and v");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "decode_attention wants a bool mask");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
                  mask.device().is_cpu(),
              "decode_attention runs on CPU tensors");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  const int64_t Hkv = k.size(1), T = k.size(2);
  TORCH_CHECK(q.size(2) == 1, "decode_attention takes one query per row");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "decode_attention: ", H, " query heads over ", Hkv,
              " KV heads");
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == T &&
                  k.size(3) == D && v.size(3) == D,
              "decode_attention: q, k and v do not fit");
  TORCH_CHECK(mask.size(0) == B && mask.size(1) == 1 && mask.size(2) == 1 && mask.size(3) == T,
              "decode_attention: the mask does not fit k");
  // the inner loops run along D: a view whose last dimension is strided is copied first
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(3) == 1 ? v : v.contiguous();
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  if (B > 0 && T > 0) attend(qc, kc, vc, mask, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraserve_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraserve_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
