// The AutogradCPU kernels of the built-in handlers' operators, one unboxed kernel per
// operator, and each operator's saving rule: the C++ twin of memsave_dispatch/ops/*.py
// (tests/test_compiled.py checks, operator by operator, that both keep the same).
//
// Per call, outside any mode: stock's kernel with the arguments exactly as received. Inside
// one: the same checks as engine._route, in the same order, then stock, then the rule's
// decisions carried out on stock's node. Whatever this engine does not take (tracing,
// functorch, saved-tensor hooks, compiled autograd, tensor subclasses, handlers from Python)
// goes to the kernel registered before this one: the Python engine's.
#include "ops.h"

#include "saving.h"
#include "torch_private.h"

#include <ATen/SavedTensorHooks.h>
#include <ATen/native/Pool.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/generated/Functions.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <unordered_set>

namespace memsave {

extern std::atomic<bool> compiled_autograd_enabled;  // module.cpp

namespace gen = torch::autograd::generated;

// -- the operators ---------------------------------------------------------------------------
#define MEMSAVE_RULE_OPS(X)                                                                                       \
  X(relu) X(relu_) X(leaky_relu) X(leaky_relu_) X(hardtanh) X(hardtanh_) X(threshold) X(threshold_)            \
  X(convolution) X(dropout) X(dropout_) X(feature_dropout) X(feature_dropout_) X(native_dropout) X(addmm) X(mm) \
  X(native_batch_norm) X(native_layer_norm) X(native_group_norm) X(max_pool2d_with_indices)                     \
  X(max_pool3d_with_indices) X(adaptive_max_pool2d) X(adaptive_max_pool3d) X(avg_pool2d) X(avg_pool3d)         \
  X(_adaptive_avg_pool2d) X(_adaptive_avg_pool3d)

enum OpIndex : int {
#define MEMSAVE_INDEX(op) k_##op,
  MEMSAVE_RULE_OPS(MEMSAVE_INDEX)
#undef MEMSAVE_INDEX
  kNumRuleOps
};

// Composite max-pooling operators: whether their caller gets the indices (see PoolingScope).
#define MEMSAVE_POOLING_SCOPES(X) \
  X(max_pool1d, false) X(max_pool2d, false) X(max_pool3d, false) X(max_pool1d_with_indices, true) X(adaptive_max_pool1d, true)

// SafeKernelFunction (torch >= 2.9) only calls boxed; the KernelFunction inside calls
// unboxed, with no boxing of the arguments.
MEMSAVE_EXPOSE(KernelOfSafe, c10::SafeKernelFunction, kernel_, c10::KernelFunction);

namespace {

const c10::KernelFunction* computed_kernel(const c10::OperatorHandle& handle,
                                          c10::DispatchKey key = c10::DispatchKey::AutogradCPU) {
  c10::SafeKernelFunction safe = handle.getComputedKernelForDispatchKey(key);
  return new c10::KernelFunction(safe.*get(KernelOfSafe()));  // kept for the process: kernels may still run it
}

// An operator's handle and its kernel at some key before anything overrode it (capture_stock),
// one pair per Owner: each of the engine's kernels, and the stock CPU kernels the readers call.
template <class Owner, class Sig>
struct Captured;
template <class Owner, class Ret, class... Args>
struct Captured<Owner, Ret(Args...)> {
  static inline const c10::OperatorHandle* handle = nullptr;
  static inline const c10::KernelFunction* stock = nullptr;
  // `kernel` with the arguments exactly as received (unboxed)
  static Ret call(const c10::KernelFunction* kernel, c10::DispatchKeySet ks, Args... args) {
    return kernel->template call<Ret, Args...>(*handle, ks, std::forward<Args>(args)...);
  }
  static Ret call_stock(c10::DispatchKeySet ks, Args... args) { return call(stock, ks, std::forward<Args>(args)...); }
};

// K::handle and K::stock: the operator, and its kernel at `key` before anything overrode it.
template <class K>
void capture_stock(const char* name, const char* overload, c10::DispatchKey key = c10::DispatchKey::AutogradCPU) {
  if (K::stock) return;
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
  K::handle = new c10::OperatorHandle(op);
  K::stock = computed_kernel(op, key);
}

// -- when a call is not plain eager ---------------------------------------------------------------
// Tracing, functorch, Python modes and subclasses, forward-AD zero tensors, compiled autograd
// and the user's saved-tensor hooks are the Python engine's to handle.
bool plain_eager(c10::DispatchKeySet ks) {
  const c10::impl::LocalDispatchKeySet local = c10::impl::tls_local_dispatch_key_set();
  if (!((ks | local.included_) & kNotEager).empty()) return false;
  if (compiled_autograd_enabled.load(std::memory_order_relaxed)) return false;
  return at::SavedTensorDefaultHooks::get_tls_state().stack.empty();
}

// -- what only the Python engine does --------------------------------------------------------------
// Node types with a recipe (recipes.has_recipe). Old sets are never freed: readers hold no lock.
std::atomic<const std::unordered_set<std::string>*> recipe_nodes{new std::unordered_set<std::string>()};

// f(tensor) for every defined tensor argument, optional ones unwrapped.
template <class F, class... Args>
void for_each_tensor(F&& f, const Args&... args) {
  auto visit = [&](const auto& arg) {
    using A = std::decay_t<decltype(arg)>;
    if constexpr (std::is_same_v<A, at::Tensor>) {
      if (arg.defined()) f(arg);
    } else if constexpr (std::is_same_v<A, std::optional<at::Tensor>>) {
      if (arg && arg->defined()) f(*arg);
    }
  };
  (visit(args), ...);
}

// Whether a tensor input that requires grad was produced (through its base, for a view) by a
// node with a recipe: the Python engine then handles the call (engine._an_input_is_rebuildable
// and slots' rebuild decisions), even where this rule would find nothing to save.
template <class... Args>
bool an_input_is_rebuildable(const Args&... args) {
  const std::unordered_set<std::string>* names = recipe_nodes.load(std::memory_order_acquire);
  if (names->empty()) return false;
  bool found = false;
  for_each_tensor(
      [&](const at::Tensor& t) {
        if (found || !t.requires_grad()) return;
        const auto& node = t.is_view() ? t._base().grad_fn() : t.grad_fn();
        if (node && names->count(node->name())) found = true;
      },
      args...);
  return found;
}

// A backward pass runs in this thread (engine._route: the Python engine leaves such calls to
// stock, counted "during backward" where they build a graph).
bool backward_running() {
  return torch::autograd::get_current_graph_task_id() != -1;
}

// Whether stock handed an input back (engine._run_policy): an output that is an input.
template <class... Args>
bool handed_back(const Outputs& outputs, const Args&... args) {
  bool found = false;
  for_each_tensor(
      [&](const at::Tensor& t) {
        for (const at::Tensor& output : outputs)
          found |= output.defined() && output.unsafeGetTensorImpl() == t.unsafeGetTensorImpl();
      },
      args...);
  return found;
}

// engine._reason_for_stock's look at the tensors: anything unusual goes to the Python engine,
// which names it; otherwise, whether any requires grad.
struct TensorCheck {
  bool unusual = false, needs_grad = false;
};

template <class... Args>
TensorCheck check_tensors(const Args&... args) {
  TensorCheck check;
  for_each_tensor(
      [&](const at::Tensor& t) {
        const at::ScalarType dtype = t.scalar_type();
        if (t.layout() != at::kStrided || at::isComplexType(dtype) || at::isQIntType(dtype) || !is_plain_tensor_object(t))
          check.unusual = true;
        else if (t.requires_grad())
          check.needs_grad = true;
      },
      args...);
  return check;
}

template <class R>
Outputs outputs_of(const R& result) {
  if constexpr (std::is_same_v<std::decay_t<R>, at::Tensor>) {
    return Outputs{result};
  } else {
    return std::apply([](const auto&... t) { return Outputs{t...}; }, result);
  }
}

template <class N>
N& node_as(Node& node) {
  auto* typed = dynamic_cast<N*>(&node);
  TORCH_CHECK(typed, "memsave_dispatch: expected stock's node ", c10::demangle_type<N>(), ", got ", node.name(),
              "; this torch release is not supported by the compiled engine (MEMSAVE_DISPATCH_ENGINE=python)");
  return *typed;
}

at::Tensor value(const std::optional<at::Tensor>& t) {
  return t ? *t : at::Tensor();
}

// -- codecs ----------------------------------------------------------------------------------------
std::shared_ptr<const Codec> mask_codec(Predicate predicate, Codec::Layout layout, double low, double high) {
  auto codec = std::make_shared<Codec>();
  codec->predicate = predicate;
  codec->layout = layout;
  codec->low = low;
  codec->high = high;
  return codec;
}

// bool(NaN) is True and bool(-0.0) False: exactly "not y <= 0" for every ReLU output, which is
// all ReLU's backward (threshold_backward(grad, y, 0)) asks of y: it may read the bits in place.
const auto kReluMask = [] {
  auto codec = std::make_shared<Codec>(*mask_codec(Predicate::NonZero, Codec::Layout::Preserved, 0.0, 1.0));
  codec->reader = Reader::ThresholdBackward;
  return std::shared_ptr<const Codec>(codec);
}();
const auto kPositiveMask = mask_codec(Predicate::Positive, Codec::Layout::Iterator, 0.0, 1.0);
const auto kBoolMask = mask_codec(Predicate::Bool, Codec::Layout::Preserved, 0.0, 1.0);

template <class Key, class Make>
std::shared_ptr<const Codec> cached(std::map<Key, std::shared_ptr<const Codec>>& cache, std::mutex& mutex,
                                    const Key& key, Make&& make) {
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  if (cache.size() > 256) cache.clear();
  return cache.emplace(key, make()).first->second;
}

uint64_t bits_of(double value) {
  uint64_t bits;
  std::memcpy(&bits, &value, 8);
  return bits;
}

// Dropout's noise: 0 or what stock's noise.bernoulli_(1 - p).div_(1 - p) holds where it keeps.
std::shared_ptr<const Codec> dropout_codec(at::ScalarType dtype, double p) {
  static std::mutex mutex;
  static std::map<std::pair<int, uint64_t>, std::shared_ptr<const Codec>> cache;
  return cached(cache, mutex, {int(dtype), bits_of(p)}, [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    const double kept = at::ones({}, at::TensorOptions().dtype(dtype)).div_(1 - p).item<double>();
    return mask_codec(Predicate::NonZero, Codec::Layout::Iterator, 0.0, kept);
  });
}

// Hardtanh and threshold (ops/activations.py): one bit per element, the kernel's own decision
// asked with a gradient of ones, decoded as `zeroed`/`passed`, where the kernel is seen to
// decide alike on those two values in its vectorised body and its tail; else nullptr (keep).
using Backward = std::function<at::Tensor(const at::Tensor&, const at::Tensor&)>;

std::shared_ptr<Codec> decision_mask(const Backward& backward, at::ScalarType dtype, std::optional<double> zeroed,
                                     std::optional<double> passed) {
  if (!zeroed || !passed) return nullptr;
  at::AutoDispatchBelowADInplaceOrView guard;
  at::Tensor probe = at::empty({134}, at::TensorOptions().dtype(dtype));
  probe.narrow(0, 0, 67).fill_(*zeroed);
  probe.narrow(0, 67, 67).fill_(*passed);
  const at::Tensor decided = backward(at::ones_like(probe), probe).ne(0);
  if (decided.narrow(0, 0, 67).any().item<bool>() || !decided.narrow(0, 67, 67).all().item<bool>()) return nullptr;
  auto codec = std::make_shared<Codec>();
  codec->decide = [backward](const at::Tensor& tensor) {
    // backward(ones_like(tensor), tensor) != 0, each temporary gone as soon as Python drops it
    at::Tensor ones = at::_ops::ones_like::redispatch(kCpuOnly, tensor, std::nullopt, std::nullopt, std::nullopt,
                                                      std::nullopt, std::nullopt);
    at::Tensor passed = backward(ones, tensor);
    ones.reset();
    return at::_ops::ne_Scalar::redispatch(kCpuOnly, passed, 0);
  };
  codec->low = *zeroed;
  codec->high = *passed;
  return codec;
}

// The largest value of dtype below `value` rounded to dtype; none if not finite.
std::optional<double> below(const at::Scalar& value, at::ScalarType dtype) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor at_value = at::scalar_tensor(value, at::TensorOptions().dtype(dtype));
  const at::Tensor lower = at::nextafter(at_value, at::scalar_tensor(-INFINITY, at::TensorOptions().dtype(dtype)));
  if (!at::isfinite(lower).item<bool>()) return std::nullopt;
  return lower.item<double>();
}

struct ThresholdCodecs {
  std::shared_ptr<const Codec> now, when_unshared;  // nullptr: keep
};

ThresholdCodecs both_encodings(std::shared_ptr<Codec> codec) {
  if (!codec) return {};
  return {codec, codec};
}

ThresholdCodecs hardtanh_codecs(at::ScalarType dtype, const at::Scalar& low, const at::Scalar& high) {
  static std::mutex mutex;
  static std::map<std::tuple<int, uint64_t, uint64_t>, ThresholdCodecs> cache;
  const auto key = std::make_tuple(int(dtype), bits_of(low.toDouble()), bits_of(high.toDouble()));
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  at::AutoDispatchBelowADInplaceOrView guard;
  std::optional<double> middle;
  const at::Tensor mid = at::scalar_tensor((low.toDouble() + high.toDouble()) / 2, at::TensorOptions().dtype(dtype));
  if (at::isfinite(mid).item<bool>()) middle = mid.item<double>();
  Backward backward = [low, high](const at::Tensor& grad, const at::Tensor& tensor) {
    return at::_ops::hardtanh_backward::redispatch(kCpuOnly, grad, tensor, low, high);
  };
  if (cache.size() > 256) cache.clear();
  return cache[key] = both_encodings(decision_mask(backward, dtype, below(low, dtype), middle));
}

ThresholdCodecs threshold_codecs(at::ScalarType dtype, const at::Scalar& threshold) {
  static std::mutex mutex;
  static std::map<std::pair<int, uint64_t>, ThresholdCodecs> cache;
  const auto key = std::make_pair(int(dtype), bits_of(threshold.toDouble()));
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor at_value = at::scalar_tensor(threshold, at::TensorOptions().dtype(dtype));
  const double above = at::nextafter(at_value, at::scalar_tensor(INFINITY, at::TensorOptions().dtype(dtype))).item<double>();
  Backward backward = [threshold](const at::Tensor& grad, const at::Tensor& tensor) {
    return at::_ops::threshold_backward::redispatch(kCpuOnly, grad, tensor, threshold);
  };
  if (cache.size() > 256) cache.clear();
  return cache[key] = both_encodings(decision_mask(backward, dtype, below(threshold, dtype), above));
}

// In place, the node keeps a private copy of the input: encode it at once. Out of place it
// keeps the caller's tensor: encode it once nothing else holds it.
SlotDecision threshold_decision(SavedVariable& slot, const at::Tensor& input, const at::Tensor& output,
                                const ThresholdCodecs& codecs) {
  if (!codecs.now) return {&slot, input, Decision::Keep, nullptr};
  const bool in_place = output.is_same(input);
  return {&slot, input, in_place ? Decision::Encode : Decision::EncodeWhenUnshared, in_place ? codecs.now : codecs.when_unshared};
}

bool float_or_double(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble;
}

// -- max pooling's windows ---------------------------------------------------------------------------
// The last N sizes (the spatial ones).
template <size_t N>
at::IntArrayRef last(at::IntArrayRef sizes) {
  return sizes.slice(sizes.size() - N);
}

// The windows' cache (ops/pooling.py's _cached_windows), keyed by everything that shapes them.
using WindowKey = c10::SmallVector<int64_t, 24>;

struct KeyLess {
  using is_transparent = void;
  template <class A, class B>
  bool operator()(const A& a, const B& b) const {
    return std::lexicographical_compare(a.begin(), a.end(), b.begin(), b.end());
  }
};

// (a key's length and first entry tell the operator family apart: one reader per key). A
// thread looks among the geometries of its last few pooling calls first (a network has a few
// pooling layers, each called once a step): found there, the codec needs no lock.
template <class Build>
std::shared_ptr<const Codec> window_codec(const WindowKey& key, Reader reader, Build&& build) {
  ThreadState::RecentWindows& recent = thread_state().recent_windows;
  for (const auto& [known, codec] : recent.entries)
    if (std::equal(key.begin(), key.end(), known.begin(), known.end())) return codec;
  static std::mutex mutex;
  static std::map<std::vector<int64_t>, std::shared_ptr<const Codec>, KeyLess> cache;
  std::shared_ptr<const Codec> codec;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto found = cache.find(key);
    if (found != cache.end()) {
      codec = found->second;
    } else {
      if (auto windows = build()) {
        auto made = std::make_shared<Codec>();
        made->windows = windows;
        made->label = windows->two_bits() ? kOffsets2Bit : kOffsetsU8;
        made->reader = reader;
        codec = std::move(made);
      }
      if (cache.size() > 256) cache.clear();
      cache[std::vector<int64_t>(key.begin(), key.end())] = codec;
    }
  }
  recent.entries[recent.next] = {std::vector<int64_t>(key.begin(), key.end()), codec};
  recent.next = (recent.next + 1) % recent.entries.size();
  return codec;
}

}  // namespace

