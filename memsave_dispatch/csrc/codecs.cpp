// Bit masks and pooling-window offsets, one pass each, parallel over the tensor. Buffers come
// straight from the CPU allocator (no dispatcher): encodings may be made when a tensor dies,
// whatever dispatch state that thread is in.
#include "codecs.h"

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

// The bit planes' bytes are read and written eight at a time as integers: element 8b+j is bit j
// of byte b only where the lowest byte comes first.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "memsave_dispatch's codecs assume a little-endian CPU");

namespace memsave {
namespace {

// Elements per parallel task: stock's own grain (at::internal::GRAIN_SIZE), so that an
// encoding splits over the threads wherever the kernel that made the tensor did.
constexpr int64_t kGrain = 1 << 15;

// What at::detail::empty_cpu({n}, uint8) makes, without its generic path (options, memory format): an
// encoding's kept bytes, from the CPU allocator (which the profiler's memory events see).
at::Tensor empty_bytes(int64_t n) {
  c10::Allocator* allocator = c10::GetCPUAllocator();
  c10::Storage storage(c10::Storage::use_byte_size_t(), n, allocator, /*resizable=*/true);
  at::Tensor bytes = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                              caffe2::TypeMeta::Make<uint8_t>());
  bytes.unsafeGetTensorImpl()->set_sizes_contiguous({n});
  return bytes;
}

// Bit k of a bit plane: element k's, the first element in the lowest bit of byte 0.
inline uint32_t bit_of(const uint8_t* bits, int64_t k) {
  return (bits[k >> 3] >> (k & 7)) & 1;
}

// -- packing -------------------------------------------------------------------------------
// Elements as unsigned integers of their width: the predicates read the bits.
template <typename U>
struct Bits {
  static constexpr U sign = U(U(1) << (sizeof(U) * 8 - 1));
  static constexpr U magnitude = U(~sign);
};

template <typename U>
inline bool decide(U u, Predicate predicate, U infinity) {
  switch (predicate) {
    case Predicate::NonZero:
      return (u & Bits<U>::magnitude) != 0;
    case Predicate::Positive:
      return u != 0 && u <= infinity;  // sign clear, not +0, not NaN
    case Predicate::Bool:
      return u != 0;
  }
  return false;
}

template <typename U>
inline uint8_t pack8(const U* p, Predicate predicate, U infinity) {
  uint8_t byte = 0;
  for (int j = 0; j < 8; ++j) byte |= uint8_t(decide(p[j], predicate, infinity)) << j;
  return byte;
}

#if defined(__x86_64__)
// bool(x) of 32 floats at a time: magnitude != 0.
__attribute__((target("avx2"))) int64_t pack_nonzero_f32_avx2(const uint32_t* src, uint8_t* dst, int64_t b0, int64_t b1) {
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  const __m256i zero = _mm256_setzero_si256();
  int64_t b = b0;
  for (; b + 4 <= b1; b += 4) {
    uint32_t word = 0;
    for (int k = 0; k < 4; ++k) {
      __m256i x = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (b + k) * 8)), magnitude);
      __m256i is_zero = _mm256_cmpeq_epi32(x, zero);
      word |= uint32_t(~_mm256_movemask_ps(_mm256_castsi256_ps(is_zero)) & 0xff) << (8 * k);
    }
    std::memcpy(dst + b, &word, 4);
  }
  return b;
}
const bool kAvx2 = __builtin_cpu_supports("avx2");
#endif

template <typename U>
void pack_elements(const U* src, uint8_t* dst, int64_t n, Predicate predicate, U infinity) {
  const int64_t full = n / 8;
  at::parallel_for(0, full, kGrain / 8, [&](int64_t b0, int64_t b1) {
    int64_t b = b0;
#if defined(__x86_64__)
    if constexpr (sizeof(U) == 4) {
      if (kAvx2 && predicate == Predicate::NonZero) b = pack_nonzero_f32_avx2(reinterpret_cast<const uint32_t*>(src), dst, b0, b1);
    }
#endif
    for (; b < b1; ++b) dst[b] = pack8(src + b * 8, predicate, infinity);
  });
  if (n % 8) {
    U tail[8] = {};  // padding bits are zero, as the Python engine pads with False
    std::memcpy(tail, src + full * 8, (n % 8) * sizeof(U));
    dst[full] = pack8(tail, predicate, infinity);
  }
}

// -- unpacking -----------------------------------------------------------------------------
// bool is stored as its byte (std::vector<bool> packs bits)
template <typename T>
using Stored = std::conditional_t<std::is_same_v<T, bool>, uint8_t, T>;

template <typename T>
std::shared_ptr<const std::vector<Stored<T>>> value_table(double low, double high) {
  // 256 x 8: entry [byte * 8 + j] is high if bit j of byte is set, else low
  static std::mutex mutex;
  static std::map<std::pair<uint64_t, uint64_t>, std::shared_ptr<const std::vector<Stored<T>>>> tables;
  uint64_t low_bits, high_bits;
  std::memcpy(&low_bits, &low, 8);  // -0.0 and 0.0 are different stand-ins
  std::memcpy(&high_bits, &high, 8);
  std::lock_guard<std::mutex> lock(mutex);
  auto& found = tables[{low_bits, high_bits}];
  if (!found) {
    auto table = std::make_shared<std::vector<Stored<T>>>(256 * 8);
    const Stored<T> low_value = Stored<T>(static_cast<T>(low)), high_value = Stored<T>(static_cast<T>(high));
    for (int byte = 0; byte < 256; ++byte)
      for (int j = 0; j < 8; ++j) (*table)[byte * 8 + j] = (byte >> j) & 1 ? high_value : low_value;
    found = std::move(table);
  }
  return found;
}

}  // namespace

at::Tensor pack_bits(const at::Tensor& dense, Predicate predicate) {
  TORCH_INTERNAL_ASSERT(dense.is_non_overlapping_and_dense() && dense.device().is_cpu());
  const int64_t n = dense.numel();
  at::Tensor bits = empty_bytes((n + 7) / 8);
  uint8_t* dst = bits.data_ptr<uint8_t>();
  const void* src = dense.const_data_ptr();
  switch (dense.scalar_type()) {
    case at::kFloat:
      pack_elements(static_cast<const uint32_t*>(src), dst, n, predicate, uint32_t(0x7f800000u));
      break;
    case at::kDouble:
      pack_elements(static_cast<const uint64_t*>(src), dst, n, predicate, uint64_t(0x7ff0000000000000ull));
      break;
    case at::kBFloat16:
      pack_elements(static_cast<const uint16_t*>(src), dst, n, predicate, uint16_t(0x7f80));
      break;
    case at::kHalf:
      pack_elements(static_cast<const uint16_t*>(src), dst, n, predicate, uint16_t(0x7c00));
      break;
    case at::kBool:
      TORCH_INTERNAL_ASSERT(predicate == Predicate::Bool);
      pack_elements(static_cast<const uint8_t*>(src), dst, n, predicate, uint8_t(1));
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "memsave: no bit packing for ", dense.scalar_type());
  }
  return bits;
}

// Each kept byte becomes its 8 elements, copied from a table of all 256 (L1-resident), in one
// parallel pass straight into the stand-in backward reads.
namespace {
#if defined(__x86_64__)
// 4-byte elements: 32 bytes per load and store.
__attribute__((target("avx2"))) void expand_bytes_4_avx2(const uint8_t* src, uint32_t* dst, int64_t b0, int64_t b1,
                                                         const uint32_t* table) {
  for (int64_t b = b0; b < b1; ++b) {
    const __m256i row = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + int64_t(src[b]) * 8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + b * 8), row);
  }
}
#endif

