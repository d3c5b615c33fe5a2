// What a re-hooked saved slot holds (the C++ twin of memsave_dispatch/slots.py): a ghost of a
// dropped tensor, an encoding, or the tensor itself until it is unshared; stock's version
// check for each; and the watch that tells when a tensor dies, for the unshared encodings.
#pragma once

#include "codecs.h"
#include "engine.h"

#include <c10/core/TensorImpl.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <array>
#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

namespace memsave {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using NodePtr = c10::intrusive_ptr<Node>;

// -- a tensor's lifetime -------------------------------------------------------------------
struct Waiting;

// Knows whether a tensor (its TensorImpl) is still alive, and runs the encodings waiting for
// its death. The Python engine learns of the death from a weakref on the tensor's Python
// object, which torch keeps alive exactly as long as the TensorImpl; here the TensorImpl
// carries a BackendMeta whose destructor reports it (see holders.cpp).
class WatchState {
 public:
  explicit WatchState(c10::TensorImpl* impl) : impl_(impl) {}
  // The tensor's grad_fn now, or nullptr once it died (then `alive` is false).
  NodePtr grad_fn_now(bool& alive) const;
  void add(std::shared_ptr<Waiting> waiting);
  bool remove(const std::shared_ptr<Waiting>& waiting);  // whether it was waiting here
  void died() noexcept;
  bool has_waiting() const;

 private:
  std::atomic<c10::TensorImpl*> impl_;
  mutable std::mutex mutex_;
  std::vector<std::shared_ptr<Waiting>> waiting_;
};

// The watch of `tensor` (attached on first use); nullptr if another library's metadata is there.
std::shared_ptr<WatchState> watch(const at::Tensor& tensor);

// -- stock's in-place check ------------------------------------------------------------------
// What stock's saved variable remembers of a tensor to report an in-place change of it, and
// its error word for word (slots.Origin).
class Origin {
 public:
  // A tensor the node keeps as is (an input, or an output that is a leaf).
  explicit Origin(const at::Tensor& tensor);
  // One of the node's outputs, `output_nr` of `owner`, through `alias` (sharing its version).
  Origin(const at::Tensor& alias, Node* owner, uint32_t output_nr);
  void check() const;

 private:
  c10::VariableVersion version_;
  uint32_t saved_version_;
  c10::SmallVector<int64_t, 6> sizes_;
  at::ScalarType dtype_;
  uint32_t output_nr_;
  bool leaf_;
  Node* owner_ = nullptr;
  std::shared_ptr<WatchState> watch_;  // a tensor the node keeps as is: named by its grad_fn then
  NodePtr grad_fn_at_save_;
};

// The CPU kernels of ops.cpp that read an encoding in place, from the ghost it rides on: ReLU's
// mask in threshold_backward, max pooling's window offsets in max_pool2d_with_indices_backward.
enum class Reader : uint8_t { None, ThresholdBackward, MaxPool2dBackward, kCount };
// Whether each is installed (ops.cpp sets it); an encoding goes to backward on a ghost only then.
extern std::array<std::atomic<bool>, size_t(Reader::kCount)> readers_installed;

// -- codecs as decisions use them ----------------------------------------------------------------
struct Encoded {
  KeptTensors kept;
  c10::SmallVector<int64_t, 6> sizes, strides;  // of the stand-in backward reads
  at::ScalarType dtype = at::kFloat;
  bool memory_order = false;  // bit k is the tensor's element at storage offset k (packed from it)
  int64_t nbytes() const;
};

// An exact compact stand-in (codecs.Codec): a bit mask or pooling offsets.
struct Codec {
  enum class Layout : uint8_t {
    Preserved,  // the decision keeps the tensor's strides (tensor.bool(), tensor.clone())
    Iterator,  // the decision is a TensorIterator result (tensor > 0, tensor != 0)
  };
  Label label = kBitMask;
  // bit mask: the decision per element, decoded as low/high in the tensor's dtype
  Predicate predicate = Predicate::NonZero;
  Layout layout = Layout::Preserved;
  std::function<at::Tensor(const at::Tensor&)> decide;  // a bool decision of the kernel's own (else: predicate)
  double low = 0.0, high = 1.0;
  Reader reader = Reader::None;  // the backward kernel that may read the encoding in place (EncodingOnGhost)
  // pooling offsets
  std::shared_ptr<const PoolingWindows> windows;

