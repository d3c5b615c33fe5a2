// Slot holders, stock's version check, tensor watches and the unshared encodings.
#include "holders.h"

#include "torch_private.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/clone_ops.h>
#include <ATen/ops/gt_ops.h>
#include <ATen/ops/ne_ops.h>
#include <ATen/ops/_to_copy_ops.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/anomaly_mode.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/headeronly/version.h>

#include <sys/mman.h>

#include <sstream>
#include <unordered_map>

namespace memsave {

// -- ghosts ------------------------------------------------------------------------------------
// One read-only anonymous mapping (grown by doubling, old ones kept for the ghosts viewing them):
// every page is the kernel's shared zero page, and a write would fault loudly instead of
// giving later ghosts non-zero values.
namespace {
constexpr int64_t kAlignment = 64;

struct ZeroRegion {
  char* base;
  size_t size;
};
std::atomic<ZeroRegion*> zero_region{nullptr};
std::mutex zero_mutex;

const char* zero_pages(size_t nbytes) {
  ZeroRegion* region = zero_region.load(std::memory_order_acquire);
  if (region && nbytes <= region->size) return region->base;
  std::lock_guard<std::mutex> lock(zero_mutex);
  region = zero_region.load(std::memory_order_acquire);
  if (region && nbytes <= region->size) return region->base;
  size_t size = size_t(1) << 30;  // address space only
  while (size < nbytes) size <<= 1;
  void* pages = mmap(nullptr, size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(pages != MAP_FAILED, "memsave_dispatch: could not map ", size, " bytes of zero pages");
  zero_region.store(new ZeroRegion{static_cast<char*>(pages), size}, std::memory_order_release);
  return static_cast<char*>(pages);
}
}  // namespace

void GhostCore::pack(const at::Tensor& tensor, bool) {
  layout.sizes.assign(tensor.sizes().begin(), tensor.sizes().end());
  layout.strides.assign(tensor.strides().begin(), tensor.strides().end());
  layout.dtype = tensor.scalar_type();
  layout.phase = int64_t(reinterpret_cast<uintptr_t>(tensor.const_data_ptr()) % kAlignment) / int64_t(tensor.element_size());
}

at::Tensor make_ghost(const Layout& layout) {
  int64_t extent = 1;
  for (size_t d = 0; d < layout.sizes.size(); ++d) {
    if (layout.sizes[d] == 0) {
      extent = 0;
      break;
    }
    extent += (layout.sizes[d] - 1) * layout.strides[d];
  }
  const size_t itemsize = c10::elementSize(layout.dtype);
  const char* zeros = zero_pages((layout.phase + extent) * itemsize + kAlignment);
  // what at::for_blob(zeros, sizes).strides(...).storage_offset(phase) makes, without its checks
  const size_t nbytes = at::detail::computeStorageNbytes(layout.sizes, layout.strides, itemsize) + layout.phase * itemsize;
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, c10::DataPtr(const_cast<char*>(zeros), c10::Device(c10::kCPU)),
                       /*allocator=*/nullptr, /*resizable=*/false);
  at::Tensor ghost = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                              c10::scalarTypeToTypeMeta(layout.dtype));
  ghost.unsafeGetTensorImpl()->set_sizes_and_strides(layout.sizes, layout.strides, layout.phase);
  return ghost;
}

