// The extension's Python module (hand-written, no pybind11: it would triple the build time),
// the per-thread mode state, the tallies, and the Python face of tensors. Only
// memsave_dispatch/compiled.py calls these functions.
#include <Python.h>

#include "holders.h"
#include "ops.h"

#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Export.h>
#include <torch/library.h>

#include <chrono>

TORCH_PYTHON_API PyObject* THPVariable_Wrap(const at::TensorBase& var);

namespace memsave {

thread_local bool tls_active __attribute__((tls_model("initial-exec"))) = false;
std::atomic<bool> compiled_autograd_enabled{false};

thread_local ThreadState* tls_state __attribute__((tls_model("initial-exec"))) = nullptr;

ThreadState& new_thread_state() {
  // owned by a thread_local holder, destroyed at thread exit
  static thread_local std::unique_ptr<ThreadState> owner;
  owner = std::make_unique<ThreadState>();
  tls_state = owner.get();
  return *owner;
}

namespace {
Settings global_settings;
PyTypeObject* tensor_type = nullptr;
PyTypeObject* parameter_type = nullptr;
PyObject* slot_view_factory = nullptr;  // slots.NativeSlot
std::unique_ptr<torch::Library> marker_library;

// The mode's marker: a dispatch key in this thread's included set, with a fallthrough kernel
// for every operator, so it costs nothing per call; torch.compile's guards see it in every
// tensor's key set, so a graph compiled inside a mode is never reused outside it.
constexpr c10::DispatchKey kMarker = c10::DispatchKey::TESTING_ONLY_GenericMode;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

PyTypeObject* python_type(const at::Tensor& tensor) {
  PyObject* object = tensor.unsafeGetTensorImpl()->pyobj_slot()->load_pyobj();
  return object ? Py_TYPE(object) : nullptr;
}
}  // namespace

const Settings& settings() {
  return global_settings;
}

// -- tallies -----------------------------------------------------------------------------------
OpCounts& Tallies::seen(int op, int family) {
  OpCounts& counts = ops_.at(op);
  if (!counts.first_seen_ns) {
    counts.first_seen_ns = now_ns();
    counts.family = family;
  }
  return counts;
}

void Tallies::add_stock(int op, int family, Reason reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  ++seen(op, family).reasons[reason];
}

void Tallies::add_handled(int op, int family, int64_t stock_bytes, int64_t kept_bytes,
                          const std::array<uint8_t, kNumLabels>& labels) {
  std::lock_guard<std::mutex> lock(mutex_);
  OpCounts& counts = seen(op, family);
  ++counts.handled;
  counts.stock_bytes += stock_bytes;
  counts.kept_bytes += kept_bytes;
  for (int label = 0; label < kNumLabels; ++label)
    counts.labels[label] += labels[label];
}

void Tallies::reencode(int op, Label from, Label to, int64_t kept_delta) {
  std::lock_guard<std::mutex> lock(mutex_);
  OpCounts& counts = ops_.at(op);
  --counts.labels[from];
  ++counts.labels[to];
  counts.kept_bytes += kept_delta;
}

std::vector<OpCounts> Tallies::snapshot() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return ops_;
}

void Tallies::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& counts : ops_) counts = OpCounts();
}

// -- the Python face of tensors -------------------------------------------------------------------
bool is_parameter_instance(const at::Tensor& tensor) {
  PyTypeObject* type = python_type(tensor);
  return type && type != tensor_type && (type == parameter_type || PyType_IsSubtype(type, parameter_type));
}

bool is_parameter(const at::Tensor& tensor) {
  if (is_parameter_instance(tensor)) return true;
  return tensor.is_view() && is_parameter_instance(at::Tensor(tensor._base()));
}

bool python_holds_this_thread() {
  return Py_IsInitialized() && PyGILState_Check();
}

bool is_plain_tensor_object(const at::Tensor& tensor) {
  PyTypeObject* type = python_type(tensor);
  return !type || type == tensor_type || type == parameter_type;
}

namespace {
const char* kCoreCapsule = "memsave_dispatch.holder";

void free_core(PyObject* capsule) {
  delete static_cast<std::shared_ptr<HolderCore>*>(PyCapsule_GetPointer(capsule, kCoreCapsule));
}
}  // namespace