template <typename T>
void expand_bytes(const uint8_t* src, T* dst, int64_t bytes, double low, double high) {
  const auto table_ref = value_table<T>(low, high);
  const auto* table = reinterpret_cast<const T*>(table_ref->data());
  at::parallel_for(0, bytes, kGrain / 8, [&](int64_t b0, int64_t b1) {
#if defined(__x86_64__)
    if constexpr (sizeof(T) == 4) {
      if (kAvx2) {
        expand_bytes_4_avx2(src, reinterpret_cast<uint32_t*>(dst), b0, b1, reinterpret_cast<const uint32_t*>(table));
        return;
      }
    }
#endif
    for (int64_t b = b0; b < b1; ++b) std::memcpy(dst + b * 8, table + int64_t(src[b]) * 8, 8 * sizeof(T));
  });
}

at::Tensor restrided(at::Tensor tensor, at::IntArrayRef sizes, at::IntArrayRef strides) {
  tensor.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides);
  return tensor;
}
}  // namespace

at::Tensor unpack_bits(const at::Tensor& bits, at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype,
                       double low, double high) {
  const int64_t bytes = bits.numel();
  at::Tensor values(at::detail::empty_cpu({bytes * 8}, at::TensorOptions().dtype(dtype)));
  const uint8_t* src = bits.const_data_ptr<uint8_t>();
  void* dst = values.data_ptr();
  switch (dtype) {
    case at::kFloat: expand_bytes(src, static_cast<float*>(dst), bytes, low, high); break;
    case at::kDouble: expand_bytes(src, static_cast<double*>(dst), bytes, low, high); break;
    case at::kBFloat16: expand_bytes(src, static_cast<at::BFloat16*>(dst), bytes, low, high); break;
    case at::kHalf: expand_bytes(src, static_cast<at::Half*>(dst), bytes, low, high); break;
    case at::kBool: expand_bytes(src, static_cast<bool*>(dst), bytes, low, high); break;
    case at::kByte: expand_bytes(src, static_cast<uint8_t*>(dst), bytes, low, high); break;
    default: TORCH_INTERNAL_ASSERT(false, "memsave: no bit unpacking to ", dtype);
  }
  return restrided(std::move(values), sizes, strides);  // the padding after the last element is not read
}

// -- selecting by bits ------------------------------------------------------------------------
namespace {
// `value` where bit k is set, else +0 (an all-ones or all-zeros mask over its bits).
template <typename U>
inline U kept_where(U value, const uint8_t* bits, int64_t k) {
  return value & (U(0) - U(bit_of(bits, k)));
}

// A run of `n` elements, each stored next to the last, starting at bit k.
template <typename U>
void select_run(U* out, const U* grad, const uint8_t* bits, int64_t k, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = kept_where(grad[i], bits, k + i);
}

#if defined(__x86_64__)
// Lane j all ones where bit j of `bits` is set.
__attribute__((target("avx2"))) inline __m256 lanes_of_bits(uint32_t bits) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(bits)), bit), bit));
}

// The same for 4-byte elements, 8 (one byte of bits) at a time once k is at a byte's start.
__attribute__((target("avx2"))) void select_run_avx2(uint32_t* out, const uint32_t* grad, const uint8_t* bits,
                                                      int64_t k, int64_t n) {
  const int64_t head = std::min(n, (8 - (k & 7)) & 7);
  select_run(out, grad, bits, k, head);
  int64_t i = head;
  for (; i + 8 <= n; i += 8) {
    const __m256 keep = lanes_of_bits(bits[(k + i) >> 3]);
    const __m256 values = _mm256_loadu_ps(reinterpret_cast<const float*>(grad + i));
    _mm256_storeu_ps(reinterpret_cast<float*>(out + i), _mm256_and_ps(values, keep));
  }
  select_run(out + i, grad + i, bits, k + i, n - i);
}
#endif

// Operands: output, stand-in, grad. The stand-in's element address gives its bit (memory order).
template <typename U>
void select_elements(at::TensorIterator& iter, const char* base, const uint8_t* bits) {
  constexpr int64_t kSize = int64_t(sizeof(U));
  iter.for_each([&](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
    for (int64_t j = 0; j < size1; ++j) {
      char* out = data[0] + j * strides[3];
      const char* in = data[1] + j * strides[4];
      const char* grad = data[2] + j * strides[5];
      if (strides[0] == kSize && strides[1] == kSize && strides[2] == kSize) {
        const int64_t k = (in - base) / kSize;
#if defined(__x86_64__)
        if constexpr (kSize == 4) {
          if (kAvx2) {
            select_run_avx2(reinterpret_cast<uint32_t*>(out), reinterpret_cast<const uint32_t*>(grad), bits, k, size0);
            continue;
          }
        }
#endif
        select_run(reinterpret_cast<U*>(out), reinterpret_cast<const U*>(grad), bits, k, size0);
        continue;
      }
      for (int64_t i = 0; i < size0; ++i) {
        U value;
        std::memcpy(&value, grad + i * strides[2], sizeof(U));
        value = kept_where(value, bits, (in + i * strides[1] - base) / kSize);
        std::memcpy(out + i * strides[0], &value, sizeof(U));
      }
    }
  });
}
}  // namespace

at::Tensor select_by_bits(const at::Tensor& bits, const at::Tensor& stand_in, const at::Tensor& grad) {
  at::TensorIteratorConfig config;  // structured threshold_backward's: build_borrowing_binary_op(out, self, grad)
  config.set_check_mem_overlap(true)
      .allow_cpu_scalars(true)
      .promote_inputs_to_common_dtype(true)
      .cast_common_dtype_to_outputs(true)
      .enforce_safe_casting_to_output(true)
      .add_owned_output(at::Tensor())
      .add_owned_const_input(stand_in)
      .add_owned_const_input(grad);
  at::TensorIterator iter = config.build();
  const char* base = static_cast<const char*>(stand_in.const_data_ptr());
  const uint8_t* bit_bytes = bits.const_data_ptr<uint8_t>();
  switch (stand_in.scalar_type()) {
    case at::kFloat: select_elements<uint32_t>(iter, base, bit_bytes); break;
    case at::kDouble: select_elements<uint64_t>(iter, base, bit_bytes); break;
    default: TORCH_INTERNAL_ASSERT(false, "memsave: no selection by bits for ", stand_in.scalar_type());
  }
  return iter.output();
}

int encoding_threads_allowed() {
#ifdef _OPENMP
  return omp_get_max_threads();  // this extension's OpenMP runtime: torch's follows set_num_threads
#else
  return 1;
#endif
}

int encoding_threads() {
  const int64_t tasks = std::max(1, at::get_num_threads());
  std::vector<std::atomic<bool>> ran(size_t(tasks) + 1);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) { ran[std::min<size_t>(at::get_thread_num(), tasks)] = true; });
  int threads = 0;
  for (const auto& flag : ran) threads += flag.load();
  return threads;
}