namespace {

// Ghosts are never written, and autograd wraps what an unpack hook returns in a variable of its
// own: one ghost per layout serves every node (a backward pass asks for the same few layouts
// again and again), as in ghosts.py.
struct LayoutHash {
  size_t operator()(const Layout& layout) const {
    size_t h = std::hash<int>()(static_cast<int>(layout.dtype)) ^ (std::hash<int64_t>()(layout.phase) << 1);
    for (int64_t v : layout.sizes) h = h * 1000003u ^ std::hash<int64_t>()(v);
    for (int64_t v : layout.strides) h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};

at::Tensor ghost_of(const Layout& layout) {
  static thread_local std::unordered_map<Layout, at::Tensor, LayoutHash> cache;
  auto found = cache.find(layout);
  if (found != cache.end()) return found->second;
  if (cache.size() >= 1024) cache.clear();
  return cache.emplace(layout, make_ghost(layout)).first->second;
}
}  // namespace

at::Tensor GhostCore::unpack() {
  origin.check();
  return ghost_of(layout);
}

std::array<std::atomic<bool>, size_t(Reader::kCount)> readers_installed{};

const EncodingOnGhost* encoding_on(const at::Tensor& tensor) {
  c10::BackendMeta* meta = tensor.unsafeGetTensorImpl()->get_backend_meta();
  return meta ? dynamic_cast<const EncodingOnGhost*>(meta) : nullptr;
}

namespace {
// Whether only a derivative formula, run eagerly, reads what unpack returns: a backward pass
// runs in this thread with grad mode off (no graph of the backward), no Python code is the
// caller (it holds the GIL), and no Python mode, tracer or functorch transform is on in the
// thread (it could copy the ghost, and the encoding with it would be lost). A judgment from the
// thread's state, not a guarantee: other C++ code reading a slot in backward gets the ghost.
bool read_by_a_formula_only() {
  return torch::autograd::get_current_graph_task_id() != -1 && !at::GradMode::is_enabled() &&
         (c10::impl::tls_local_dispatch_key_set().included_ & kNotEager).empty() && !python_holds_this_thread();
}

at::Tensor encoding_on_ghost(std::shared_ptr<const Codec> codec, const Encoded& encoded) {
  at::Tensor ghost = make_ghost(Layout::of(encoded.sizes, encoded.strides, encoded.dtype));  // its own TensorImpl: the bits ride on it
  ghost.unsafeGetTensorImpl()->set_backend_meta(c10::make_intrusive<EncodingOnGhost>(std::move(codec), encoded));
  return ghost;
}
}  // namespace

// -- watches -----------------------------------------------------------------------------------
namespace {
// Rides on the TensorImpl; destroyed with it. Copies of the tensor (detach, views) do not
// inherit it: clone() gives them nothing.
struct Watch final : c10::BackendMeta {
  explicit Watch(std::shared_ptr<WatchState> state) : state(std::move(state)) {}
  ~Watch() override { state->died(); }
  c10::intrusive_ptr<c10::BackendMeta> clone(const c10::intrusive_ptr<c10::BackendMeta>&) const override {
    return {};
  }
  std::shared_ptr<WatchState> state;
};
}  // namespace

std::shared_ptr<WatchState> watch(const at::Tensor& tensor) {
  c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
  if (c10::BackendMeta* meta = impl->get_backend_meta()) {
    auto* existing = dynamic_cast<Watch*>(meta);
    return existing ? existing->state : nullptr;
  }
  auto state = std::make_shared<WatchState>(impl);
  impl->set_backend_meta(c10::make_intrusive<Watch>(state));
  return state;
}

NodePtr WatchState::grad_fn_now(bool& alive) const {
  c10::TensorImpl* impl = impl_.load(std::memory_order_acquire);
  // (a TensorImpl with no owner left but not deleted yet is as good as dead)
  alive = impl != nullptr && c10::raw::intrusive_ptr::use_count(impl) > 0;
  if (!alive) return {};
  // through the tensor: a view's grad_fn is rebuilt once the view was modified in place
  const at::TensorBase tensor(c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::unsafe_reclaim_from_nonowning(impl));
  return tensor.grad_fn();
}

bool WatchState::has_waiting() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return !waiting_.empty();
}

namespace {
bool current(const Waiting& waiting) {
  return waiting.book->epoch.load(std::memory_order_acquire) == waiting.epoch;
}
}  // namespace

void WatchState::add(std::shared_ptr<Waiting> waiting) {
  std::lock_guard<std::mutex> lock(mutex_);
  bool counted = false;
  for (const auto& other : waiting_) counted |= other->book == waiting->book && current(*other);
  if (!counted) waiting->book->waiting.fetch_add(1, std::memory_order_relaxed);
  waiting_.push_back(std::move(waiting));
}