// Where the caller drops the indices (F.max_pool2d, nn.MaxPool2d), stock's CPU kernel would
// write int64 indices only for the rule to encode and free them: the CPU kernel installed over
// stock's (max_pool2d_cpu) then computes the maxima and their window offsets in one pass
// (codecs.h max_pool_one_pass, where the windows take it), and hands stock's autograd
// kernel a ghost of the indices, which nothing reads: their slot takes the offsets. (Outside
// the anonymous namespace: ThreadState points at the one a call asked for.)
struct OnePassCall {
  const c10::TensorImpl* input = nullptr;
  std::shared_ptr<const Codec> codec;
  KeptTensors offsets;  // once the CPU kernel made them
};
namespace {

// (out, indices) = maxpool(x): x is never read; the indices stay int64 while the caller
// holds them, else their window offsets are kept (ops/pooling.py _MaxPool.saved).
template <class CodecOf>
void max_pool_slots(Decisions& saved, SavedVariable& self_slot, SavedVariable& indices_slot,
                    const at::Tensor& input, const at::Tensor& indices, const CallSite& site, CodecOf&& codec_of) {
  saved.push_back({&self_slot, input, Decision::Drop, nullptr});
  const OnePassCall* pass = site.thread->one_pass_call;
  if (pass && !pass->offsets.empty() && pass->input == input.unsafeGetTensorImpl()) {
    saved.push_back({&indices_slot, indices, Decision::Encoded, pass->codec, pass->offsets});
    return;
  }
  std::shared_ptr<const Codec> codec = indices.numel() > 0 ? codec_of() : nullptr;
  Decision decision = !codec ? Decision::Keep
                      : site.thread->outputs_held > 0 ? Decision::EncodeWhenUnshared
                                                      : Decision::Encode;
  saved.push_back({&indices_slot, indices, decision, codec});
}

// N values of an argument (one value stands for all N) appended to a windows' key; the key's
// part `i` read back.
template <size_t N>
void append_extents(WindowKey& key, at::IntArrayRef values) {
  for (size_t d = 0; d < N; ++d) key.push_back(values.size() == 1 ? values[0] : values[d]);
}
template <size_t N>
at::IntArrayRef part_of(const WindowKey& key, size_t i) {
  return at::IntArrayRef(key.data() + 1 + i * N, N);
}

template <size_t N>
std::shared_ptr<const Codec> regular_window_codec(at::IntArrayRef in_sizes, at::IntArrayRef out_sizes,
                                                  at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  WindowKey key{0};
  for (at::IntArrayRef part : {last<N>(in_sizes), last<N>(out_sizes), kernel_size,
                               stride.empty() ? kernel_size : stride, padding, dilation})
    append_extents<N>(key, part);
  // max_pool2d's backward reads the offsets in place (max_pool3d's decodes them)
  const Reader reader = N == 2 ? Reader::MaxPool2dBackward : Reader::None;
  return window_codec(key, reader, [&] {
    return regular_windows(part_of<N>(key, 0), part_of<N>(key, 1), part_of<N>(key, 2), part_of<N>(key, 3),
                           part_of<N>(key, 4), part_of<N>(key, 5));
  });
}

template <size_t N>
std::shared_ptr<const Codec> adaptive_window_codec(const at::Tensor& input, const at::Tensor& indices) {
  WindowKey key{1};
  append_extents<N>(key, last<N>(input.sizes()));
  append_extents<N>(key, last<N>(indices.sizes()));
  return window_codec(key, Reader::None, [&] { return adaptive_windows(part_of<N>(key, 0), part_of<N>(key, 1)); });
}

std::atomic<bool> one_pass_installed{false};  // max_pool2d_cpu is installed

// Asks max_pool2d_cpu for the one-pass forward, from just before stock's autograd kernel runs
// until the rule has read the offsets (the route's end), where the call qualifies: the caller
// drops the indices, the input is a plain contiguous float or double tensor (no forward-mode
// gradient, which stock computes from the indices), and the windows take it.
class OnePassRequest {
 public:
  OnePassRequest(ThreadState& thread, const at::Tensor& input, at::IntArrayRef kernel, at::IntArrayRef stride,
                 at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode)
      : thread_(thread), before_(thread.one_pass_call) {
    if (thread.outputs_held != 0 || !one_pass_installed.load(std::memory_order_acquire)) return;
    if (!(input.dim() == 3 || input.dim() == 4) || !float_or_double(input.scalar_type()) || input.numel() == 0 ||
        !input.is_contiguous() || input.suggest_memory_format() != at::MemoryFormat::Contiguous ||
        !input.device().is_cpu() || input._fw_grad(0).defined())
      return;
    // The one-pass kernel runs none of stock's argument checks (pool2d_shape_check): these stand
    // in for them, leaving every call stock would reject to stock.
    const auto two = [](at::IntArrayRef values) { return values.size() == 1 || values.size() == 2; };
    if (!two(kernel) || !(stride.empty() || two(stride)) || !two(padding) || !two(dilation)) return;
    const auto at_dim = [](at::IntArrayRef values, size_t d) { return values.size() == 1 ? values[0] : values[d]; };
    int64_t out_sizes[2];
    constexpr int64_t kIntMax = std::numeric_limits<int>::max();  // stock reads them as int (safe_downcast)
    for (size_t d = 0; d < 2; ++d) {
      const int64_t k = at_dim(kernel, d), s = stride.empty() ? k : at_dim(stride, d), p = at_dim(padding, d),
                    dil = at_dim(dilation, d);
      if (k < 1 || s < 1 || dil < 1 || p < 0 || k > kIntMax || s > kIntMax || p > kIntMax || dil > kIntMax) return;
      if (p > k / 2 || p > ((k - 1) * dil + 1) / 2) return;
      out_sizes[d] = at::native::pooling_output_shape<int64_t>(input.size(-2 + int64_t(d)), k, p, s, dil, ceil_mode);
      if (out_sizes[d] < 1) return;
    }
    pass_.codec = regular_window_codec<2>(input.sizes(), out_sizes, kernel, stride, padding, dilation);
    if (!pass_.codec || !pass_.codec->windows->one_pass()) return;
    pass_.input = input.unsafeGetTensorImpl();
    thread.one_pass_call = &pass_;
  }
  ~OnePassRequest() { thread_.one_pass_call = before_; }
  OnePassRequest(const OnePassRequest&) = delete;
  OnePassRequest& operator=(const OnePassRequest&) = delete;