// -- pooling windows -------------------------------------------------------------------------
bool row_major(at::IntArrayRef sizes, at::IntArrayRef strides) {
  int64_t expected = 1;
  for (int64_t d = int64_t(sizes.size()) - 1; d >= 0; --d) {
    if (sizes[d] == 1) continue;
    if (strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

namespace {

std::vector<int64_t> plane_strides(at::IntArrayRef sizes) {
  std::vector<int64_t> strides(sizes.size());
  int64_t step = 1;
  for (int64_t d = int64_t(sizes.size()) - 1; d >= 0; --d) {
    strides[d] = step;
    step *= sizes[d];
  }
  return strides;
}

std::shared_ptr<PoolingWindows> finish(std::shared_ptr<PoolingWindows> windows) {
  const auto [low, high] = std::minmax_element(windows->deltas.begin(), windows->deltas.end());
  windows->low = *low;
  windows->beyond = *high - *low + 1;  // the entry of every step out of range
  windows->offset_of.assign(windows->beyond + 4, 255);  // (3 more: a 4-byte gather may read them)
  for (size_t k = 0; k < windows->deltas.size(); ++k) windows->offset_of[windows->deltas[k] - *low] = uint8_t(k);
  windows->origins = {0};
  for (const auto& corner : windows->corner) {
    std::vector<int64_t> next;
    next.reserve(windows->origins.size() * corner.size());
    for (int64_t origin : windows->origins)
      for (int64_t c : corner) next.push_back(origin + c);
    windows->origins = std::move(next);
  }
  return windows;
}

// Row-major over the window: deltas of dim d+1 vary fastest.
void add_dimension(std::vector<int64_t>& deltas, int64_t positions, int64_t step) {
  std::vector<int64_t> next;
  next.reserve(deltas.size() * positions);
  for (int64_t delta : deltas)
    for (int64_t p = 0; p < positions; ++p) next.push_back(delta + p * step);
  deltas = std::move(next);
}

}  // namespace

std::shared_ptr<const PoolingWindows> regular_windows(at::IntArrayRef in_sizes, at::IntArrayRef out_sizes,
                                                      at::IntArrayRef kernel, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  int64_t positions = 1;
  for (int64_t k : kernel) {
    positions *= k;
    if (positions > 255) return nullptr;  // (before any table of that size is built)
  }
  const auto plane = plane_strides(in_sizes);
  auto windows = std::make_shared<PoolingWindows>();
  windows->deltas = {0};
  for (size_t d = 0; d < in_sizes.size(); ++d) {
    std::vector<int64_t> corner(out_sizes[d]);
    for (int64_t o = 0; o < out_sizes[d]; ++o) corner[o] = (o * stride[d] - padding[d]) * plane[d];
    windows->corner.push_back(std::move(corner));
    add_dimension(windows->deltas, kernel[d], dilation[d] * plane[d]);
  }
  auto sorted = windows->deltas;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end() || sorted.size() > 255) return nullptr;
  const auto all = [](at::IntArrayRef values, int64_t value) {
    return std::all_of(values.begin(), values.end(), [&](int64_t v) { return v == value; });
  };
  windows->tiled = in_sizes.size() == 2 && all(kernel, 2) && all(stride, 2) && all(padding, 0) && all(dilation, 1) &&
                   2 * out_sizes[0] <= in_sizes[0] && 2 * out_sizes[1] <= in_sizes[1];
  if (in_sizes.size() == 2)
    for (size_t d = 0; d < 2; ++d) {
      windows->grid.kernel[d] = kernel[d];
      windows->grid.stride[d] = stride[d];
      windows->grid.padding[d] = padding[d];
      windows->grid.dilation[d] = dilation[d];
      windows->grid.in[d] = in_sizes[d];
      windows->grid.out[d] = out_sizes[d];
    }
  return finish(std::move(windows));
}

std::shared_ptr<const PoolingWindows> adaptive_windows(at::IntArrayRef in_sizes, at::IntArrayRef out_sizes) {
  const auto plane = plane_strides(in_sizes);
  auto windows = std::make_shared<PoolingWindows>();
  windows->deltas = {0};
  for (size_t d = 0; d < in_sizes.size(); ++d) {
    const int64_t in = in_sizes[d], out = out_sizes[d];
    std::vector<int64_t> corner(out);
    int64_t widest = 0;
    for (int64_t i = 0; i < out; ++i) {
      const int64_t start = (i * in) / out, end = ((i + 1) * in + out - 1) / out;
      corner[i] = start * plane[d];
      widest = std::max(widest, end - start);
    }
    windows->corner.push_back(std::move(corner));
    add_dimension(windows->deltas, widest, plane[d]);
  }
  if (windows->deltas.size() > 255) return nullptr;
  return finish(std::move(windows));
}

namespace {

// A dense tensor's elements in memory order, in runs along its innermost memory dimension,
// with the coordinates of its last `spatial` dimensions kept up to date (no division per element).
class MemoryWalk {
 public:
  using Coords = c10::SmallVector<int64_t, 8>;

  MemoryWalk(at::IntArrayRef sizes, at::IntArrayRef strides, size_t spatial) : spatial_(spatial) {
    const int64_t dims = sizes.size();
    c10::SmallVector<int64_t, 8> order;
    for (int64_t d = 0; d < dims; ++d)
      if (sizes[d] != 1) order.push_back(d);  // a size-1 dimension has one coordinate: 0
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return strides[a] > strides[b]; });
    for (int64_t d : order) {
      size_.push_back(sizes[d]);
      role_.push_back(d >= dims - int64_t(spatial) ? int(d - (dims - spatial)) : -1);
    }
    if (size_.empty()) {
      size_.push_back(1);
      role_.push_back(-1);
    }
  }

  // f(m, run, coords, inner): elements m .. m+run-1; coords: the spatial coordinates of
  // element m; along the run, spatial dim `inner` (or none: -1) advances by one per element.
  template <class F>
  void for_runs(int64_t m0, int64_t m1, F&& f) const {
    const int64_t dims = size_.size();
    Coords c(dims);
    int64_t rest = m0;
    for (int64_t k = dims - 1; k >= 0; --k) {
      c[k] = rest % size_[k];
      rest /= size_[k];
    }
    Coords coords(spatial_, 0);
    const int inner = role_[dims - 1];
    int64_t m = m0;
    while (m < m1) {
      std::fill(coords.begin(), coords.end(), 0);
      for (int64_t k = 0; k < dims; ++k)
        if (role_[k] >= 0) coords[role_[k]] = c[k];
      const int64_t run = std::min(size_[dims - 1] - c[dims - 1], m1 - m);
      f(m, run, coords, inner);
      m += run;
      c[dims - 1] += run;
      for (int64_t k = dims - 1; k > 0 && c[k] == size_[k]; --k) {
        c[k] = 0;
        ++c[k - 1];
      }
    }
  }

 private:
  size_t spatial_;
  c10::SmallVector<int64_t, 8> size_;
  c10::SmallVector<int, 8> role_;
};

// origin of the window at `coords`, leaving out dimension `skip`
inline int64_t origin_of(const PoolingWindows& w, const MemoryWalk::Coords& coords, int skip) {
  int64_t origin = 0;
  for (size_t d = 0; d < coords.size(); ++d)
    if (int(d) != skip) origin += w.corner[d][coords[d]];
  return origin;
}

// f(e, origin) for the elements e0..e1-1 of a dense tensor in memory order, `origin` the flat
// index of the first position of element e's window, along the tensor's memory walk.
template <class F>
void for_each_window(const PoolingWindows& windows, const MemoryWalk& walk, int64_t e0, int64_t e1, F&& f) {
  walk.for_runs(e0, e1, [&](int64_t m, int64_t run, const MemoryWalk::Coords& coords, int inner) {
    const int64_t base = origin_of(windows, coords, inner);
    const int64_t* corner = inner >= 0 ? windows.corner[inner].data() + coords[inner] : nullptr;
    for (int64_t r = 0; r < run; ++r) f(m + r, base + (corner ? corner[r] : 0));
  });
}

// Where the tensor is row-major, the window of element e is the plane's table entry
// e % plane (windows.origins): a task goes through its elements a plane at a time (no memory
// walk, no division per element). Packing writes a position byte per element, or a byte of
// each bit plane per eight elements; unpacking the bit planes goes in blocks, through one byte
// of window position per element in a buffer.
constexpr int64_t kBlock = 4096;  // elements: a multiple of 8 (whole bytes of the bit planes)
static_assert(kBlock % 8 == 0);

// f(e, k, run): elements e .. e+run-1 sit at plane positions k .. k+run-1.
template <class F>
void for_plane_runs(int64_t e0, int64_t e1, int64_t plane, F&& f) {
  int64_t k = e0 % plane;
  for (int64_t e = e0; e < e1; k = 0) {
    const int64_t run = std::min(plane - k, e1 - e);
    f(e, k, run);
    e += run;
  }
}

constexpr uint64_t kLowBitOfEachByte = 0x0101010101010101ULL;

// Bit 0 of each of eight bytes, byte j to bit j.
inline uint8_t gather_bits(uint64_t bytes) {
  return uint8_t(((bytes & kLowBitOfEachByte) * 0x0102040810204080ULL) >> 56);
}

// Bit j of a byte to byte j (0 or 1), for every byte value.
const std::array<uint64_t, 256> kSpreadBits = [] {
  std::array<uint64_t, 256> table{};
  for (int value = 0; value < 256; ++value)
    for (int j = 0; j < 8; ++j) table[value] |= uint64_t((value >> j) & 1) << (8 * j);
  return table;
}();

// The window positions of row-major elements c0..c1-1 (c1 - c0 <= kBlock), a byte each: the byte
// plane itself, or the two bit planes spread into `buffer` (kBlock + 8 bytes) from the byte
// holding c0's bits.
inline const uint8_t* positions_at(const uint8_t* low, const uint8_t* high, int64_t c0, int64_t c1, uint8_t* buffer) {
  if (!high) return low + c0;
  const int64_t first = c0 & ~int64_t(7);
  for (int64_t i = first; i < c1; i += 8) {
    const uint64_t eight = kSpreadBits[low[i >> 3]] | (kSpreadBits[high[i >> 3]] << 1);
    std::memcpy(buffer + (i - first), &eight, 8);
  }
  return buffer + (c0 - first);
}

// One run of row-major elements whose windows start at origin[0..n-1]: their window
// positions (255: outside it), and back from positions to indices.
inline void positions_run(const int64_t* index, const int64_t* origin, int64_t low, const uint8_t* offset_of,
                          uint64_t beyond, uint8_t* position, int64_t r, int64_t n) {
  for (; r < n; ++r) position[r] = offset_of[std::min(uint64_t(index[r] - origin[r] - low), beyond)];  // negative: huge
}

inline void indices_run(const uint8_t* position, const int64_t* origin, const int64_t* deltas, int64_t* index,
                        int64_t r, int64_t n) {
  for (; r < n; ++r) index[r] = origin[r] + deltas[position[r]];
}

#if defined(__x86_64__)
// Four elements at a time: the table read by a gather (4 bytes from each entry: offset_of is
// padded), its first byte kept.
struct FourPositions {
  __m256i low, beyond, zero;
  __m128i first_bytes;
  const uint8_t* offset_of;
  __attribute__((target("avx2"))) FourPositions(int64_t low_step, int64_t beyond_step, const uint8_t* table)
      : low(_mm256_set1_epi64x(low_step)), beyond(_mm256_set1_epi64x(beyond_step)), zero(_mm256_setzero_si256()),
        first_bytes(_mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1)), offset_of(table) {}
  __attribute__((target("avx2"))) uint32_t operator()(const int64_t* index, const int64_t* origin) const {
    const __m256i at = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(index));
    const __m256i start = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(origin));
    __m256i step = _mm256_sub_epi64(_mm256_sub_epi64(at, start), low);
    const __m256i outside = _mm256_or_si256(_mm256_cmpgt_epi64(zero, step), _mm256_cmpgt_epi64(step, beyond));
    step = _mm256_blendv_epi8(step, beyond, outside);
    const __m128i entries = _mm256_i64gather_epi32(reinterpret_cast<const int*>(offset_of), step, 1);
    return uint32_t(_mm_cvtsi128_si32(_mm_shuffle_epi8(entries, first_bytes)));
  }
};