bool WatchState::remove(const std::shared_ptr<Waiting>& waiting) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = std::find(waiting_.begin(), waiting_.end(), waiting);
  if (found == waiting_.end()) return false;
  waiting_.erase(found);
  bool counted = false;
  for (const auto& other : waiting_) counted |= other->book == waiting->book && current(*other);
  if (!counted && current(*waiting)) waiting->book->waiting.fetch_sub(1, std::memory_order_relaxed);
  return true;
}

void WatchState::died() noexcept {
  impl_.store(nullptr, std::memory_order_release);
  std::vector<std::shared_ptr<Waiting>> waiting;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    waiting.swap(waiting_);
  }
  if (waiting.empty()) return;
  std::vector<PendingBook*> counted;
  std::vector<Waiting*> due;
  for (const auto& entry : waiting) {
    if (!current(*entry)) continue;  // the creating thread's outermost mode exited since
    if (std::find(counted.begin(), counted.end(), entry->book.get()) == counted.end()) {
      counted.push_back(entry->book.get());
      entry->book->waiting.fetch_sub(1, std::memory_order_relaxed);
    }
    due.push_back(entry.get());
  }
  if (torch::autograd::get_current_graph_task_id() != -1) return;  // backward consumes the graph
  for (Waiting* entry : due) {
    try {
      encode_unshared(*entry);
    } catch (...) {
      // a tensor dying must never fail; it stays kept as stock keeps it
    }
  }
}

// -- stock's in-place check -------------------------------------------------------------------
Origin::Origin(const at::Tensor& tensor)
    : version_(torch::autograd::impl::version_counter(tensor)),
      saved_version_(version_.current_version()),
      sizes_(tensor.sizes().begin(), tensor.sizes().end()),
      dtype_(tensor.scalar_type()),
      output_nr_(tensor.output_nr()),
      leaf_(tensor.is_leaf()) {
  if (!leaf_) {
    watch_ = watch(tensor);
    grad_fn_at_save_ = tensor.grad_fn();
  }
}

Origin::Origin(const at::Tensor& alias, Node* owner, uint32_t output_nr)
    : version_(torch::autograd::impl::version_counter(alias)),
      saved_version_(version_.current_version()),
      sizes_(alias.sizes().begin(), alias.sizes().end()),
      dtype_(alias.scalar_type()),
      output_nr_(output_nr),
      leaf_(false),
      owner_(owner) {}

namespace {
std::string node_name(const Node& node) {
  std::string name = node.name();
  if (!settings().strip_backward_suffix) return name;
  // "MulBackward0" -> "Mul", as stock names nodes in this error
  size_t end = name.size();
  while (end > 0 && std::isdigit(static_cast<unsigned char>(name[end - 1]))) --end;
  static const std::string suffix = "Backward";
  if (end >= suffix.size() && name.compare(end - suffix.size(), suffix.size(), suffix) == 0)
    return name.substr(0, end - suffix.size());
  return name;
}
}  // namespace

void Origin::check() const {
  const uint32_t now = version_.current_version();
  if (C10_LIKELY(now == saved_version_)) return;
  NodePtr held;
  const Node* grad_fn = nullptr;
  if (!leaf_) {
    if (owner_) {
      grad_fn = owner_;
    } else {
      bool alive = false;
      held = watch_ ? watch_->grad_fn_now(alive) : NodePtr();
      if (!alive) held = grad_fn_at_save_;
      grad_fn = held.get();
    }
  }
  const Settings& s = settings();
  std::ostringstream message;
  // the tensor's type as Python names it (Tensor.type()), as the Python engine writes it
  message << s.inplace_prefix << "torch." << c10::toString(dtype_) << "Tensor [";
  for (size_t d = 0; d < sizes_.size(); ++d) message << (d ? ", " : "") << sizes_[d];
  message << "]]";
  if (grad_fn) message << ", which is output " << output_nr_ << " of " << node_name(*grad_fn) << ",";
  message << " is at version " << now << "; expected version " << saved_version_ << " instead.";
  message << (torch::autograd::AnomalyMode::is_enabled() ? s.hint_anomaly : s.hint_plain);
  TORCH_CHECK(false, message.str());
}