 private:
  ThreadState& thread_;
  OnePassCall* before_;
  OnePassCall pass_;
};

// -- the rules (ops/*.py) ---------------------------------------------------------------------------
// Rule<Op>: `can_save(args...)` (default: yes) and `saved(saved, node, outputs, site, args...)`.
template <class Op>
struct Rule;

struct AnyCall {
  template <class... A>
  static bool can_save(const A&...) {
    return true;
  }
};

template <class Op>
struct ReluRule : AnyCall {
  template <class T>
  static void saved(Decisions& s, Node& node, const Outputs& out, const CallSite&, T&) {
    s.push_back({&node_as<gen::ReluBackward0>(node).result_, out[0], Decision::EncodeWhenUnshared, kReluMask});
  }
};
template <> struct Rule<at::_ops::relu> : ReluRule<at::_ops::relu> {};
template <> struct Rule<at::_ops::relu_> : ReluRule<at::_ops::relu_> {};

template <>
struct Rule<at::_ops::leaky_relu> : AnyCall {
  static void saved(Decisions& s, Node& node, const Outputs&, const CallSite&,
                    const at::Tensor& self, const at::Scalar&) {
    s.push_back({&node_as<gen::LeakyReluBackward0>(node).self_, self, Decision::EncodeWhenUnshared, kPositiveMask});
  }
};

template <>
struct Rule<at::_ops::leaky_relu_> : AnyCall {
  static void saved(Decisions& s, Node& node, const Outputs& out, const CallSite&,
                    at::Tensor&, const at::Scalar&) {
    s.push_back({&node_as<gen::LeakyReluBackward1>(node).result_, out[0], Decision::EncodeWhenUnshared, kPositiveMask});
  }
};

template <class Op>
struct HardtanhRule : AnyCall {
  template <class T>
  static void saved(Decisions& s, Node& node, const Outputs& out, const CallSite&,
                    T& input, const at::Scalar& low, const at::Scalar& high) {
    auto& slot = node_as<gen::HardtanhBackward0>(node).self_;
    bool has_nan;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      has_nan = at::isnan(input).any().template item<bool>();
    }
    // the kernel's NaN decision depends on where the element falls in its loop: keep
    if (has_nan) {
      s.push_back({&slot, input, Decision::Keep, nullptr});
      return;
    }
    s.push_back(threshold_decision(slot, input, out[0], hardtanh_codecs(input.scalar_type(), low, high)));
  }
};
template <> struct Rule<at::_ops::hardtanh> : HardtanhRule<at::_ops::hardtanh> {};
template <> struct Rule<at::_ops::hardtanh_> : HardtanhRule<at::_ops::hardtanh_> {};

