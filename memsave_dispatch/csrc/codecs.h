// Exact compact encodings, byte for byte the ones the Python engine makes
// (memsave_dispatch/codecs.py): the same bits in the same order, so both engines keep the
// same bytes and hand backward the same stand-ins. One pass each, parallel over the tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/SmallVector.h>

#include <array>
#include <atomic>
#include <memory>
#include <vector>

namespace memsave {

// The tensors an encoding keeps: a bit mask, a byte per window position, or two bit planes.
using KeptTensors = c10::SmallVector<at::Tensor, 2>;

// Which yes/no decision of an element a bit keeps.
enum class Predicate : uint8_t {
  NonZero,  // bool(x): x != 0, NaN included (a ReLU output's "y > 0")
  Positive,  // x > 0, NaN excluded (leaky ReLU's input)
  Bool,  // a bool tensor's own value
};

// The predicate of every element of a dense tensor, in memory order, 8 per byte, first
// element in the lowest bit (BitMask.pack). Floating or bool tensors.
at::Tensor pack_bits(const at::Tensor& dense, Predicate predicate);

// A tensor of `dtype` laid out as sizes/strides (dense), holding `high` where the bit is set
// and `low` elsewhere (BitMaskCodec.decode).
at::Tensor unpack_bits(const at::Tensor& bits, at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype,
                       double low, double high);

// threshold_backward(grad, y, 0) from y's bits (pack_bits(y, NonZero)): grad where y's element
// has its bit set, +0 elsewhere. `stand_in` has y's sizes, strides and dtype (float or double; its
// values are not read); the output is laid out as stock's kernel lays it out, by the same
// TensorIterator configuration over (stand_in, grad).
at::Tensor select_by_bits(const at::Tensor& bits, const at::Tensor& stand_in, const at::Tensor& grad);

// The threads the encodings' parallel tasks run on (one where the extension was built without
// the parallel backend torch runs on: ATen's parallel_for is a header template).
int encoding_threads();
// The most threads they may run on (1 where the extension was built without OpenMP).
int encoding_threads_allowed();

// Whether a dense layout is row-major (size-1 dimensions' strides do not matter).
bool row_major(at::IntArrayRef sizes, at::IntArrayRef strides);

// Max pooling's windows over the last `dims` dimensions of one input plane (codecs.PoolingWindows).
struct PoolingWindows {
  std::vector<std::vector<int64_t>> corner;  // per spatial dim, per output position: its flat-index contribution
  std::vector<int64_t> deltas;  // flat step of each window position, row-major over the window
  std::vector<uint8_t> offset_of;  // step - low -> position (255: none)
  int64_t beyond = 0;  // offset_of's entry (255) for every step below low or past the last
  std::vector<int64_t> origins;  // per output position of a plane (row-major): its window's origin
  int64_t low = 0;
  // A 2-d regular pooling's geometry, per dim (height, width); input width 0 otherwise
  struct Grid {
    std::array<int64_t, 2> kernel{}, stride{}, padding{}, dilation{}, in{}, out{};
  } grid;
  // 2x2 windows with stride 2 and neither padding nor dilation, none reaching past the input
  // (each input element then lies in one window at most)
  bool tiled = false;
  bool two_bits() const { return deltas.size() <= 4; }
  // whether max_pool_one_pass takes these windows: tiles (two bit planes) or a 2-d pooling
  // whose offsets are bytes
  bool one_pass() const { return tiled || (grid.in[1] > 0 && !two_bits()); }
};

// nullptr where no offset describes every index (as the Python engine's windows are None).
std::shared_ptr<const PoolingWindows> regular_windows(at::IntArrayRef in_sizes, at::IntArrayRef out_sizes,
                                                      at::IntArrayRef kernel, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation);
std::shared_ptr<const PoolingWindows> adaptive_windows(at::IntArrayRef in_sizes, at::IntArrayRef out_sizes);

// Argmax indices (dense int64) as window offsets: one uint8 per index, or two bit planes
// (low bit, high bit) when a window has at most four positions. Empty if some index is not
// inside its window.
KeptTensors encode_offsets(const at::Tensor& indices, const PoolingWindows& windows);
at::Tensor decode_offsets(at::TensorList kept, const PoolingWindows& windows, at::IntArrayRef sizes,
                          at::IntArrayRef strides);

// max_pool2d_with_indices_backward from the offsets of row-major indices, without them: a
// contiguous gradient of the input, +0 everywhere, then, plane by plane, each output's gradient
// added where its offset points, in the order stock's kernel adds (float or double). Where the
// windows are tiles, each element is written once: +0 plus the gradient that points there, or +0.
at::Tensor scatter_by_offsets(at::TensorList kept, const PoolingWindows& windows,
                              const at::Tensor& grad_output, at::IntArrayRef input_sizes);
// How many of those calls wrote each element once (the windows were tiles): what tests read.
extern std::atomic<int64_t> tile_scatters;

// max_pool2d of a contiguous float or double input (its last two dimensions the plane) over
// windows that take it (windows.one_pass()), in one pass: each window's maximum as stock's
// kernel picks it (the first largest value, or the last NaN), and its window offset as
// encode_offsets would write it from stock's indices (two bit planes for tiles, else a byte
// each). No int64 indices are made.
struct OnePassPooling {
  at::Tensor out;  // laid out as stock's (contiguous)
  KeptTensors offsets;
};
OnePassPooling max_pool_one_pass(const at::Tensor& input, const PoolingWindows& windows);
// How many forwards ran so: what tests read.
extern std::atomic<int64_t> one_pass_poolings;

}  // namespace memsave