// -- codecs ------------------------------------------------------------------------------------
int64_t Encoded::nbytes() const {
  int64_t total = 0;
  for (const auto& t : kept) total += int64_t(t.storage().nbytes());
  return total;
}

namespace {

bool has_size_one(const at::Tensor& tensor) {
  for (int64_t size : tensor.sizes())
    if (size == 1) return true;
  return false;
}

// The decision tensor the Python engine computes (same ops, same layout), straight at the
// CPU kernels: no autograd, no Python modes, whatever state this thread is in.
at::Tensor decision_of(const at::Tensor& tensor, const Codec& codec) {
  if (codec.decide) return codec.decide(tensor);
  switch (codec.predicate) {
    case Predicate::NonZero:
      if (codec.layout == Codec::Layout::Preserved)  // tensor.bool()
        return at::_ops::_to_copy::redispatch(kCpuOnly, tensor, at::kBool, std::nullopt, std::nullopt, std::nullopt,
                                              false, std::nullopt);
      return at::_ops::ne_Scalar::redispatch(kCpuOnly, tensor, 0);  // tensor != 0
    case Predicate::Positive:
      return at::_ops::gt_Scalar::redispatch(kCpuOnly, tensor, 0);  // tensor > 0
    case Predicate::Bool:
      return at::_ops::clone::redispatch(kCpuOnly, tensor, std::nullopt);  // tensor.clone()
  }
  return {};
}
}  // namespace

Encoded Codec::encode(const at::Tensor& tensor) const {
  Encoded out;
  if (windows) {
    if (!tensor.is_non_overlapping_and_dense()) return out;
    return encoded_offsets(tensor, encode_offsets(tensor, *windows));
  }
  // One pass over the tensor itself where the decision would have its very layout; otherwise
  // the decision first, as the Python engine makes it, then its bits.
  const bool fused = !decide && tensor.is_non_overlapping_and_dense() &&
                     (layout == Layout::Preserved || !has_size_one(tensor));
  const at::Tensor source = fused ? tensor : decision_of(tensor, *this);
  out.kept = {pack_bits(source, fused ? predicate : Predicate::Bool)};
  out.memory_order = fused;
  out.sizes.assign(source.sizes().begin(), source.sizes().end());
  out.strides.assign(source.strides().begin(), source.strides().end());
  out.dtype = tensor.scalar_type();
  return out;
}

Encoded Codec::encoded_offsets(const at::Tensor& indices, KeptTensors offsets) const {
  TORCH_INTERNAL_ASSERT(windows);
  Encoded out;
  out.kept = std::move(offsets);
  out.sizes.assign(indices.sizes().begin(), indices.sizes().end());
  out.strides.assign(indices.strides().begin(), indices.strides().end());
  out.dtype = at::kLong;
  return out;
}

at::Tensor Codec::decode(const Encoded& encoded) const {
  if (windows) return decode_offsets(encoded.kept, *windows, encoded.sizes, encoded.strides);
  return unpack_bits(encoded.kept[0], encoded.sizes, encoded.strides, encoded.dtype, low, high);
}

// -- encoded holders ---------------------------------------------------------------------------
namespace {
at::Tensor alias_to_keep(const at::Tensor& tensor, bool callers) {
  return callers ? tensor.detach() : tensor;
}
}  // namespace

void EncodedCore::pack(const at::Tensor& tensor, bool callers) {
  at::NoGradGuard no_grad;  // as stock packs (GhostCore::pack reads only the layout: it needs none)
  std::lock_guard<std::mutex> lock(mutex);
  if (deferred) {
    original = alias_to_keep(tensor, callers);
  } else if (encoded.kept.empty()) {  // (an encoding the forward pass made is there already)
    encode_locked(tensor, callers);
  }
}

void EncodedCore::encode_locked(const at::Tensor& tensor, bool callers) {
  Encoded made = codec->encode(tensor);
  if (made.kept.empty()) {  // not encodable after all: keep it as it is
    original = alias_to_keep(tensor, callers);
    deferred = true;
    return;
  }
  encoded = std::move(made);
  original = at::Tensor();
  deferred = false;
}