__attribute__((target("avx2"))) int64_t positions_run_avx2(const int64_t* index, const int64_t* origin, int64_t low,
                                                           const uint8_t* offset_of, int64_t beyond,
                                                           uint8_t* position, int64_t n) {
  const FourPositions four(low, beyond, offset_of);
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    const uint32_t positions = four(index + r, origin + r);
    std::memcpy(position + r, &positions, 4);
  }
  return r;
}

// Eight elements at a time, the first at bit 0 of a byte: their positions, then the low and
// high bits of those as a byte of each plane. Returns how many elements it took (whole bytes),
// or -1 where an element's index lies outside its window.
__attribute__((target("avx2"))) int64_t bit_planes_run_avx2(const int64_t* index, const int64_t* origin, int64_t low,
                                                            const uint8_t* offset_of, int64_t beyond,
                                                            uint8_t* low_bits, uint8_t* high_bits, int64_t n) {
  const FourPositions four(low, beyond, offset_of);
  int64_t r = 0;
  for (; r + 8 <= n; r += 8) {
    const uint64_t eight = four(index + r, origin + r) | uint64_t(four(index + r + 4, origin + r + 4)) << 32;
    if (eight & ~(kLowBitOfEachByte * 3)) return -1;  // a position past 3: outside (255)
    low_bits[r >> 3] = gather_bits(eight);
    high_bits[r >> 3] = gather_bits(eight >> 1);
  }
  return r;
}

__attribute__((target("avx2"))) int64_t indices_run_avx2(const uint8_t* position, const int64_t* origin,
                                                         const int64_t* deltas, int64_t* index, int64_t n) {
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    uint32_t four;
    std::memcpy(&four, position + r, 4);
    const __m256i slot = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(int(four)));
    const __m256i delta = _mm256_i64gather_epi64(reinterpret_cast<const long long*>(deltas), slot, 8);
    const __m256i start = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(origin + r));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(index + r), _mm256_add_epi64(start, delta));
  }
  return r;
}

// The same where the windows are tiles (windows.tiled): an index's step from its window's
// origin is 0, 1, W or W+1 (the positions in that order, W the input's width >= 2), so the
// lower row is a step past 1, and the right column what remains once W is taken off it; any
// other remainder is an index outside its window. No table, no gather.
__attribute__((target("avx2"))) int64_t tile_bits_run_avx2(const int64_t* index, const int64_t* origin, int64_t width,
                                                           uint8_t* low_bits, uint8_t* high_bits, int64_t n) {
  const __m256i one = _mm256_set1_epi64x(1), row = _mm256_set1_epi64x(width), beyond_a_column = _mm256_set1_epi64x(~int64_t(1));
  __m256i stray = _mm256_setzero_si256();
  int64_t r = 0;
  for (; r + 8 <= n; r += 8) {
    uint32_t right = 0, lower = 0;
    for (int half = 0; half < 2; ++half) {
      const int64_t at = r + 4 * half;
      const __m256i step = _mm256_sub_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(index + at)),
                                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(origin + at)));
      const __m256i down = _mm256_cmpgt_epi64(step, one);
      const __m256i column = _mm256_sub_epi64(step, _mm256_and_si256(down, row));
      stray = _mm256_or_si256(stray, _mm256_and_si256(column, beyond_a_column));
      right |= uint32_t(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_slli_epi64(column, 63)))) << (4 * half);
      lower |= uint32_t(_mm256_movemask_pd(_mm256_castsi256_pd(down))) << (4 * half);
    }
    low_bits[r >> 3] = uint8_t(right);
    high_bits[r >> 3] = uint8_t(lower);
  }
  return _mm256_testz_si256(stray, stray) ? r : -1;
}
#endif