std::pair<PyObject*, PyObject*> slot_view(Label form, const std::vector<at::Tensor>& kept,
                                          std::shared_ptr<HolderCore> core) {
  PyObject* tensors = PyTuple_New(Py_ssize_t(kept.size()));
  for (size_t i = 0; i < kept.size(); ++i) PyTuple_SET_ITEM(tensors, i, THPVariable_Wrap(kept[i]));
  PyObject* capsule = PyCapsule_New(new std::shared_ptr<HolderCore>(std::move(core)), kCoreCapsule, free_core);
  PyObject* view = PyObject_CallFunction(slot_view_factory, "iOO", int(form), tensors, capsule);
  Py_DECREF(tensors);
  Py_DECREF(capsule);
  PyObject* unpack = view ? PyObject_GetAttrString(view, "unpack") : nullptr;
  Py_XDECREF(view);
  if (!unpack) {
    PyErr_Clear();
    TORCH_CHECK(false, "memsave_dispatch: could not describe a saved slot to Python");
  }
  Py_INCREF(Py_None);
  return {unpack, Py_None};
}

}  // namespace memsave

// -- the module ------------------------------------------------------------------------------------
namespace {
using namespace memsave;

const char* kTalliesCapsule = "memsave_dispatch.tallies";

#define MEMSAVE_TRY try {
#define MEMSAVE_CATCH                               \
  }                                                 \
  catch (const c10::Error& error) {                 \
    PyErr_SetString(PyExc_RuntimeError, error.what_without_backtrace()); \
    return nullptr;                                 \
  }                                                 \
  catch (const std::exception& error) {             \
    PyErr_SetString(PyExc_RuntimeError, error.what()); \
    return nullptr;                                 \
  }

bool int_list(PyObject* sequence, std::vector<int>& out) {
  PyObject* fast = PySequence_Fast(sequence, "expected a sequence of operator indices");
  if (!fast) return false;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); ++i) {
    const long value = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
    if (value == -1 && PyErr_Occurred()) {
      Py_DECREF(fast);
      return false;
    }
    out.push_back(int(value));
  }
  Py_DECREF(fast);
  return true;
}

std::shared_ptr<Tallies>* tallies_of(PyObject* capsule) {
  return static_cast<std::shared_ptr<Tallies>*>(PyCapsule_GetPointer(capsule, kTalliesCapsule));
}

void free_tallies(PyObject* capsule) {
  delete tallies_of(capsule);
}

// init(prefix, hint_plain, hint_anomaly, strip_backward_suffix, Tensor, Parameter, NativeSlot)
PyObject* py_init(PyObject*, PyObject* args) {
  const char *prefix, *hint_plain, *hint_anomaly;
  int strip;
  PyObject *tensor, *parameter, *factory;
  if (!PyArg_ParseTuple(args, "ssspO!O!O", &prefix, &hint_plain, &hint_anomaly, &strip, &PyType_Type, &tensor,
                        &PyType_Type, &parameter, &factory))
    return nullptr;
  MEMSAVE_TRY
  global_settings.inplace_prefix = prefix;
  global_settings.hint_plain = hint_plain;
  global_settings.hint_anomaly = hint_anomaly;
  global_settings.strip_backward_suffix = strip;
  tensor_type = reinterpret_cast<PyTypeObject*>(tensor);
  parameter_type = reinterpret_cast<PyTypeObject*>(parameter);
  Py_INCREF(tensor);
  Py_INCREF(parameter);
  Py_XDECREF(slot_view_factory);
  Py_INCREF(factory);
  slot_view_factory = factory;
  calibrate();
  if (!marker_library) {
    auto library = std::make_unique<torch::Library>(torch::Library::IMPL, "_", kMarker, __FILE__, __LINE__);
    library->fallback(torch::CppFunction::makeFallthrough());
    marker_library = std::move(library);
  }
  MEMSAVE_CATCH
  Py_RETURN_NONE;
}

PyObject* py_op_names(PyObject*, PyObject*) {
  const auto names = rule_op_names();
  PyObject* tuple = PyTuple_New(Py_ssize_t(names.size()));
  for (size_t i = 0; i < names.size(); ++i) PyTuple_SET_ITEM(tuple, i, PyUnicode_FromString(names[i].c_str()));
  return tuple;
}

// set_recipe_nodes(names): the node types with a recipe (a call with an input one produced goes
// to the Python engine)
PyObject* py_set_recipe_nodes(PyObject*, PyObject* arg) {
  PyObject* seq = PySequence_Fast(arg, "set_recipe_nodes takes a sequence of str");
  if (!seq) return nullptr;
  std::vector<std::string> names;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const char* name = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(seq, i));
    if (!name) {
      Py_DECREF(seq);
      return nullptr;
    }
    names.emplace_back(name);
  }
  Py_DECREF(seq);
  set_recipe_nodes(std::move(names));
  Py_RETURN_NONE;
}