  Encoded encode(const at::Tensor& tensor) const;  // empty `kept`: cannot encode (keep the tensor)
  // What encode(indices) makes of window offsets made without the indices (max_pool_one_pass).
  Encoded encoded_offsets(const at::Tensor& indices, KeptTensors offsets) const;
  at::Tensor decode(const Encoded& encoded) const;
};

// -- holders ---------------------------------------------------------------------------------
// The state behind a slot's hooks, shared with Python's view of the slot and with a pending
// encoding (either may outlive the hooks).
struct HolderCore {
  explicit HolderCore(Origin origin) : origin(std::move(origin)) {}
  virtual ~HolderCore() = default;
  // `tensor` is the slot's tensor; `callers`: the very tensor the node saved (stock's "saved
  // original": an input, or an output that needs no gradient), not the detached alias stock's
  // hooks are given: a holder that keeps it keeps a detached alias of it.
  virtual void pack(const at::Tensor& tensor, bool callers) = 0;
  virtual at::Tensor unpack() = 0;  // raises stock's error if the tensor changed in place
  virtual Label form() const = 0;
  virtual std::vector<at::Tensor> kept() const = 0;
  Origin origin;
  mutable std::mutex mutex;
};

// Everything a backward kernel may read from a tensor except its values.
struct Layout {
  c10::SmallVector<int64_t, 6> sizes, strides;
  at::ScalarType dtype = at::kFloat;
  int64_t phase = 0;  // data pointer modulo 64 bytes, in elements
  bool operator==(const Layout& other) const {
    return dtype == other.dtype && phase == other.phase && sizes == other.sizes && strides == other.strides;
  }
  static Layout of(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype) {
    Layout layout;
    layout.sizes.assign(sizes.begin(), sizes.end());
    layout.strides.assign(strides.begin(), strides.end());
    layout.dtype = dtype;
    return layout;
  }
};

// A ghost of its own: a TensorImpl with the layout, whose storage is read-only zero pages.
at::Tensor make_ghost(const Layout& layout);

struct GhostCore final : HolderCore {
  using HolderCore::HolderCore;
  void pack(const at::Tensor& tensor, bool callers) override;
  at::Tensor unpack() override;
  Label form() const override { return kDropped; }
  std::vector<at::Tensor> kept() const override { return {}; }
  Layout layout;
};

struct EncodedCore final : HolderCore {
  EncodedCore(Origin origin, std::shared_ptr<const Codec> codec, bool deferred)
      : HolderCore(std::move(origin)), codec(std::move(codec)), deferred(deferred) {}
  void pack(const at::Tensor& tensor, bool callers) override;
  at::Tensor unpack() override;
  Label form() const override;
  std::vector<at::Tensor> kept() const override;
  void encode_locked(const at::Tensor& tensor, bool callers);
  std::shared_ptr<const Codec> codec;
  bool deferred;  // keeps the tensor until it is unshared
  at::Tensor original;  // while deferred (or where the codec could not encode it)
  Encoded encoded;
};

// An encoding handed to backward undecoded: on the TensorImpl of a ghost with the stand-in's
// layout, whose values are not read. The codec's reader (ops.cpp) reads the encoding where the
// ghost comes in; anything else decodes it first.
struct EncodingOnGhost final : c10::BackendMeta {
  EncodingOnGhost(std::shared_ptr<const Codec> codec, Encoded encoded) : codec(std::move(codec)), encoded(std::move(encoded)) {}
  c10::intrusive_ptr<c10::BackendMeta> clone(const c10::intrusive_ptr<c10::BackendMeta>& self) const override {
    return self;  // autograd's copy of an unpacked tensor keeps the encoding
  }
  at::Tensor decode() const { return codec->decode(encoded); }
  std::shared_ptr<const Codec> codec;
  Encoded encoded;
};
const EncodingOnGhost* encoding_on(const at::Tensor& tensor);  // nullptr: an ordinary tensor

// Give `slot` hooks over `core` (this packs at once and drops the slot's own reference).
void hook(SavedVariable& slot, std::shared_ptr<HolderCore> core);

// Python's view of a slot: its unpack hook, for the audit and compiled autograd.
at::Tensor unpack_for_python(const std::shared_ptr<HolderCore>& core);

// -- unshared encodings ------------------------------------------------------------------------
// An EncodeWhenUnshared slot waiting for its tensor's death (slots._Pending).
struct Waiting {
  std::weak_ptr<EncodedCore> holder;  // a deferred holder keeps the tensor...
  c10::weak_intrusive_ptr<Node> node{NodePtr()};  // ...or stock's slot does (the node's own output)
  SavedVariable* slot = nullptr;  // valid while `node` lives
  std::shared_ptr<const Codec> codec;
  c10::VariableVersion version;
  uint32_t saved_version = 0;
  uint32_t output_nr = 0;  // of the node's own output
  int64_t nbytes = 0;  // counted as kept when the call was recorded
  int dying_holders = 0;  // besides the dying tensor itself, holders of the storage dying with it
  int op = -1;
  std::shared_ptr<const TalliesList> tallies;  // of the modes active at the call
  std::shared_ptr<PendingBook> book;
  uint64_t epoch = 0;
};
void encode_unshared(Waiting& waiting);
// Measure what a watch sees when a tensor dies (once, at load).
void calibrate();

}  // namespace memsave