at::Tensor EncodedCore::unpack() {
  origin.check();
  std::lock_guard<std::mutex> lock(mutex);
  if (deferred) return original;
  // to a derivative formula, the encoding goes undecoded where its reader is installed: ReLU's
  // mask (in memory order) to threshold_backward, window offsets to max_pool2d's backward
  if (codec->reader != Reader::None && (encoded.memory_order || codec->windows) &&
      readers_installed[size_t(codec->reader)].load(std::memory_order_acquire) && read_by_a_formula_only())
    return encoding_on_ghost(codec, encoded);
  return codec->decode(encoded);
}

Label EncodedCore::form() const {
  std::lock_guard<std::mutex> lock(mutex);
  return deferred ? kShared : codec->label;
}

std::vector<at::Tensor> EncodedCore::kept() const {
  std::lock_guard<std::mutex> lock(mutex);
  if (deferred) return {original};
  return {encoded.kept.begin(), encoded.kept.end()};
}

// -- the hooks on a slot -----------------------------------------------------------------------
// SavedVariable's fields that register_hooks sets (see hook()), in the releases whose
// saved_variable.cpp this code follows.
#define MEMSAVE_HOOKS_BY_FIELDS (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13 && TORCH_VERSION_MINOR <= 14)
#if MEMSAVE_HOOKS_BY_FIELDS
MEMSAVE_EXPOSE(SlotData, SavedVariable, data_, at::Tensor);
MEMSAVE_EXPOSE(SlotHooks, SavedVariable, hooks_, std::unique_ptr<torch::autograd::SavedVariableHooks>);
MEMSAVE_EXPOSE(SlotOutputNr, SavedVariable, output_nr_, uint32_t);
MEMSAVE_EXPOSE(SlotSavedOriginal, SavedVariable, saved_original_, bool);
MEMSAVE_EXPOSE(SlotIsLeaf, SavedVariable, is_leaf_, bool);
MEMSAVE_EXPOSE(SlotIsOutput, SavedVariable, is_output_, bool);
MEMSAVE_EXPOSE(SlotGradFn, SavedVariable, grad_fn_, NodePtr);
MEMSAVE_EXPOSE(SlotGradAccumulator, SavedVariable, grad_accumulator_, NodePtr);
MEMSAVE_EXPOSE(SlotRequiresGrad, SavedVariable, requires_grad_, bool);
#endif

namespace {
class Hooks final : public torch::autograd::SavedVariableHooks {
 public:
  explicit Hooks(std::shared_ptr<HolderCore> core) : core_(std::move(core)) {}
  void call_pack_hook(const at::Tensor& tensor) override { core_->pack(tensor, false); }
  at::Tensor call_unpack_hook() override { return core_->unpack(); }
  // The slot as Python reads it (SavedTensor.unpack_hook / .data): what the audit tabulates,
  // and a working unpack for compiled autograd.
  std::optional<std::pair<c10::SafePyObject, c10::SafePyObject>> retrieve_unpack_hook_data() const override {
    auto* interpreter = c10::impl::getGlobalPyInterpreter();
    auto [unpack, data] = slot_view(core_->form(), core_->kept(), core_);
    return std::make_pair(c10::SafePyObject(unpack, interpreter), c10::SafePyObject(data, interpreter));
  }

 private:
  std::shared_ptr<HolderCore> core_;
};
}  // namespace