template <class Node_>
struct ThresholdRule : AnyCall {
  template <class T>
  static void saved(Decisions& s, Node& node, const Outputs& out, const CallSite&,
                    T& input, const at::Scalar& threshold, const at::Scalar&) {
    s.push_back(threshold_decision(node_as<Node_>(node).self_, input, out[0], threshold_codecs(input.scalar_type(), threshold)));
  }
};
template <> struct Rule<at::_ops::threshold> : ThresholdRule<gen::ThresholdBackward0> {};
template <> struct Rule<at::_ops::threshold_> : ThresholdRule<gen::ThresholdBackward1> {};

// A weight that is an activation (not a parameter) is dropped when x needs no gradient.
bool drops_weight(const at::Tensor& input, const at::Tensor& weight) {
  return !input.requires_grad() && !is_parameter_instance(weight);
}

template <>
struct Rule<at::_ops::convolution> {
  template <class... R>
  static bool can_save(const at::Tensor& input, const at::Tensor& weight, const R&...) {
    return !weight.requires_grad() || drops_weight(input, weight);
  }
  template <class... R>
  static void saved(Decisions& s, Node& node, const Outputs&, const CallSite&,
                    const at::Tensor& input, const at::Tensor& weight, const R&...) {
    auto& n = node_as<gen::ConvolutionBackward0>(node);
    s.push_back({&n.input_, input, weight.requires_grad() ? Decision::Keep : Decision::Drop, nullptr});
    s.push_back({&n.weight_, weight, drops_weight(input, weight) ? Decision::Drop : Decision::Keep, nullptr});
  }
};

// The composite dropout: stock's node is the Mul that applied the noise; its noise, two-valued,
// becomes one bit per element.
template <class Op>
struct DropoutRule {
  template <class T>
  static bool can_save(const T&, double p, bool train) {
    return train && 0 < p && p < 1;
  }
  template <class T>
  static void saved(Decisions& s, Node& node, const Outputs&, const CallSite&, T&,
                    double p, bool) {
    auto& n = node_as<gen::MulBackward0>(node);
    const at::Tensor noise = n.other_.unpack();
    s.push_back({&n.other_, noise, Decision::Encode, dropout_codec(noise.scalar_type(), p)});
  }
};
template <> struct Rule<at::_ops::dropout> : DropoutRule<at::_ops::dropout> {};
template <> struct Rule<at::_ops::dropout_> : DropoutRule<at::_ops::dropout_> {};
template <> struct Rule<at::_ops::feature_dropout> : DropoutRule<at::_ops::feature_dropout> {};
template <> struct Rule<at::_ops::feature_dropout_> : DropoutRule<at::_ops::feature_dropout_> {};