// The two bit planes of row-major elements e0..e1-1 (e0 a multiple of 8) into their bytes of
// `low` and `high`, the last byte's missing elements 0: a whole byte of each at a time, from
// eight positions (four per gather with AVX2). False where an index lies outside its window.
bool bit_planes_of(const int64_t* indices, const PoolingWindows& windows, int64_t e0, int64_t e1, uint8_t* low,
                   uint8_t* high) {
  const size_t bytes = size_t((e1 - e0 + 7) / 8);
  std::memset(low + e0 / 8, 0, bytes);
  std::memset(high + e0 / 8, 0, bytes);
  const int64_t* origins = windows.origins.data();
  const uint8_t* offset_of = windows.offset_of.data();
  const uint64_t beyond = uint64_t(windows.beyond);
  bool inside = true;
  for_plane_runs(e0, e1, int64_t(windows.origins.size()), [&](int64_t e, int64_t k, int64_t run) {
    const auto position = [&](int64_t r) -> uint64_t {
      return offset_of[std::min(uint64_t(indices[e + r] - origins[k + r] - windows.low), beyond)];
    };
    const auto one = [&](int64_t r) {  // an element of a byte the run shares with its neighbour
      const uint64_t o = position(r);
      inside &= o != 255;
      low[(e + r) >> 3] |= uint8_t((o & 1) << ((e + r) & 7));
      high[(e + r) >> 3] |= uint8_t(((o >> 1) & 1) << ((e + r) & 7));
    };
    int64_t r = 0;
    for (; r < run && ((e + r) & 7); ++r) one(r);  // up to a byte's start
#if defined(__x86_64__)
    if (kAvx2 && r < run) {
      uint8_t* low_byte = low + ((e + r) >> 3);
      uint8_t* high_byte = high + ((e + r) >> 3);
      const int64_t took =
          windows.tiled
              ? tile_bits_run_avx2(indices + e + r, origins + k + r, windows.grid.in[1], low_byte, high_byte, run - r)
              : bit_planes_run_avx2(indices + e + r, origins + k + r, windows.low, offset_of, windows.beyond, low_byte,
                                    high_byte, run - r);
      if (took < 0) {
        inside = false;
        return;
      }
      r += took;
    }
#endif
    for (; r + 8 <= run; r += 8) {
      uint64_t eight = 0;
      for (int j = 0; j < 8; ++j) eight |= position(r + j) << (8 * j);
      if (eight & ~(kLowBitOfEachByte * 3)) {  // a position past 3: outside (255)
        inside = false;
        return;
      }
      low[(e + r) >> 3] = gather_bits(eight);
      high[(e + r) >> 3] = gather_bits(eight >> 1);
    }
    for (; r < run; ++r) one(r);
  });
  return inside;
}

// Window positions of row-major elements e0..e1-1 into `out` (255: outside the window).
void positions_of(const int64_t* indices, const PoolingWindows& windows, int64_t e0, int64_t e1, uint8_t* out) {
  const int64_t* origins = windows.origins.data();
  const uint8_t* offset_of = windows.offset_of.data();
  for_plane_runs(e0, e1, int64_t(windows.origins.size()), [&](int64_t e, int64_t k, int64_t run) {
    int64_t r = 0;
#if defined(__x86_64__)
    if (kAvx2) r = positions_run_avx2(indices + e, origins + k, windows.low, offset_of, windows.beyond, out + (e - e0), run);
#endif
    positions_run(indices + e, origins + k, windows.low, offset_of, uint64_t(windows.beyond), out + (e - e0), r, run);
  });
}

// Indices of row-major elements e0..e1-1 from their window positions.
void indices_of(const uint8_t* positions, const PoolingWindows& windows, int64_t e0, int64_t e1, int64_t* out) {
  const int64_t* origins = windows.origins.data();
  const int64_t* deltas = windows.deltas.data();
  for_plane_runs(e0, e1, int64_t(windows.origins.size()), [&](int64_t e, int64_t k, int64_t run) {
    const uint8_t* position = positions + (e - e0);
    int64_t r = 0;
#if defined(__x86_64__)
    if (kAvx2) r = indices_run_avx2(position, origins + k, deltas, out + e, run);
#endif
    indices_run(position, origins + k, deltas, out + e, r, run);
  });
}

}  // namespace

KeptTensors encode_offsets(const at::Tensor& indices, const PoolingWindows& windows) {
  TORCH_INTERNAL_ASSERT(indices.scalar_type() == at::kLong && indices.is_non_overlapping_and_dense());
  const int64_t n = indices.numel();
  const bool two_bits = windows.two_bits();
  const int64_t per_task_unit = two_bits ? 8 : 1;  // a task owns whole bytes of the bit planes
  const int64_t units = (n + per_task_unit - 1) / per_task_unit;
  at::Tensor low_plane = empty_bytes(two_bits ? units : n);
  at::Tensor high_plane = two_bits ? empty_bytes(units) : at::Tensor();
  uint8_t* low_bits = low_plane.data_ptr<uint8_t>();
  uint8_t* high_bits = two_bits ? high_plane.data_ptr<uint8_t>() : nullptr;
  const int64_t* src = indices.const_data_ptr<int64_t>();
  const bool planar = row_major(indices.sizes(), indices.strides());
  std::atomic<bool> outside{false};
  at::parallel_for(0, units, two_bits ? kGrain / 8 : kGrain, [&](int64_t u0, int64_t u1) {
    const int64_t e0 = u0 * per_task_unit, e1 = std::min(n, u1 * per_task_unit);
    if (planar) {
      bool inside;
      if (two_bits) {
        inside = bit_planes_of(src, windows, e0, e1, low_bits, high_bits);
      } else {
        positions_of(src, windows, e0, e1, low_bits + e0);
        inside = !std::memchr(low_bits + e0, 255, size_t(e1 - e0));
      }
      if (!inside) outside.store(true, std::memory_order_relaxed);
      return;
    }
    if (two_bits) {
      std::fill(low_bits + u0, low_bits + u1, 0);
      std::fill(high_bits + u0, high_bits + u1, 0);
    }
    const uint8_t* offset_of = windows.offset_of.data();
    const uint64_t beyond = uint64_t(windows.beyond);
    bool bad = false;
    const MemoryWalk walk(indices.sizes(), indices.strides(), windows.corner.size());
    for_each_window(windows, walk, e0, e1, [&](int64_t e, int64_t origin) {
      const uint8_t o = offset_of[std::min(uint64_t(src[e] - origin - windows.low), beyond)];
      bad |= o == 255;
      if (!two_bits) {
        low_bits[e] = o;
      } else {
        low_bits[e >> 3] |= uint8_t((o & 1) << (e & 7));
        high_bits[e >> 3] |= uint8_t(((o >> 1) & 1) << (e & 7));
      }
    });
    if (bad) outside.store(true, std::memory_order_relaxed);
  });
  if (outside.load()) return {};
  if (two_bits) return {low_plane, high_plane};
  return {low_plane};
}

