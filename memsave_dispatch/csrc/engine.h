// The compiled engine's shared vocabulary: what a mode records (tallies), what an entry of
// an active mode says about an operator, the per-thread state the kernels read without
// entering Python, and the settings the Python side hands over once at load.
//
// The Python package (memsave_dispatch/compiled.py) is the only caller of this extension;
// the label and reason *strings* live there, the C++ side counts by id.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/util/python_stub.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace memsave {

// What became of the tensors a node keeps, in the report (ids into Python's label list).
enum Label : uint8_t { kDropped, kBitMask, kShared, kOffsetsU8, kOffsets2Bit, kNumLabels };
// Why a call ran stock (ids into Python's reason list). Rarer reasons come from the Python
// engine, which gets every call this one does not take.
enum Reason : uint8_t {
  kGradOff, kNothingToSave, kCpuNotEnabled, kNoInputRequiresGrad, kInPlaceOnView, kInputHandedBack, kNumReasons
};

// One operator's counters inside one MemSaveMode.
struct OpCounts {
  int64_t first_seen_ns = 0;  // steady clock: orders the report's lines with the Python engine's
  int family = -1;
  int64_t handled = 0, stock_bytes = 0, kept_bytes = 0;
  std::array<int64_t, kNumReasons> reasons{};
  std::array<int64_t, kNumLabels> labels{};
};

// One mode's counters (the mode object holds it; its scopes and pending encodings share it).
class Tallies {
 public:
  explicit Tallies(size_t ops) : ops_(ops) {}
  void add_stock(int op, int family, Reason reason);
  void add_handled(int op, int family, int64_t stock_bytes, int64_t kept_bytes,
                   const std::array<uint8_t, kNumLabels>& labels);
  void reencode(int op, Label from, Label to, int64_t kept_delta);
  std::vector<OpCounts> snapshot() const;
  void clear();

 private:
  OpCounts& seen(int op, int family);
  mutable std::mutex mutex_;
  std::vector<OpCounts> ops_;
};

// What the innermost active mode says about one operator.
struct Entry {
  bool handled = false;  // the mode selected a handler for this operator
  bool compiled = false;  // ...and it is the built-in one this engine runs (else: the Python engine)
  bool cpu = false;  // the mode and the handler take CPU calls
  int family = -1;
};

// One entry of a mode into this thread (a mode entered twice pushes two scopes).
struct Scope {
  std::shared_ptr<Tallies> tallies;
  std::vector<Entry> entries;  // by operator index
};

// Which encodings of this thread still wait for their tensor's death; forgetting them (the
// thread's outermost mode exited) makes the waiting entries inert.
struct PendingBook {
  std::atomic<uint64_t> epoch{0};
  std::atomic<int64_t> waiting{0};  // tensors with a current entry
};

class WatchState;
struct Waiting;
struct Codec;
struct OnePassCall;

using TalliesList = std::vector<std::shared_ptr<Tallies>>;

struct ThreadState {
  std::vector<std::shared_ptr<Scope>> scopes;  // innermost last
  // their tallies, in one list that the encodings waiting in this thread share
  std::shared_ptr<const TalliesList> tallies = std::make_shared<const TalliesList>();
  void scopes_changed() {
    auto list = std::make_shared<TalliesList>();
    list->reserve(scopes.size());
    for (const auto& scope : scopes) list->push_back(scope->tallies);
    tallies = std::move(list);
  }
  std::shared_ptr<PendingBook> pending = std::make_shared<PendingBook>();
  int pooling_depth = 0;  // inside a composite max pooling operator (see ops.cpp)
  bool pooling_holds = false;  // ...whose caller keeps the indices
  // encodings that wait, inside such an operator, for indices its caller gets a view of
  std::vector<std::pair<std::shared_ptr<WatchState>, std::shared_ptr<Waiting>>> pooling_waiting;
  int8_t outputs_held = -1;  // -1: no compiled max-pool call running; else whether its caller keeps the outputs
  struct RecentWindows {  // the pooling windows of this thread's last few geometries, by key (ops.cpp)
    std::array<std::pair<std::vector<int64_t>, std::shared_ptr<const Codec>>, 8> entries;
    size_t next = 0;  // the entry a new geometry replaces
  } recent_windows;
  OnePassCall* one_pass_call = nullptr;  // a max pooling's request for its one-pass forward, during its call (ops.cpp)
};

// Calls straight to the CPU kernels: no autograd, no Python modes, whatever this thread's state.
inline const c10::DispatchKeySet kCpuOnly(c10::DispatchKey::CPU);

// Keys of a call that is not plain eager (on a tensor, or included in the thread): tracing,
// functorch, Python modes and subclasses, forward-AD zero tensors.
inline const c10::DispatchKeySet kNotEager({
    c10::DispatchKey::Fake,
    c10::DispatchKey::Python,
    c10::DispatchKey::FuncTorchDynamicLayerBackMode,
    c10::DispatchKey::Functionalize,
    c10::DispatchKey::Conjugate,
    c10::DispatchKey::Negative,
    c10::DispatchKey::ZeroTensor,
    c10::DispatchKey::Tracer,
    c10::DispatchKey::FuncTorchBatched,
    c10::DispatchKey::BatchedNestedTensor,
    c10::DispatchKey::FuncTorchVmapMode,
    c10::DispatchKey::Batched,
    c10::DispatchKey::VmapMode,
    c10::DispatchKey::FuncTorchGradWrapper,
    c10::DispatchKey::PythonTLSSnapshot,
    c10::DispatchKey::FuncTorchDynamicLayerFrontMode,
    c10::DispatchKey::PreDispatch,
    c10::DispatchKey::PythonDispatcher,
});

// Whether any mode is active in this thread: the only thing a kernel reads outside a mode.
extern thread_local bool tls_active __attribute__((tls_model("initial-exec")));
// This thread's state (initial-exec TLS: one load, no __tls_get_addr call).
extern thread_local ThreadState* tls_state __attribute__((tls_model("initial-exec")));
ThreadState& new_thread_state();
inline ThreadState& thread_state() {
  ThreadState* state = tls_state;
  return state ? *state : new_thread_state();
}

// Settings handed over by the Python side at load (see compiled.py).
struct Settings {
  std::string inplace_prefix;  // stock's in-place error, up to the tensor's type
  std::string hint_plain, hint_anomaly;  // its last sentence, without and with anomaly mode
  bool strip_backward_suffix = true;  // stock names a node "Mul", not "MulBackward0"
};
const Settings& settings();

// The Python face of a tensor (module.cpp: the only TU that includes Python.h).
bool is_parameter_instance(const at::Tensor& tensor);  // isinstance(tensor, Parameter)
bool is_parameter(const at::Tensor& tensor);  // a Parameter, or a view of one (storage.is_parameter)
bool is_plain_tensor_object(const at::Tensor& tensor);  // no Python object, or exactly Tensor/Parameter
bool python_holds_this_thread();  // this thread holds the GIL: Python code is the caller
struct HolderCore;
// A slot's (unpack hook, packed data) as Python reads them (slots.NativeSlot(...).unpack,
// None): what the audit tabulates, and what compiled autograd calls. New references; needs
// the GIL.
std::pair<PyObject*, PyObject*> slot_view(Label form, const std::vector<at::Tensor>& kept,
                                          std::shared_ptr<HolderCore> core);

}  // namespace memsave
