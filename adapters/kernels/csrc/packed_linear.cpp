// loraserve_cpu::packed_linear -- F.linear(x, weight, bias) through a packed twin of weight.
//
// The native twin of loraserve::packed_linear (adapters/models/packed.py), with the same
// contract: the op takes the ordinary dense weight (what the compiler traces) and looks its
// packed twin up at run time. A Python custom op spends ~45 us per call in dispatch, against
// ~300 us for the product at hidden 512 and batch 32, and a decode step makes one call per
// Linear (43 at hidden 512, 211 for SmolLM2); here the lookup is a map probe under a mutex.
//
// The GEMM. At decode shapes (M = the batch, a few dozen rows) the product is small and its
// weight is read from memory once per step: SmolLM2-135M's Linears are 537 MB, larger than the
// caches, so every weight comes from DRAM. oneDNN's blocked GEMM reads it as it computes and
// does not hide that read (gate/up of SmolLM2 at batch 32, 2 Xeon cores: 0.46 ms with the
// weight in cache, 0.69 ms streamed, the bytes alone 0.27 ms). Where the compiler targets
// AVX-512, this file has its own: the weight packed into panels of 48 output columns, each
// panel K rows of 48 floats (a panel is contiguous, 110 KB at K = 576: it stays in L2 while
// every row tile reads it), a tile of 8 rows x 48 columns in 24 zmm accumulators (per k: three
// loads of the panel, eight broadcasts of x, 24 FMAs), panels split over torch's threads, and
// the thread's next panel prefetched into L2 while this one computes, spread over its k loop.
// Same shapes, same machine: 0.35 ms cached, 0.51 ms streamed (`bench/engine.py` times it
// with the others in `gemm_floor`). Above kLargeM rows (a prefill) the BLAS on the dense
// weight is as fast or faster (the tile re-reads x for every panel), and the op calls it.
// Without AVX-512 the twin is oneDNN's blocked layout and the op oneDNN's linear, as before.
//
// Registry: (data_ptr, sizes, strides, dtype) of a dense weight -> (a weak reference to the
// weight, its version, its packed twin). A weight that is gone (its memory reused by another
// tensor) or was written in place since (its version bumped) is packed again. Entries whose
// weight was freed are dropped whenever one is added, so a process that loads models again
// (tests) does not keep dead twins.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LORASERVE_OWN_GEMM 1
#else
#define LORASERVE_OWN_GEMM 0
#endif

namespace {

using Key = std::tuple<const void*, std::vector<int64_t>, std::vector<int64_t>, int>;

struct Entry {
  c10::weak_intrusive_ptr<c10::TensorImpl> source;
  int64_t version;
  at::Tensor packed;
};

std::mutex registry_lock;
std::map<Key, Entry>& registry() {
  static auto* entries = new std::map<Key, Entry>();  // never destroyed: no exit-order issues
  return *entries;
}

Key key_of(const at::Tensor& w) {
  return Key{w.data_ptr(), w.sizes().vec(), w.strides().vec(), static_cast<int>(w.scalar_type())};
}

#if LORASERVE_OWN_GEMM

constexpr int64_t kPanel = 48;   // output columns per panel: three zmm
constexpr int64_t kRows = 8;     // rows per tile
constexpr int64_t kLargeM = 512; // above this many rows, the BLAS on the dense weight
constexpr int64_t kLine = 64;    // bytes per cache line

// weight [N, K] -> panels [ceil(N / 48), K, 48]: panel p, row k holds weight[48p .. 48p+47, k]
// (zeros past N).
at::Tensor pack(const at::Tensor& weight) {
  const at::Tensor w = weight.detach().contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + kPanel - 1) / kPanel;
  at::Tensor out = at::zeros({P, K, kPanel}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t cols = std::min(kPanel, N - p * kPanel);
      float* panel = dst + p * K * kPanel;
      for (int64_t c = 0; c < cols; ++c) {
        const float* column = src + (p * kPanel + c) * K;
        for (int64_t k = 0; k < K; ++k) panel[k * kPanel + c] = column[k];
      }
    }
  });
  return out;
}

inline __mmask16 lanes(int64_t n) {  // the first n of 16 lanes (n may be <= 0 or >= 16)
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// y[r, 0:cols] = bias[0:cols] + sum_k x[r, k] * panel[k, 0:cols] for the tile's R rows; while
// it runs, prefetch `lines` cache lines from `ahead` into L2, spread evenly over its k loop.
template <int R>
void tile(const float* __restrict x, int64_t K, const float* __restrict panel, float* y,
          int64_t ldy, int64_t cols, const float* bias, const char* ahead, int64_t lines) {
  __m512 acc[R][3];
  for (int j = 0; j < 3; ++j) {
    const __m512 b = bias ? _mm512_maskz_loadu_ps(lanes(cols - 16 * j), bias + 16 * j)
                          : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) acc[r][j] = b;
  }
  const int64_t per_k = lines > 0 ? (lines + K - 1) / K : 0;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t i = 0; i < per_k; ++i) {
      const int64_t line = k * per_k + i;
      if (line < lines) _mm_prefetch(ahead + line * kLine, _MM_HINT_T1);
    }
    const float* wk = panel + k * kPanel;
    const __m512 w0 = _mm512_load_ps(wk), w1 = _mm512_load_ps(wk + 16),
                 w2 = _mm512_load_ps(wk + 32);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * K + k]);
      acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(xv, w2, acc[r][2]);
    }
  }
  for (int j = 0; j < 3; ++j) {
    const __mmask16 m = lanes(cols - 16 * j);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy + 16 * j, m, acc[r][j]);
  }
}