at::Tensor decode_offsets(at::TensorList kept, const PoolingWindows& windows, at::IntArrayRef sizes,
                          at::IntArrayRef strides) {
  int64_t n = 1;
  for (int64_t size : sizes) n *= size;
  at::Tensor out(at::detail::empty_cpu({n}, at::TensorOptions().dtype(at::kLong)));
  if (n == 0) return restrided(std::move(out), sizes, strides);
  const bool two_bits = windows.two_bits();
  const uint8_t* low = kept[0].const_data_ptr<uint8_t>();
  const uint8_t* high = two_bits ? kept[1].const_data_ptr<uint8_t>() : nullptr;
  int64_t* dst = out.data_ptr<int64_t>();
  const int64_t* deltas = windows.deltas.data();
  const bool planar = row_major(sizes, strides);
  // a task starts on a byte boundary of the bit planes
  at::parallel_for(0, (n + 7) / 8, kGrain / 8, [&](int64_t b0, int64_t b1) {
    const int64_t e0 = b0 * 8, e1 = std::min(n, b1 * 8);
    if (planar) {
      uint8_t buffer[kBlock + 8];
      for (int64_t c0 = e0; c0 < e1; c0 += kBlock) {
        const int64_t c1 = std::min(e1, c0 + kBlock);
        indices_of(positions_at(low, high, c0, c1, buffer), windows, c0, c1, dst);
      }
      return;
    }
    const MemoryWalk walk(sizes, strides, windows.corner.size());
    for_each_window(windows, walk, e0, e1, [&](int64_t e, int64_t origin) {
      // the window position of element e: its byte, or its bits in the two planes
      const uint32_t position = two_bits ? bit_of(low, e) | bit_of(high, e) << 1 : low[e];
      dst[e] = origin + deltas[position];
    });
  });
  return restrided(std::move(out), sizes, strides);
}

namespace {
// One task's planes: window positions unpacked a block at a time, then each output's gradient
// added at its origin + delta.
template <class T>
void scatter_planes(const uint8_t* low, const uint8_t* high, const PoolingWindows& windows, const T* grad_output,
                    T* grad_input, int64_t planes, int64_t in_plane) {
  const int64_t out_plane = int64_t(windows.origins.size());
  const int64_t* origins = windows.origins.data();
  const int64_t* deltas = windows.deltas.data();
  at::parallel_for(0, planes, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, out_plane)), [&](int64_t p0, int64_t p1) {
    std::memset(grad_input + p0 * in_plane, 0, size_t((p1 - p0) * in_plane) * sizeof(T));
    uint8_t buffer[kBlock + 8];
    for (int64_t p = p0; p < p1; ++p) {
      T* plane = grad_input + p * in_plane;
      const int64_t e0 = p * out_plane, e1 = e0 + out_plane;
      for (int64_t c0 = e0; c0 < e1; c0 += kBlock) {
        const int64_t c1 = std::min(e1, c0 + kBlock);
        const uint8_t* positions = positions_at(low, high, c0, c1, buffer);
        const int64_t* origin = origins + (c0 - e0);
        const T* grad = grad_output + c0;
        for (int64_t r = 0; r < c1 - c0; ++r) {
          const int64_t index = origin[r] + deltas[positions[r]];
          if (index != -1) plane[index] += grad[r];  // as stock's loop skips -1
        }
      }
    }
  });
}

}  // namespace

std::atomic<int64_t> tile_scatters{0};

namespace {
// Eight bits of a bit plane from element e on.
inline uint32_t eight_bits(const uint8_t* plane, int64_t e) {
  const int shift = int(e & 7);
  if (!shift) return plane[e >> 3];
  return ((uint32_t(plane[e >> 3]) | uint32_t(plane[(e >> 3) + 1]) << 8) >> shift) & 0xFF;
}

#if defined(__x86_64__)
// Sixteen elements of a row of tiles: eight values each to the left or right of its tile.
__attribute__((target("avx2"))) inline void store_tile_row(float* row, __m256 value, __m256 is_right) {
  const __m256 left = _mm256_andnot_ps(is_right, value), right = _mm256_and_ps(is_right, value);
  const __m256 first = _mm256_unpacklo_ps(left, right), second = _mm256_unpackhi_ps(left, right);
  _mm256_storeu_ps(row, _mm256_permute2f128_ps(first, second, 0x20));
  _mm256_storeu_ps(row + 8, _mm256_permute2f128_ps(first, second, 0x31));
}

// A plane's rows of tiles, eight outputs at a time up to the last whole eight of a row: each
// gradient (plus +0, as stock adds it to +0) to the tile position its bits name, +0 to the
// other three, 16 elements of the row's top and bottom input rows. Returns the outputs of a
// row it took.
__attribute__((target("avx2"))) int64_t tile_rows_avx2(const uint8_t* low, const uint8_t* high,
                                                       const PoolingWindows::Grid& tiles, int64_t e0,
                                                       const float* grad, float* plane) {
  const int64_t taken = tiles.out[1] & ~int64_t(7), width = tiles.in[1];
  for (int64_t oh = 0; oh < tiles.out[0]; ++oh) {
    float* top = plane + 2 * oh * width;
    const int64_t e = e0 + oh * tiles.out[1];
    for (int64_t ow = 0; ow < taken; ow += 8) {
      const __m256 is_right = lanes_of_bits(eight_bits(low, e + ow)), is_lower = lanes_of_bits(eight_bits(high, e + ow));
      const __m256 value = _mm256_add_ps(_mm256_loadu_ps(grad + (e - e0) + ow), _mm256_setzero_ps());
      store_tile_row(top + 2 * ow, _mm256_andnot_ps(is_lower, value), is_right);
      store_tile_row(top + width + 2 * ow, _mm256_and_ps(is_lower, value), is_right);
    }
  }
  return taken;
}
#endif

// Planes of tiles, each input element written once.
template <class T>
void scatter_tiles(const uint8_t* low, const uint8_t* high, const PoolingWindows::Grid& tiles, const T* grad_output,
                   T* grad_input, int64_t planes) {
  const int64_t height = tiles.in[0], width = tiles.in[1], rows = tiles.out[0], columns = tiles.out[1];
  const int64_t out_plane = rows * columns;
  at::parallel_for(0, planes, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, out_plane)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      T* plane = grad_input + p * height * width;
      const int64_t e0 = p * out_plane;
      int64_t taken = 0;  // outputs of each row written already
#if defined(__x86_64__)
      if constexpr (std::is_same_v<T, float>) {
        if (kAvx2) taken = tile_rows_avx2(low, high, tiles, e0, grad_output + e0, plane);
      }
#endif
      for (int64_t oh = 0; oh < rows && (taken < columns || 2 * columns < width); ++oh) {
        T* top = plane + 2 * oh * width;
        T* bottom = top + width;
        for (int64_t ow = taken; ow < columns; ++ow) {
          const int64_t e = e0 + oh * columns + ow;
          const bool right = bit_of(low, e), lower = bit_of(high, e);
          const T value = grad_output[e] + T(0);
          top[2 * ow] = !lower && !right ? value : T(0);
          top[2 * ow + 1] = !lower && right ? value : T(0);
          bottom[2 * ow] = lower && !right ? value : T(0);
          bottom[2 * ow + 1] = lower && right ? value : T(0);
        }
        std::fill(top + 2 * columns, top + width, T(0));  // an odd width's last column
        std::fill(bottom + 2 * columns, bottom + width, T(0));
      }
      std::fill(plane + 2 * rows * width, plane + height * width, T(0));  // an odd height's last row
    }
  });
}

}  // namespace