PyObject* py_capture(PyObject*, PyObject* arg) {
  std::vector<int> ops;
  if (!int_list(arg, ops)) return nullptr;
  MEMSAVE_TRY capture(ops); MEMSAVE_CATCH
  Py_RETURN_NONE;
}

PyObject* py_install(PyObject*, PyObject* arg) {
  std::vector<int> ops;
  if (!int_list(arg, ops)) return nullptr;
  MEMSAVE_TRY install(ops); MEMSAVE_CATCH
  Py_RETURN_NONE;
}

PyObject* py_uninstall(PyObject*, PyObject*) {
  MEMSAVE_TRY uninstall(); MEMSAVE_CATCH
  Py_RETURN_NONE;
}

PyObject* py_new_tallies(PyObject*, PyObject*) {
  auto* tallies = new std::shared_ptr<Tallies>(std::make_shared<Tallies>(rule_op_names().size()));
  return PyCapsule_New(tallies, kTalliesCapsule, free_tallies);
}

// push(tallies, entries): a mode entered this thread; entries: (op, compiled, cpu, family) per
// operator it handles.
PyObject* py_push(PyObject*, PyObject* args) {
  PyObject *capsule, *entries;
  if (!PyArg_ParseTuple(args, "OO", &capsule, &entries)) return nullptr;
  auto* tallies = tallies_of(capsule);
  if (!tallies) return nullptr;
  auto scope = std::make_shared<Scope>();
  scope->tallies = *tallies;
  scope->entries.resize(rule_op_names().size());
  PyObject* fast = PySequence_Fast(entries, "entries: a sequence of (op, compiled, cpu, family)");
  if (!fast) return nullptr;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); ++i) {
    int op, compiled, cpu, family;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "ippi", &op, &compiled, &cpu, &family) || op < 0 ||
        size_t(op) >= scope->entries.size()) {
      Py_DECREF(fast);
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad operator index");
      return nullptr;
    }
    scope->entries[op] = Entry{true, bool(compiled), bool(cpu), family};
  }
  Py_DECREF(fast);
  ThreadState& thread = thread_state();
  thread.scopes.push_back(std::move(scope));
  thread.scopes_changed();
  tls_active = true;
  c10::impl::tls_set_dispatch_key_included(kMarker, true);
  Py_RETURN_NONE;
}

// pop(tallies) -> whether no mode is left in this thread: the innermost scope of that mode goes
// (an exit out of order is tolerated).
PyObject* py_pop(PyObject*, PyObject* capsule) {
  auto* tallies = tallies_of(capsule);
  if (!tallies) return nullptr;
  ThreadState& thread = thread_state();
  auto& scopes = thread.scopes;
  for (size_t i = scopes.size(); i-- > 0;) {
    if (scopes[i]->tallies == *tallies) {
      scopes.erase(scopes.begin() + i);
      thread.scopes_changed();
      break;
    }
  }
  const bool empty = scopes.empty();
  if (empty) {
    tls_active = false;
    c10::impl::tls_set_dispatch_key_included(kMarker, false);
  }
  return PyBool_FromLong(empty);
}

template <size_t N>
PyObject* counts_tuple(const std::array<int64_t, N>& values) {
  PyObject* tuple = PyTuple_New(Py_ssize_t(N));
  for (size_t i = 0; i < N; ++i) PyTuple_SET_ITEM(tuple, i, PyLong_FromLongLong(values[i]));
  return tuple;
}

// snapshot(tallies) -> [(op, first_seen_ns, family, handled, stock_bytes, kept_bytes, reasons, labels)]
PyObject* py_snapshot(PyObject*, PyObject* capsule) {
  auto* tallies = tallies_of(capsule);
  if (!tallies) return nullptr;
  const auto all = (*tallies)->snapshot();
  PyObject* list = PyList_New(0);
  for (size_t op = 0; op < all.size(); ++op) {
    const OpCounts& c = all[op];
    if (!c.first_seen_ns) continue;
    PyObject* row = Py_BuildValue("(iLiLLLNN)", int(op), (long long)c.first_seen_ns, c.family, (long long)c.handled,
                                  (long long)c.stock_bytes, (long long)c.kept_bytes, counts_tuple(c.reasons),
                                  counts_tuple(c.labels));
    PyList_Append(list, row);
    Py_DECREF(row);
  }
  return list;
}

PyObject* py_clear(PyObject*, PyObject* capsule) {
  auto* tallies = tallies_of(capsule);
  if (!tallies) return nullptr;
  (*tallies)->clear();
  Py_RETURN_NONE;
}

PyObject* py_pending_count(PyObject*, PyObject*) {
  return PyLong_FromLongLong(thread_state().pending->waiting.load());
}