template <>
struct Rule<at::_ops::native_dropout> {
  static bool can_save(const at::Tensor&, double p, std::optional<bool> train) {
    return train.value_or(false) && 0 < p && p < 1;
  }
  static void saved(Decisions& s, Node& node, const Outputs& out, const CallSite&,
                    const at::Tensor&, double, std::optional<bool>) {
    s.push_back({&node_as<gen::NativeDropoutBackward0>(node).result1_, out[1], Decision::EncodeWhenUnshared, kBoolMask});
  }
};

// Stock already saves per requested gradient here; handled so that the report counts them.
template <>
struct Rule<at::_ops::addmm> {
  // every call handled (linear.py: the handlers keep what stock keeps, and count it)
  static bool can_save(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Scalar&, const at::Scalar&) {
    return true;
  }
  static void saved(Decisions& s, Node& node, const Outputs&, const CallSite&,
                    const at::Tensor&, const at::Tensor& mat1, const at::Tensor& mat2, const at::Scalar&, const at::Scalar&) {
    auto& n = node_as<gen::AddmmBackward0>(node);
    s.push_back({&n.mat1_, mat2.requires_grad() ? mat1 : at::Tensor(), Decision::Keep, nullptr});
    s.push_back({&n.mat2_, mat1.requires_grad() ? mat2 : at::Tensor(), Decision::Keep, nullptr});
  }
};

template <>
struct Rule<at::_ops::mm> {
  static bool can_save(const at::Tensor&, const at::Tensor&) { return true; }
  static void saved(Decisions& s, Node& node, const Outputs&, const CallSite&,
                    const at::Tensor& self, const at::Tensor& mat2) {
    auto& n = node_as<gen::MmBackward0>(node);
    s.push_back({&n.self_, mat2.requires_grad() ? self : at::Tensor(), Decision::Keep, nullptr});
    s.push_back({&n.mat2_, self.requires_grad() ? mat2 : at::Tensor(), Decision::Keep, nullptr});
  }
};

bool requires_grad(const std::optional<at::Tensor>& t) {
  return t && t->defined() && t->requires_grad();
}

bool batch_norm_needs_input(const at::Tensor& input, const std::optional<at::Tensor>& weight, bool training) {
  return requires_grad(weight) || (training && input.requires_grad());
}

template <>
struct Rule<at::_ops::native_batch_norm> {
  using OptT = std::optional<at::Tensor>;
  static bool can_save(const at::Tensor& input, const OptT& weight, const OptT&, const OptT&, const OptT&, bool training,
                       double, double) {
    return !batch_norm_needs_input(input, weight, training);
  }
  static void saved(Decisions& s, Node& node, const Outputs& out, const CallSite&,
                    const at::Tensor& input, const OptT& weight, const OptT&, const OptT& running_mean,
                    const OptT& running_var, bool training, double, double) {
    auto& n = node_as<gen::NativeBatchNormBackward0>(node);
    const Decision keep_input = batch_norm_needs_input(input, weight, training) ? Decision::Keep : Decision::Drop;
    s.push_back({&n.input_, input, keep_input, nullptr});
    s.push_back({&n.weight_, value(weight), Decision::Keep, nullptr});
    s.push_back({&n.running_mean_, value(running_mean), Decision::Keep, nullptr});
    s.push_back({&n.running_var_, value(running_var), Decision::Keep, nullptr});
    s.push_back({&n.result1_, out[1], keep_input, nullptr});  // batch mean (empty in eval mode)
    s.push_back({&n.result2_, out[2], keep_input, nullptr});  // batch inverse std
  }
};

bool affine_or_input_needs_grad(const at::Tensor& input, const std::optional<at::Tensor>& weight) {
  return input.requires_grad() || requires_grad(weight);
}

// Layer and group norm: x, mean and rstd serve grad_x and grad_w only.
template <class N>
void input_and_statistics(Decisions& s, N& n, const Outputs& out,
                          const at::Tensor& input, const std::optional<at::Tensor>& weight) {
  const Decision keep = affine_or_input_needs_grad(input, weight) ? Decision::Keep : Decision::Drop;
  s.push_back({&n.input_, input, keep, nullptr});
  s.push_back({&n.result1_, out[1], keep, nullptr});
  s.push_back({&n.result2_, out[2], keep, nullptr});
  s.push_back({&n.weight_, value(weight), Decision::Keep, nullptr});
}

template <>
struct Rule<at::_ops::native_layer_norm> {
  using OptT = std::optional<at::Tensor>;
  static bool can_save(const at::Tensor& input, c10::SymIntArrayRef, const OptT& weight, const OptT&, double) {
    return !affine_or_input_needs_grad(input, weight);
  }
  static void saved(Decisions& s, Node& node, const Outputs& out, const CallSite&,
                    const at::Tensor& input, c10::SymIntArrayRef, const OptT& weight, const OptT& bias, double) {
    auto& n = node_as<gen::NativeLayerNormBackward0>(node);
    input_and_statistics(s, n, out, input, weight);
    s.push_back({&n.bias_, value(bias), Decision::Keep, nullptr});
  }
};

template <>
struct Rule<at::_ops::native_group_norm> {
  using OptT = std::optional<at::Tensor>;
  template <class... R>
  static bool can_save(const at::Tensor& input, const OptT& weight, const R&...) {
    return !affine_or_input_needs_grad(input, weight);
  }
  template <class... R>
  static void saved(Decisions& s, Node& node, const Outputs& out, const CallSite&,
                    const at::Tensor& input, const OptT& weight, const R&...) {
    input_and_statistics(s, node_as<gen::NativeGroupNormBackward0>(node), out, input, weight);
  }
};

template <class N, size_t Dims>
struct RegularMaxPoolRule : AnyCall {
  static void saved(Decisions& s, Node& node, const Outputs& out, const CallSite& site,
                    const at::Tensor& input, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, bool) {
    auto& n = node_as<N>(node);
    max_pool_slots(s, n.self_, n.result1_, input, out[1], site,
                   [&] { return regular_window_codec<Dims>(input.sizes(), out[1].sizes(), kernel, stride, padding, dilation); });
  }
};
template <> struct Rule<at::_ops::max_pool2d_with_indices> : RegularMaxPoolRule<gen::MaxPool2DWithIndicesBackward0, 2> {};
template <> struct Rule<at::_ops::max_pool3d_with_indices> : RegularMaxPoolRule<gen::MaxPool3DWithIndicesBackward0, 3> {};

template <class N, size_t Dims>
struct AdaptiveMaxPoolRule : AnyCall {
  static void saved(Decisions& s, Node& node, const Outputs& out, const CallSite& site,
                    const at::Tensor& input, at::IntArrayRef) {
    auto& n = node_as<N>(node);
    max_pool_slots(s, n.self_, n.result1_, input, out[1], site, [&] { return adaptive_window_codec<Dims>(input, out[1]); });
  }
};
template <> struct Rule<at::_ops::adaptive_max_pool2d> : AdaptiveMaxPoolRule<gen::AdaptiveMaxPool2DBackward0, 2> {};
template <> struct Rule<at::_ops::adaptive_max_pool3d> : AdaptiveMaxPoolRule<gen::AdaptiveMaxPool3DBackward0, 3> {};