// What SavedVariable::register_hooks does (as torch 2.13 and 2.14 do it), less a detached alias
// of the saved original tensor for the pack hook (a dispatched call and a TensorImpl per slot):
// a holder that keeps the tensor makes one itself, one that only reads it does not need it.
// Slots stock treats otherwise (no tensor, hooks already set, a forward-mode gradient), and
// other torch releases, go through register_hooks.
void hook(SavedVariable& slot, std::shared_ptr<HolderCore> core) {
#if MEMSAVE_HOOKS_BY_FIELDS
  at::Tensor& data = slot.*get(SlotData());
  const bool original = slot.*get(SlotSavedOriginal());
  if (!data.defined() || slot.*get(SlotHooks()) || (original && data._fw_grad(0).defined())) {
    slot.register_hooks(std::make_unique<Hooks>(std::move(core)));
    return;
  }
  auto hooks = std::make_unique<Hooks>(core);
  core->pack(data, original);
  if (original) {  // save_metadata, which register_hooks runs for these (the others ran it at save)
    slot.*get(SlotOutputNr()) = data.output_nr();
    if (slot.*get(SlotIsLeaf())) {
      slot.*get(SlotGradAccumulator()) = torch::autograd::impl::grad_accumulator(data);
      slot.*get(SlotRequiresGrad()) = data.requires_grad();
    } else if (!(slot.*get(SlotIsOutput()))) {
      slot.*get(SlotGradFn()) = data.grad_fn();
    }
  }
  slot.*get(SlotHooks()) = std::move(hooks);
  data.reset();
#else
  slot.register_hooks(std::make_unique<Hooks>(std::move(core)));
#endif
}

at::Tensor unpack_for_python(const std::shared_ptr<HolderCore>& core) {
  return core->unpack();
}

// -- unshared encodings ------------------------------------------------------------------------
namespace {
// A watch reports a death from the TensorImpl's destructor, where the dying tensor still holds
// its storage: measured once (as the Python engine measures its baseline), not assumed.
struct Probe final : c10::BackendMeta {
  Probe(at::Tensor other, long* seen) : other(std::move(other)), seen(seen) {}
  ~Probe() override { *seen = long(other.storage().use_count()); }
  at::Tensor other;
  long* seen;
};

long references_when_alone() {
  static const long count = [] {
    long seen = -1;
    at::Tensor dying(at::detail::empty_cpu({1}, at::TensorOptions().dtype(at::kFloat)));
    at::Tensor other = dying.variable_data();  // one other holder of the storage
    dying.unsafeGetTensorImpl()->set_backend_meta(c10::make_intrusive<Probe>(other, &seen));
    dying.reset();
    TORCH_INTERNAL_ASSERT(seen > 0, "memsave_dispatch: a tensor's death went unseen");
    return seen;
  }();
  return count;
}

// Whether nothing but the slot's own reference (`kept`) and the dying tensor (with the
// holders dying with it) hold the storage.
bool alone(const at::Tensor& kept, int dying_holders) {
  return long(kept.storage().use_count()) <= references_when_alone() + dying_holders;
}
}  // namespace

void calibrate() {
  references_when_alone();
}

void encode_unshared(Waiting& waiting) {
  if (waiting.version.current_version() != waiting.saved_version) return;  // backward reports it, as stock does
  int64_t made = 0;
  if (auto holder = waiting.holder.lock()) {
    std::lock_guard<std::mutex> lock(holder->mutex);
    if (!holder->deferred || !holder->original.defined()) return;
    if (!alone(holder->original, waiting.dying_holders)) return;  // something else holds it: the bits would be extra
    holder->encode_locked(holder->original, false);
    if (holder->deferred) return;
    made = holder->encoded.nbytes();
  } else if (NodePtr node = waiting.node.lock()) {
    // stock's slot holds the node's own output: hook it now, which encodes the slot's tensor
    std::optional<at::Tensor> data = waiting.slot->get_raw_data();
    if (!data || !data->defined()) return;  // backward freed it already
    if (!alone(*data, waiting.dying_holders)) return;
    auto core = std::make_shared<EncodedCore>(Origin(*data, node.get(), waiting.output_nr), waiting.codec, false);
    data.reset();
    hook(*waiting.slot, core);
    std::lock_guard<std::mutex> lock(core->mutex);
    if (core->deferred) return;
    made = core->encoded.nbytes();
  } else {
    return;
  }
  for (const auto& tallies : *waiting.tallies) tallies->reencode(waiting.op, kShared, waiting.codec->label, made - waiting.nbytes);
}

}  // namespace memsave