// The thread's outermost mode exited: the encodings still waiting are dropped.
PyObject* py_forget_pending(PyObject*, PyObject*) {
  auto& book = *thread_state().pending;
  book.epoch.fetch_add(1, std::memory_order_acq_rel);
  book.waiting.store(0);
  Py_RETURN_NONE;
}

PyObject* py_outputs_held(PyObject*, PyObject*) {
  return PyLong_FromLong(thread_state().outputs_held);
}

PyObject* py_set_compiled_autograd(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  compiled_autograd_enabled.store(on);
  Py_RETURN_NONE;
}

// unpack_slot(holder) -> the tensor backward reads (compiled autograd calls a slot's unpack hook)
PyObject* py_unpack_slot(PyObject*, PyObject* capsule) {
  auto* core = static_cast<std::shared_ptr<HolderCore>*>(PyCapsule_GetPointer(capsule, kCoreCapsule));
  if (!core) return nullptr;
  MEMSAVE_TRY
  at::Tensor tensor;
  {
    PyThreadState* saved = PyEval_SaveThread();
    try {
      tensor = unpack_for_python(*core);
    } catch (...) {
      PyEval_RestoreThread(saved);
      throw;
    }
    PyEval_RestoreThread(saved);
  }
  return THPVariable_Wrap(tensor);
  MEMSAVE_CATCH
}

PyObject* py_encoding_threads(PyObject*, PyObject*) {
  return PyLong_FromLong(encoding_threads());
}

PyObject* py_encoding_threads_allowed(PyObject*, PyObject*) {
  return PyLong_FromLong(encoding_threads_allowed());
}

PyObject* py_tile_scatters(PyObject*, PyObject*) {
  return PyLong_FromLongLong(tile_scatters.load(std::memory_order_relaxed));
}

PyObject* py_one_pass_poolings(PyObject*, PyObject*) {
  return PyLong_FromLongLong(one_pass_poolings.load(std::memory_order_relaxed));
}

PyMethodDef methods[] = {
    {"init", py_init, METH_VARARGS, "hand over the settings read from this torch release"},
    {"op_names", py_op_names, METH_NOARGS, "the operators with a C++ saving rule, by index"},
    {"set_recipe_nodes", py_set_recipe_nodes, METH_O, "the autograd node types with a recipe"},
    {"capture", py_capture, METH_O, "capture stock's kernels of these operators (before any override)"},
    {"install", py_install, METH_O, "install this engine's kernels for these operators"},
    {"uninstall", py_uninstall, METH_NOARGS, "remove every kernel of this engine"},
    {"new_tallies", py_new_tallies, METH_NOARGS, "counters for one mode"},
    {"push", py_push, METH_VARARGS, "a mode entered this thread"},
    {"pop", py_pop, METH_O, "a mode exited this thread; returns whether none is left"},
    {"snapshot", py_snapshot, METH_O, "a mode's counters"},
    {"clear", py_clear, METH_O, "reset a mode's counters"},
    {"pending_count", py_pending_count, METH_NOARGS, "tensors of this thread with encodings waiting for them"},
    {"forget_pending", py_forget_pending, METH_NOARGS, "drop this thread's waiting encodings"},
    {"outputs_held", py_outputs_held, METH_NOARGS, "-1 outside a max-pooling call, else whether its caller keeps the outputs"},
    {"set_compiled_autograd", py_set_compiled_autograd, METH_O, "compiled autograd on or off (process-wide)"},
    {"unpack_slot", py_unpack_slot, METH_O, "unpack a slot this engine holds"},
    {"encoding_threads", py_encoding_threads, METH_NOARGS, "the threads an encoding's parallel tasks run on"},
    {"encoding_threads_allowed", py_encoding_threads_allowed, METH_NOARGS, "the most threads they may run on"},
    {"tile_scatters", py_tile_scatters, METH_NOARGS, "max-pool backward calls that wrote each element once (2x2 tiles)"},
    {"one_pass_poolings", py_one_pass_poolings, METH_NOARGS, "max-pool forward calls that made the offsets in one pass"},
    {nullptr, nullptr, 0, nullptr}};

#define MEMSAVE_STRINGIFY2(x) #x
#define MEMSAVE_STRINGIFY(x) MEMSAVE_STRINGIFY2(x)
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, MEMSAVE_STRINGIFY(TORCH_EXTENSION_NAME), nullptr, -1, methods};

}  // namespace

#define MEMSAVE_CONCAT2(a, b) a##b
#define MEMSAVE_CONCAT(a, b) MEMSAVE_CONCAT2(a, b)
PyMODINIT_FUNC MEMSAVE_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModule_Create(&module_def);
}