// Average pooling spreads the gradient evenly: x is read for its layout only.
template <class N>
struct AvgPoolRule : AnyCall {
  template <class... R>
  static void saved(Decisions& s, Node& node, const Outputs&, const CallSite&,
                    const at::Tensor& input, const R&...) {
    s.push_back({&node_as<N>(node).self_, input, Decision::Drop, nullptr});
  }
};
template <> struct Rule<at::_ops::avg_pool2d> : AvgPoolRule<gen::AvgPool2DBackward0> {};
template <> struct Rule<at::_ops::avg_pool3d> : AvgPoolRule<gen::AvgPool3DBackward0> {};
template <> struct Rule<at::_ops::_adaptive_avg_pool2d> : AvgPoolRule<gen::AdaptiveAvgPool2DBackward0> {};
template <> struct Rule<at::_ops::_adaptive_avg_pool3d> : AvgPoolRule<gen::AdaptiveAvgPool3DBackward0> {};

// Whether the rule may keep some tensor input as it is for this call (else no rebuild can start
// there, whatever produced the inputs): by default yes; a frozen convolution drops its input
// (and keeps a parameter weight), batch norm without weight gradient in eval mode drops it too.
template <class Op>
struct MayKeepAnInput {
  template <class... A>
  static bool check(const A&...) {
    return true;
  }
};
template <>
struct MayKeepAnInput<at::_ops::convolution> {
  template <class... R>
  static bool check(const at::Tensor&, const at::Tensor& weight, const R&...) {
    return weight.requires_grad() || !is_parameter_instance(weight);
  }
};
template <>
struct MayKeepAnInput<at::_ops::native_batch_norm> {
  using OptT = std::optional<at::Tensor>;
  static bool check(const at::Tensor& input, const OptT& weight, const OptT&, const OptT&, const OptT&, bool training,
                    double, double) {
    return batch_norm_needs_input(input, weight, training);
  }
};

// -- whether a max pooling's caller keeps the indices ---------------------------------------------------
// The Python engine asks its TorchFunctionMode which Python function was called. Here: a call
// made from inside one of the composite max-pooling operators belongs to that operator's caller,
// who gets the indices from max_pool1d_with_indices and adaptive_max_pool1d but not from
// max_pool1d/2d/3d; any other call hands the indices to its caller.
template <class Op>
constexpr bool kMaxPoolWithIndices =
    std::is_same_v<Op, at::_ops::max_pool2d_with_indices> || std::is_same_v<Op, at::_ops::max_pool3d_with_indices> ||
    std::is_same_v<Op, at::_ops::adaptive_max_pool2d> || std::is_same_v<Op, at::_ops::adaptive_max_pool3d>;

// A max pooling called while another one runs (Python code run inside stock's autograd kernel:
// anomaly mode's stack capture, a profiler hook) has a caller of its own, outside any composite
// operator: it neither belongs to the outer call's caller nor may take its one-pass request.
class PoolingReentered {
 public:
  explicit PoolingReentered(ThreadState& thread)
      : thread_(thread), on_(thread.outputs_held != -1), depth_(thread.pooling_depth), pass_(thread.one_pass_call) {
    if (!on_) return;
    thread.pooling_depth = 0;
    thread.one_pass_call = nullptr;
  }
  ~PoolingReentered() {
    if (!on_) return;
    thread_.pooling_depth = depth_;
    thread_.one_pass_call = pass_;
  }

 private:
  ThreadState& thread_;
  bool on_;
  int depth_;
  OnePassCall* pass_;
};

class OutputsHeld {
 public:
  explicit OutputsHeld(ThreadState& thread) : thread_(thread), before_(thread.outputs_held) {
    thread.outputs_held = thread.pooling_depth == 0 || thread.pooling_holds;
  }
  ~OutputsHeld() { thread_.outputs_held = before_; }

 private:
  ThreadState& thread_;
  int8_t before_;
};

// The 1-d operators hand their caller a view of the indices: an encoding waiting for the
// indices then waits for that view (the Python engine sees the call return that view).
template <class Op, bool Holds, class Sig = typename Op::schema>
struct PoolingScope;
template <class Op, bool Holds, class Ret, class... Args>
struct PoolingScope<Op, Holds, Ret(Args...)> : Captured<PoolingScope<Op, Holds>, Ret(Args...)> {
  using Base = Captured<PoolingScope<Op, Holds>, Ret(Args...)>;
  static Ret fn(c10::DispatchKeySet ks, Args... args) {
    if (C10_LIKELY(!tls_active)) return Base::call_stock(ks, std::forward<Args>(args)...);
    ThreadState& thread = thread_state();
    const bool outermost = thread.pooling_depth++ == 0;
    if (outermost) thread.pooling_holds = Holds;
    struct Leave {
      ThreadState& thread;
      bool outermost;
      ~Leave() {
        if (--thread.pooling_depth == 0 && outermost) thread.pooling_waiting.clear();
      }
    } leave{thread, outermost};
    Ret result = Base::call_stock(ks, std::forward<Args>(args)...);
    if constexpr (Holds) {
      if (outermost) {
        const at::Tensor& returned = std::get<1>(result);
        for (auto& [state, waiting] : thread.pooling_waiting) {
          if (!state->remove(waiting)) continue;
          // when the view dies, its base (the indices) still holds the storage, dying with it
          waiting->dying_holders += returned.is_view();
          if (auto view = watch(returned)) view->add(waiting);
        }
      }
    }
    return result;
  }
};

// Out-of-place calls whose rule may wait for the caller's input to die (EncodeWhenUnshared on
// it): the Python engine waits for the base of a view (slots._track), so a view goes there.
template <class Op>
constexpr bool kWaitsOnInput = std::is_same_v<Op, at::_ops::leaky_relu> || std::is_same_v<Op, at::_ops::hardtanh> ||
                               std::is_same_v<Op, at::_ops::threshold>;

// Calls whose rule never keeps an input as it is, and whose node no recipe reads: an input
// with a recipe does not send them to the Python engine, since no rebuild can start there
// (slots._rebuild_or_keep reads KEEP decisions only). That holds in place, where the input
// becomes the node's own output, except for dropout: its Mul node has a recipe, which
// rebuilds the output from the input only through the Python engine's encoding of the noise.
template <class Op>
constexpr bool kDropout = std::is_same_v<Op, at::_ops::dropout> || std::is_same_v<Op, at::_ops::dropout_> ||
                          std::is_same_v<Op, at::_ops::feature_dropout> ||
                          std::is_same_v<Op, at::_ops::feature_dropout_> || std::is_same_v<Op, at::_ops::native_dropout>;
template <class Op>
constexpr bool kKeepsNoInput =
    std::is_same_v<Op, at::_ops::relu> || kMaxPoolWithIndices<Op> || std::is_same_v<Op, at::_ops::avg_pool2d> ||
    std::is_same_v<Op, at::_ops::avg_pool3d> || std::is_same_v<Op, at::_ops::_adaptive_avg_pool2d> ||
    std::is_same_v<Op, at::_ops::_adaptive_avg_pool3d>;

// -- the kernel ------------------------------------------------------------------------------------------
template <class Op, class Sig = typename Op::schema>
struct Kernel;
template <class Op, class Ret, class... Args>
struct Kernel<Op, Ret(Args...)> : Captured<Kernel<Op>, Ret(Args...)> {
  using Base = Captured<Kernel<Op>, Ret(Args...)>;
  using Base::call;
  using Base::handle;
  using Base::stock;  // stock's AutogradCPU kernel
  static inline int index = -1;
  static inline const c10::KernelFunction* next = nullptr;  // the Python engine's kernel
  static constexpr bool kInPlace = std::is_same_v<std::tuple_element_t<0, std::tuple<Args...>>, at::Tensor&>;

