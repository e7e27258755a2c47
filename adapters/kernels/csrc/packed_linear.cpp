// loraserve_cpu::packed_linear -- F.linear(x, weight, bias) through weight's oneDNN-packed twin.
//
// The native twin of loraserve::packed_linear (adapters/models/packed.py), with the same
// contract: the op takes the ordinary dense weight (what the compiler traces) and looks its
// packed twin up at run time. A Python custom op spends ~45 us per call in dispatch, against
// ~300 us for the product at hidden 512 and batch 32, and a decode step makes one call per
// Linear (43 at hidden 512, 211 for SmolLM2); here the lookup is a map probe under a mutex.
//
// Registry: (data_ptr, sizes, strides, dtype) of a dense weight -> (a weak reference to the
// weight, its version, its packed twin). A weight that is gone (its memory reused by another
// tensor) or was written in place since (its version bumped) is packed again. Entries whose
// weight was freed are dropped whenever one is added, so a process that loads models again
// (tests) does not keep dead twins.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBatchHint = 32;  // the M oneDNN lays a weight out for (any M runs)

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

at::Tensor reorder(const at::Tensor& weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_reorder_linear_weight", "")
                       .typed<at::Tensor(const at::Tensor&, std::optional<int64_t>)>();
  return op.call(weight.detach(), kBatchHint);
}

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
              reorder(weight)};
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
  static auto linear =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>)>();
  return linear.call(x, packed_weight(weight), bias, "none",
                     c10::List<std::optional<at::Scalar>>(), c10::string_view(""));
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraserve_cpu, m) {
  m.def("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("packed_count() -> int", &packed_count);
  m.def("forget_packed() -> ()", &forget_packed);
}

TORCH_LIBRARY_IMPL(loraserve_cpu, CPU, m) { m.impl("packed_linear", &packed_linear); }