at::Tensor scatter_by_offsets(at::TensorList kept, const PoolingWindows& windows,
                              const at::Tensor& grad_output, at::IntArrayRef input_sizes) {
  const at::Tensor grad = grad_output.contiguous();
  at::Tensor grad_input(at::detail::empty_cpu(input_sizes, at::TensorOptions().dtype(grad.scalar_type())));
  const int64_t out_plane = int64_t(windows.origins.size());
  const int64_t planes = out_plane ? grad.numel() / out_plane : 0;
  if (planes == 0) return grad_input.zero_();
  const int64_t in_plane = grad_input.numel() / planes;
  const uint8_t* low = kept[0].const_data_ptr<uint8_t>();
  const uint8_t* high = windows.two_bits() ? kept[1].const_data_ptr<uint8_t>() : nullptr;
  const bool tiled = windows.tiled && windows.grid.in[0] * windows.grid.in[1] == in_plane;
  if (tiled) tile_scatters.fetch_add(1, std::memory_order_relaxed);
  const auto scatter = [&](auto zero) {
    using T = decltype(zero);
    if (tiled)
      scatter_tiles(low, high, windows.grid, grad.const_data_ptr<T>(), grad_input.mutable_data_ptr<T>(), planes);
    else
      scatter_planes(low, high, windows, grad.const_data_ptr<T>(), grad_input.mutable_data_ptr<T>(), planes, in_plane);
  };
  switch (grad.scalar_type()) {
    case at::kFloat: scatter(0.0f); break;
    case at::kDouble: scatter(0.0); break;
    default: TORCH_INTERNAL_ASSERT(false, "memsave: no max-pool backward from offsets for ", grad.scalar_type());
  }
  return grad_input;
}

namespace {
// A tile's maximum as stock's loop finds it: it starts at -inf and moves to each value, in
// row-major order, that is larger or NaN. The first value always ends up taken (a value not
// larger than -inf is -inf itself), so the search starts there. `right` and `lower` are the
// window offset's two bits.
template <class T>
inline T tile_maximum(const T* top, const T* bottom, uint32_t& right, uint32_t& lower) {
  T best = top[0];
  right = lower = 0;
  if (top[1] > best || std::isnan(top[1])) best = top[1], right = 1;
  if (bottom[0] > best || std::isnan(bottom[0])) best = bottom[0], right = 0, lower = 1;
  if (bottom[1] > best || std::isnan(bottom[1])) best = bottom[1], right = 1, lower = 1;
  return best;
}

// Eight bits for elements e .. e+7 into a bit plane whose bytes there are this task's alone.
inline void or_eight_bits(uint8_t* plane, int64_t e, uint32_t bits) {
  const int shift = int(e & 7);
  plane[e >> 3] |= uint8_t(bits << shift);
  if (shift) plane[(e >> 3) + 1] |= uint8_t(bits >> (8 - shift));
}

#if defined(__x86_64__)
// Pairs of floats 0 1 4 5 | 2 3 6 7 back in order.
__attribute__((target("avx2"))) inline __m256 pairs_in_order(__m256 lanes) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(lanes), 0xD8));
}

// Sixteen floats of an input row as the eight left and eight right values of their tiles.
__attribute__((target("avx2"))) inline void split_tile_row(const float* row, __m256& left, __m256& right) {
  const __m256 first = _mm256_loadu_ps(row), second = _mm256_loadu_ps(row + 8);
  left = pairs_in_order(_mm256_shuffle_ps(first, second, 0x88));
  right = pairs_in_order(_mm256_shuffle_ps(first, second, 0xDD));
}

// Lanes where `value` replaces `best` in stock's loop: larger, or NaN.
__attribute__((target("avx2"))) inline __m256 replaces(__m256 value, __m256 best) {
  return _mm256_or_ps(_mm256_cmp_ps(value, best, _CMP_GT_OQ), _mm256_cmp_ps(value, value, _CMP_UNORD_Q));
}

// tile_maximum for eight tiles of a row at a time, up to the run's last whole eight; returns
// how many it took.
__attribute__((target("avx2"))) int64_t scan_tiles_avx2(const float* top, int64_t width, float* out, uint8_t* low,
                                                         uint8_t* high, int64_t e, int64_t run) {
  int64_t r = 0;
  for (; r + 8 <= run; r += 8) {
    __m256 top_left, top_right, bottom_left, bottom_right;
    split_tile_row(top + 2 * r, top_left, top_right);
    split_tile_row(top + width + 2 * r, bottom_left, bottom_right);
    __m256 best = top_left;
    __m256 right = replaces(top_right, best);
    best = _mm256_blendv_ps(best, top_right, right);
    __m256 lower = replaces(bottom_left, best);
    best = _mm256_blendv_ps(best, bottom_left, lower);
    right = _mm256_andnot_ps(lower, right);
    const __m256 last = replaces(bottom_right, best);
    best = _mm256_blendv_ps(best, bottom_right, last);
    right = _mm256_or_ps(right, last);
    lower = _mm256_or_ps(lower, last);
    _mm256_storeu_ps(out + r, best);
    or_eight_bits(low, e + r, uint32_t(_mm256_movemask_ps(right)));
    or_eight_bits(high, e + r, uint32_t(_mm256_movemask_ps(lower)));
  }
  return r;
}
#endif

template <class T>
void scan_tiles(const T* input, const PoolingWindows::Grid& tiles, T* out, uint8_t* low, uint8_t* high, int64_t n) {
  const int64_t columns = tiles.out[1], out_plane = tiles.out[0] * columns;
  const int64_t width = tiles.in[1], in_plane = tiles.in[0] * width;
  at::parallel_for(0, (n + 7) / 8, kGrain / 8, [&](int64_t u0, int64_t u1) {  // a task owns whole bytes of the planes
    std::memset(low + u0, 0, size_t(u1 - u0));
    std::memset(high + u0, 0, size_t(u1 - u0));
    const int64_t e1 = std::min(n, u1 * 8);
    for (int64_t e = u0 * 8; e < e1;) {  // a run along one row of tiles
      const int64_t plane = e / out_plane, at = e % out_plane, oh = at / columns, ow = at % columns;
      const int64_t run = std::min(columns - ow, e1 - e);
      const T* top = input + plane * in_plane + 2 * oh * width + 2 * ow;
      int64_t r = 0;
#if defined(__x86_64__)
      if constexpr (std::is_same_v<T, float>) {
        if (kAvx2) r = scan_tiles_avx2(top, width, out + e, low, high, e, run);
      }
#endif
      for (; r < run; ++r) {
        uint32_t right, lower;
        out[e + r] = tile_maximum(top + 2 * r, top + width + 2 * r, right, lower);
        low[(e + r) >> 3] |= uint8_t(right << ((e + r) & 7));
        high[(e + r) >> 3] |= uint8_t(lower << ((e + r) & 7));
      }
      e += run;
    }
  });
}