  static Ret fn(c10::DispatchKeySet ks, Args... args) {
    if (C10_LIKELY(!tls_active)) {
      // Tracing goes to the Python engine's kernel, which runs what stock's tracer runs (a
      // Python decomposition, for some operators); anything else gets stock as received.
      if (C10_UNLIKELY(c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::PythonDispatcher)))
        return call(next, ks, std::forward<Args>(args)...);
      return call(stock, ks, std::forward<Args>(args)...);
    }
    ThreadState& thread = thread_state();
    if constexpr (kMaxPoolWithIndices<Op>) {
      if (thread.scopes.back()->entries[index].compiled) {  // (the Python engine asks its TorchFunctionMode)
        PoolingReentered reentered(thread);
        OutputsHeld held(thread);
        return route(thread, ks, args...);
      }
    }
    return route(thread, ks, args...);
  }

  static Ret route(ThreadState& thread, c10::DispatchKeySet ks, Args... args) {
    const Entry& entry = thread.scopes.back()->entries[index];  // the innermost mode decides
    if (!entry.handled) return call(stock, ks, args...);
    if (!entry.compiled || !plain_eager(ks)) return call(next, ks, args...);
    if (backward_running()) return call(next, ks, args...);  // the Python engine leaves it to stock
    const CallSite site{index, &entry, &thread};
    if (!at::GradMode::is_enabled()) return to_stock(site, kGradOff, ks, args...);
    if constexpr (!((kInPlace && !kDropout<Op>) || kKeepsNoInput<Op>)) {
      if (MayKeepAnInput<Op>::check(args...) && an_input_is_rebuildable(args...))
        return call(next, ks, args...);  // rebuilds: Python only
    }
    if constexpr (kWaitsOnInput<Op>) {
      if (std::get<0>(std::forward_as_tuple(args...)).is_view()) return call(next, ks, args...);
    }
    if (!Rule<Op>::can_save(args...)) return to_stock(site, kNothingToSave, ks, args...);
    if (!entry.cpu) return to_stock(site, kCpuNotEnabled, ks, args...);
    const TensorCheck check = check_tensors(args...);
    if (check.unusual) return call(next, ks, args...);
    if (!check.needs_grad) return to_stock(site, kNoInputRequiresGrad, ks, args...);
    if constexpr (kInPlace) {
      // autograd wraps the node of an in-place call on a view in a CopySlices node on the base
      if (std::get<0>(std::forward_as_tuple(args...)).is_view()) return to_stock(site, kInPlaceOnView, ks, args...);
    }
    NodePtr previous;
    if constexpr (kInPlace) {
      previous = std::get<0>(std::forward_as_tuple(args...)).grad_fn();
    }
    std::optional<OnePassRequest> one_pass;
    if constexpr (std::is_same_v<Op, at::_ops::max_pool2d_with_indices>) one_pass.emplace(thread, args...);
    Ret result = call(stock, ks, args...);
    const Outputs outputs = outputs_of(result);
    const NodePtr& node = outputs[0].grad_fn();
    if (!node) return result;  // nothing required grad after all
    if constexpr (kInPlace) {
      if (node == previous) {  // an in-place call that left the node as it was
        site.to_stock(kInputHandedBack);
        return result;
      }
    } else {
      if (handed_back(outputs, args...)) {  // stock handed an input back: the node is not this call's to change
        site.to_stock(kInputHandedBack);
        return result;
      }
    }
    Decisions saved;
    Rule<Op>::saved(saved, *node, outputs, site, args...);
    site.handled(apply(node, saved, outputs, site));
    return result;
  }

  static Ret to_stock(const CallSite& site, Reason reason, c10::DispatchKeySet ks, Args... args) {
    site.to_stock(reason);
    return call(stock, ks, args...);
  }

  static void register_kernel(torch::Library& library, const c10::OperatorHandle& op_handle) {
    if (!handle) handle = new c10::OperatorHandle(op_handle);
    next = computed_kernel(op_handle);
    library.impl(Op::name, torch::CppFunction::makeFromUnboxedFunction(&fn));
  }
};

// -- backward kernels that read an encoding in place ------------------------------------------------
// CPU kernels installed over stock's for two backward operators: where an input is a ghost
// carrying an encoding (EncodingOnGhost, handed out by EncodedCore::unpack to a derivative
// formula only), they compute from the encoding in one pass; any other call gets stock's CPU
// kernel (with the encoding decoded, where a ghost comes in a form this kernel does not take).
template <class Op>
struct StockCpu : Captured<StockCpu<Op>, typename Op::schema> {};

bool plain_strided_cpu(const at::Tensor& t) {
  return t.defined() && t.layout() == at::kStrided && t.device().is_cpu() && (t.key_set() & kNotEager).empty() &&
         !t.is_conj() && !t.is_neg();
}

// threshold_backward(grad, y, 0) is grad where y > 0 (or NaN), else +0: where `y` is a ghost
// carrying y's mask, the bits answer that in one pass over grad, and the output is laid out as
// stock's (the same TensorIterator configuration as its structured kernel).
using ThresholdBackwardCpu = StockCpu<at::_ops::threshold_backward>;

bool reads_mask_in_place(const at::Tensor& grad, const at::Tensor& self, const at::Scalar& threshold) {
  return threshold.toDouble() == 0.0 && float_or_double(self.scalar_type()) && plain_strided_cpu(grad) &&
         grad.scalar_type() == self.scalar_type() && grad.sizes().equals(self.sizes());
}

at::Tensor threshold_backward_cpu(c10::DispatchKeySet ks, const at::Tensor& grad, const at::Tensor& self,
                                  const at::Scalar& threshold) {
  if (C10_UNLIKELY(self.unsafeGetTensorImpl()->get_backend_meta() != nullptr)) {
    if (const EncodingOnGhost* mask = encoding_on(self)) {
      if (reads_mask_in_place(grad, self, threshold)) return select_by_bits(mask->encoded.kept[0], self, grad);
      return ThresholdBackwardCpu::call_stock(ks, grad, mask->decode(), threshold);
    }
  }
  return ThresholdBackwardCpu::call_stock(ks, grad, self, threshold);
}

// max_pool2d_with_indices_backward(grad, x, ..., indices) adds each output's gradient where its
// index points: where `indices` is a ghost carrying their window offsets (row-major) and stock
// would take its contiguous loop (x and grad suggesting the contiguous format), the offsets
// point there themselves.
using MaxPool2dBackwardCpu = StockCpu<at::_ops::max_pool2d_with_indices_backward>;

bool reads_offsets_in_place(const at::Tensor& grad, const at::Tensor& self, const EncodingOnGhost& offsets) {
  const at::ScalarType dtype = self.scalar_type();
  return float_or_double(dtype) && plain_strided_cpu(grad) && grad.scalar_type() == dtype &&
         (self.dim() == 3 || self.dim() == 4) && grad.sizes().equals(offsets.encoded.sizes) &&
         row_major(offsets.encoded.sizes, offsets.encoded.strides) &&
         self.suggest_memory_format() == at::MemoryFormat::Contiguous &&
         grad.suggest_memory_format() == at::MemoryFormat::Contiguous;
}