using Tile = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t,
                      const float*, const char*, int64_t);
constexpr Tile kTiles[kRows + 1] = {nullptr,  tile<1>, tile<2>, tile<3>, tile<4>,
                                    tile<5>, tile<6>, tile<7>, tile<8>};

// y [M, N] = x [M, K] @ weight^T + bias, weight as its panels.
void panel_gemm(const float* x, const float* panels, const float* bias, float* y, int64_t M,
                int64_t K, int64_t N) {
  const int64_t P = (N + kPanel - 1) / kPanel, size = K * kPanel;
  const int64_t tiles = (M + kRows - 1) / kRows;
  const int64_t panel_lines = size * int64_t(sizeof(float)) / kLine;
  at::parallel_for(0, P, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const float* panel = panels + p * size;
      const int64_t cols = std::min(kPanel, N - p * kPanel);
      const float* b = bias ? bias + p * kPanel : nullptr;
      // this thread's next panel, its lines shared out among this panel's tiles
      const char* next = p + 1 < hi ? reinterpret_cast<const char*>(panel + size) : nullptr;
      const int64_t share = (panel_lines + tiles - 1) / tiles;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t r0 = t * kRows, rows = std::min(kRows, M - r0);
        const int64_t first = std::min(t * share, panel_lines);
        const int64_t lines = next ? std::min(share, panel_lines - first) : 0;
        kTiles[rows](x + r0 * K, K, panel, y + r0 * N + p * kPanel, N, cols, b,
                     next ? next + first * kLine : nullptr, lines);
      }
    }
  });
}

#else

at::Tensor pack(const at::Tensor& weight) {  // oneDNN's blocked layout for 32 rows
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_reorder_linear_weight", "")
                       .typed<at::Tensor(const at::Tensor&, std::optional<int64_t>)>();
  return op.call(weight.detach(), 32);
}

#endif

at::Tensor packed_weight(const at::Tensor& weight) {
  const Key key = key_of(weight);
  const int64_t version = weight._version();
  std::lock_guard<std::mutex> guard(registry_lock);
  auto& entries = registry();
  auto found = entries.find(key);
  if (found != entries.end()) {
    auto alive = found->second.source.lock();  // null: freed, the memory since reused
    if (alive && alive->data() == weight.data_ptr() && found->second.version == version) {
      return found->second.packed;
    }
  }
  for (auto it = entries.begin(); it != entries.end();) {  // drop the twins of freed weights
    it = it->second.source.expired() ? entries.erase(it) : std::next(it);
  }
  Entry entry{c10::weak_intrusive_ptr<c10::TensorImpl>(weight.getIntrusivePtr()), version,
              pack(weight)};
  at::Tensor packed = entry.packed;
  entries.insert_or_assign(key, std::move(entry));
  return packed;
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "packed_linear runs on CPU tensors");
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1),
              "packed_linear: x's last dimension does not fit the weight");
#if LORASERVE_OWN_GEMM
  const int64_t K = weight.size(1), N = weight.size(0), M = K ? x.numel() / K : 0;
  const bool f32 = x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                   (!bias || bias->scalar_type() == at::kFloat);
  // an inference tensor has no version counter to tell an in-place write by: no twin
  if (!f32 || M > kLargeM || M == 0 || K == 0 || weight.is_inference()) {
    return at::linear(x, weight, bias);
  }
  const at::Tensor panels = packed_weight(weight);
  const at::Tensor xc = x.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  panel_gemm(xc.data_ptr<float>(), panels.data_ptr<float>(), bias ? b.data_ptr<float>() : nullptr,
             y.data_ptr<float>(), M, K, N);
  return y;
#else
  static auto linear =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>)>();
  return linear.call(x, packed_weight(weight), bias, "none",
                     c10::List<std::optional<at::Scalar>>(), c10::string_view(""));
#endif
}

// How many packed twins the registry holds (tests), and forgetting them all.
int64_t packed_count() {
  std::lock_guard<std::mutex> guard(registry_lock);
  return static_cast<int64_t>(registry().size());
}

void forget_packed() {
  std::lock_guard<std::mutex> guard(registry_lock);
  registry().clear();
}

// Which GEMM the op runs: "panels" (this file's, AVX-512) or "onednn".
std::string packed_kernel() { return LORASERVE_OWN_GEMM ? "panels" : "onednn"; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraserve_cpu, m) {
  m.def("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("packed_count() -> int", &packed_count);
  m.def("forget_packed() -> ()", &forget_packed);
  m.def("packed_kernel() -> str", &packed_kernel);
}

TORCH_LIBRARY_IMPL(loraserve_cpu, CPU, m) { m.impl("packed_linear", &packed_linear); }