// A row of outputs of a 2-d pooling whose offsets are bytes (windows.grid), each window's
// maximum as stock's loop finds it: from -inf on to each in-bounds value, row-major, that is
// larger or NaN. A position is the value's place in the whole window, row-major: the offset
// encode_offsets writes.
template <class T>
inline void scan_window(const T* plane, const PoolingWindows::Grid& g, int64_t ih0, int64_t ih1, int64_t a0, int64_t ow,
                        T* out, uint8_t* position) {
  const int64_t width = g.in[1], kernel = g.kernel[1], dilation = g.dilation[1];
  int64_t iw0 = ow * g.stride[1] - g.padding[1], b0 = 0;
  const int64_t iw1 = std::min(iw0 + (kernel - 1) * dilation + 1, width);
  for (; iw0 < 0; iw0 += dilation) ++b0;
  T best = -std::numeric_limits<T>::infinity();
  int64_t at = a0 * kernel + b0;
  for (int64_t ih = ih0, a = a0; ih < ih1; ih += g.dilation[0], ++a)
    for (int64_t iw = iw0, b = b0; iw < iw1; iw += dilation, ++b) {
      const T value = plane[ih * width + iw];
      if (value > best || std::isnan(value)) best = value, at = a * kernel + b;
    }
  *out = best;
  *position = uint8_t(at);
}

#if defined(__x86_64__)
// The even floats of the 15 from `row` on: the values of eight windows' column, at a stride of
// 2 (the 16th float is not read: it may lie past the input).
__attribute__((target("avx2"))) inline __m256 every_other_float(const float* row) {
  const __m256i first_seven = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, -1, 0);
  const __m256 first = _mm256_loadu_ps(row), second = _mm256_maskload_ps(row + 8, first_seven);
  return pairs_in_order(_mm256_shuffle_ps(first, second, 0x88));
}

// The same for eight outputs of a row at once, where the stride along it is 2 without dilation
// and their windows lie inside the row.
__attribute__((target("avx2"))) void scan_eight_windows_avx2(const float* plane, const PoolingWindows::Grid& g,
                                                             int64_t ih0, int64_t ih1, int64_t a0, int64_t ow,
                                                             float* out, uint8_t* position) {
  const int64_t width = g.in[1], kernel = g.kernel[1], first_column = ow * 2 - g.padding[1];
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 at = _mm256_castsi256_ps(_mm256_set1_epi32(int(a0 * kernel)));
  for (int64_t ih = ih0, a = a0; ih < ih1; ih += g.dilation[0], ++a) {
    const float* row = plane + ih * width + first_column;
    for (int64_t b = 0; b < kernel; ++b) {
      const __m256 value = every_other_float(row + b);
      const __m256 larger = replaces(value, best);
      best = _mm256_blendv_ps(best, value, larger);
      at = _mm256_blendv_ps(at, _mm256_castsi256_ps(_mm256_set1_epi32(int(a * kernel + b))), larger);
    }
  }
  _mm256_storeu_ps(out, best);
  alignas(32) int32_t positions[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(positions), _mm256_castps_si256(at));
  for (int j = 0; j < 8; ++j) position[j] = uint8_t(positions[j]);
}
#endif

template <class T>
void scan_windows(const T* input, const PoolingWindows::Grid& g, T* out, uint8_t* position, int64_t planes) {
  const int64_t rows = g.out[0], columns = g.out[1], in_plane = g.in[0] * g.in[1];
  const int64_t work = std::max<int64_t>(1, columns * g.kernel[0] * g.kernel[1]);
  // kGroup outputs from `ow` on, at a stride of 2 along the row, whose windows lie inside it
  // (scan_eight_windows_avx2): the first one's first column at 0 or past it, the last one's last
  // column inside
  constexpr int64_t kGroup = 8;
  const int64_t first_inside = (g.padding[1] + 1) / 2;
  const auto inside = [&](int64_t ow) {
    return ow >= first_inside && 2 * (ow + kGroup - 1) - g.padding[1] + g.kernel[1] <= g.in[1];
  };
  at::parallel_for(0, planes * rows, std::max<int64_t>(1, kGrain / work), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t oh = r % rows;
      const T* plane = input + (r / rows) * in_plane;
      int64_t ih0 = oh * g.stride[0] - g.padding[0], a0 = 0;
      const int64_t ih1 = std::min(ih0 + (g.kernel[0] - 1) * g.dilation[0] + 1, g.in[0]);
      for (; ih0 < 0; ih0 += g.dilation[0]) ++a0;
      T* row_out = out + r * columns;
      uint8_t* row_position = position + r * columns;
      int64_t ow = 0;
#if defined(__x86_64__)
      if constexpr (std::is_same_v<T, float>) {
        if (kAvx2 && g.stride[1] == 2 && g.dilation[1] == 1) {
          for (; ow < std::min(first_inside, columns); ++ow) scan_window(plane, g, ih0, ih1, a0, ow, row_out + ow, row_position + ow);
          for (; ow + kGroup <= columns && inside(ow); ow += kGroup)
            scan_eight_windows_avx2(plane, g, ih0, ih1, a0, ow, row_out + ow, row_position + ow);
          const int64_t last = columns - kGroup;  // the last group, overlapping the one before
          if (ow < columns && ow > last && inside(last)) {  // (inside: last >= first_inside >= 0)
            scan_eight_windows_avx2(plane, g, ih0, ih1, a0, last, row_out + last, row_position + last);
            ow = columns;
          }
        }
      }
#endif
      for (; ow < columns; ++ow) scan_window(plane, g, ih0, ih1, a0, ow, row_out + ow, row_position + ow);
    }
  });
}
}  // namespace

std::atomic<int64_t> one_pass_poolings{0};

OnePassPooling max_pool_one_pass(const at::Tensor& input, const PoolingWindows& windows) {
  const PoolingWindows::Grid& grid = windows.grid;
  const bool tiled = windows.tiled;
  TORCH_INTERNAL_ASSERT(windows.one_pass() && input.is_contiguous() && input.dim() >= 3 &&
                        input.size(-2) == grid.in[0] && input.size(-1) == grid.in[1]);
  TORCH_INTERNAL_ASSERT(windows.deltas.size() <= 255);  // a position fits a byte
  c10::SmallVector<int64_t, 4> sizes(input.sizes().begin(), input.sizes().end());
  sizes[sizes.size() - 2] = grid.out[0];
  sizes[sizes.size() - 1] = grid.out[1];
  OnePassPooling made;
  made.out = at::detail::empty_cpu(sizes, input.scalar_type(), false, std::nullopt);
  const int64_t n = made.out.numel();
  const int64_t planes = n / (grid.out[0] * grid.out[1]);
  if (tiled)
    made.offsets = {empty_bytes((n + 7) / 8), empty_bytes((n + 7) / 8)};
  else
    made.offsets = {empty_bytes(n)};
  uint8_t* low = made.offsets[0].mutable_data_ptr<uint8_t>();
  uint8_t* high = tiled ? made.offsets[1].mutable_data_ptr<uint8_t>() : nullptr;
  const auto scan = [&](auto zero) {
    using T = decltype(zero);
    if (tiled)
      scan_tiles(input.const_data_ptr<T>(), grid, made.out.mutable_data_ptr<T>(), low, high, n);
    else
      scan_windows(input.const_data_ptr<T>(), grid, made.out.mutable_data_ptr<T>(), low, planes);
  };
  switch (input.scalar_type()) {
    case at::kFloat: scan(0.0f); break;
    case at::kDouble: scan(0.0); break;
    default: TORCH_INTERNAL_ASSERT(false, "memsave: no one-pass max pooling for ", input.scalar_type());
  }
  one_pass_poolings.fetch_add(1, std::memory_order_relaxed);
  return made;
}

}  // namespace memsave