at::Tensor max_pool2d_backward_cpu(c10::DispatchKeySet ks, const at::Tensor& grad, const at::Tensor& self,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, bool ceil_mode, const at::Tensor& indices) {
  if (C10_UNLIKELY(indices.unsafeGetTensorImpl()->get_backend_meta() != nullptr)) {
    if (const EncodingOnGhost* offsets = encoding_on(indices)) {
      if (reads_offsets_in_place(grad, self, *offsets))
        return scatter_by_offsets(offsets->encoded.kept, *offsets->codec->windows, grad, self.sizes());
      return MaxPool2dBackwardCpu::call_stock(ks, grad, self, kernel_size, stride, padding, dilation, ceil_mode,
                                        offsets->decode());
    }
  }
  return MaxPool2dBackwardCpu::call_stock(ks, grad, self, kernel_size, stride, padding, dilation, ceil_mode, indices);
}

// -- max pooling's forward in one pass (OnePassCall) ---------------------------------------------------
// The CPU kernel of max_pool2d_with_indices: the one-pass forward where this thread's call asked
// for it (OnePassRequest), stock's kernel for any other call.
using MaxPool2dCpu = StockCpu<at::_ops::max_pool2d_with_indices>;

std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(c10::DispatchKeySet ks, const at::Tensor& self,
                                                  at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  if (C10_UNLIKELY(tls_active)) {
    OnePassCall* pass = thread_state().one_pass_call;
    if (pass && pass->input == self.unsafeGetTensorImpl() && pass->offsets.empty()) {
      OnePassPooling made = max_pool_one_pass(self, *pass->codec->windows);
      pass->offsets = std::move(made.offsets);
      at::Tensor indices = make_ghost(Layout::of(made.out.sizes(), made.out.strides(), at::kLong));
      return {std::move(made.out), std::move(indices)};
    }
  }
  return MaxPool2dCpu::call_stock(ks, self, kernel_size, stride, padding, dilation, ceil_mode);
}

// -- installing the CPU kernels ---------------------------------------------------------------------------
std::unique_ptr<torch::Library> cpu_library;

template <class Op, class Fn>
void install_cpu_kernel(Fn* kernel) {
  capture_stock<StockCpu<Op>>(Op::name, Op::overload_name, c10::DispatchKey::CPU);
  if (!cpu_library)
    cpu_library = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", c10::DispatchKey::CPU, __FILE__, __LINE__);
  cpu_library->impl(Op::name, torch::CppFunction::makeFromUnboxedFunction(kernel));
}

template <class Op, class Fn>
void install_reader(Reader reader, Fn* kernel) {
  if (readers_installed[size_t(reader)].load(std::memory_order_acquire)) return;
  install_cpu_kernel<Op>(kernel);
  readers_installed[size_t(reader)].store(true, std::memory_order_release);
}

// Over stock's forward kernel, for every thread: as every kernel here, installed when a mode first
// handles the operator and left installed (engine.py: the dispatcher's tables are not safe to
// change under other threads); outside a mode a call reads one thread-local flag, then stock's.
void install_one_pass_pooling() {
  if (one_pass_installed.load(std::memory_order_acquire)) return;
  install_cpu_kernel<at::_ops::max_pool2d_with_indices>(&max_pool2d_cpu);
  one_pass_installed.store(true, std::memory_order_release);
}

void uninstall_cpu_kernels() {
  for (auto& installed : readers_installed) installed.store(false, std::memory_order_release);
  one_pass_installed.store(false, std::memory_order_release);
  cpu_library.reset();
}

// -- registry of this engine's kernels --------------------------------------------------------------------
struct OpRecord {
  const char* name;
  const char* overload;
  void (*capture)();
  void (*install)(torch::Library&);
};

const std::vector<OpRecord>& records() {
  static const std::vector<OpRecord> all = [] {
    std::vector<OpRecord> list;
#define MEMSAVE_RECORD(op)                                                                                       \
  list.push_back({at::_ops::op::name, at::_ops::op::overload_name,                                             \
                  [] { capture_stock<Kernel<at::_ops::op>>(at::_ops::op::name, at::_ops::op::overload_name); }, \
                  [](torch::Library& library) {                                                                 \
                    Kernel<at::_ops::op>::register_kernel(library, *Kernel<at::_ops::op>::handle);              \
                  }});                                                                                          \
  Kernel<at::_ops::op>::index = k_##op;
    MEMSAVE_RULE_OPS(MEMSAVE_RECORD)
#undef MEMSAVE_RECORD
    return list;
  }();
  return all;
}

void install_pooling_scopes(torch::Library& library) {
#define MEMSAVE_SCOPE(op, holds)                                                                            \
  capture_stock<PoolingScope<at::_ops::op, holds>>(at::_ops::op::name, at::_ops::op::overload_name);      \
  library.impl(at::_ops::op::name, torch::CppFunction::makeFromUnboxedFunction(&PoolingScope<at::_ops::op, holds>::fn));
  MEMSAVE_POOLING_SCOPES(MEMSAVE_SCOPE)
#undef MEMSAVE_SCOPE
}

bool needs_pooling_scopes(int op) {
  return op == k_max_pool2d_with_indices || op == k_max_pool3d_with_indices || op == k_adaptive_max_pool2d ||
         op == k_adaptive_max_pool3d;
}

// Registering over a kernel registered at the same key (the Python engine registers composite
// operators per backend) makes the dispatcher warn; that is the intent here.
struct Quiet final : c10::WarningHandler {
  void process(const c10::Warning&) override {}
};

std::mutex install_mutex;
std::unique_ptr<torch::Library> library;
std::vector<bool> installed;
bool pooling_scopes_installed = false;

}  // namespace

std::vector<std::string> rule_op_names() {
  std::vector<std::string> names;
  for (const auto& record : records()) names.emplace_back(record.name);
  return names;
}

void capture(const std::vector<int>& ops) {
  std::lock_guard<std::mutex> lock(install_mutex);
  const auto& all = records();
  for (int op : ops) all.at(op).capture();
}

void install(const std::vector<int>& ops) {
  std::lock_guard<std::mutex> lock(install_mutex);
  const auto& all = records();
  Quiet quiet;
  c10::WarningUtils::WarningHandlerGuard guard(&quiet);
  if (!library)
    library = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", c10::DispatchKey::AutogradCPU, __FILE__, __LINE__);
  installed.resize(all.size(), false);
  for (int op : ops) {
    if (installed.at(op)) continue;
    all[op].capture();
    all[op].install(*library);
    installed[op] = true;
    if (needs_pooling_scopes(op) && !pooling_scopes_installed) {
      install_pooling_scopes(*library);
      pooling_scopes_installed = true;
    }
    if (op == k_relu || op == k_relu_)
      install_reader<at::_ops::threshold_backward>(Reader::ThresholdBackward, &threshold_backward_cpu);
    if (op == k_max_pool2d_with_indices) {
      install_reader<at::_ops::max_pool2d_with_indices_backward>(Reader::MaxPool2dBackward, &max_pool2d_backward_cpu);
      install_one_pass_pooling();
    }
  }
}

void uninstall() {
  std::lock_guard<std::mutex> lock(install_mutex);
  uninstall_cpu_kernels();
  library.reset();
  installed.assign(installed.size(), false);
  pooling_scopes_installed = false;
}

void set_recipe_nodes(std::vector<std::string> names) {
  recipe_nodes.store(new std::unordered_set<std::string>(names.begin(), names.end()), std::memory_order_release);
}

}  // namespace memsave
