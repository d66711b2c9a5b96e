// Tensor: a contiguous, row-major, reference-counted block of one dtype on one device.
// Kernels own allocation (Ops::empty); host tensors can also be made directly with host_tensor().
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "moelab/error.hpp"

namespace moelab {

enum class DType : uint8_t { f32, f64, bf16, i32, i64, u8 };
// meta: shape and dtype only, no storage (meta_ops.hpp), for counting models without allocating.
enum class DeviceKind : uint8_t { cpu, cuda, meta };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);  // "f32", "f64", "bf16", "i32", "i64", "u8"
const char* device_name(DeviceKind device);

template <class T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
  return DType::f32;
}
template <>
constexpr DType dtype_of<double>() {
  return DType::f64;
}
template <>
constexpr DType dtype_of<int32_t>() {
  return DType::i32;
}
template <>
constexpr DType dtype_of<int64_t>() {
  return DType::i64;
}
template <>
constexpr DType dtype_of<uint8_t>() {
  return DType::u8;
}

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& shape);  // "[4096, 512]"

// Memory a kernel allocated. The deleter runs when the last Tensor that views it goes away.
struct Buffer {
  void* data = nullptr;
  size_t bytes = 0;
  DeviceKind device = DeviceKind::cpu;
  std::shared_ptr<void> owner;  // keeps the allocation (and the kernel's library) alive
};

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<Buffer> buffer, DType dtype, Shape shape, size_t byte_offset = 0);

  bool defined() const { return buffer_ != nullptr; }
  DType dtype() const { return dtype_; }
  DeviceKind device() const { return buffer_ ? buffer_->device : DeviceKind::cpu; }
  const Shape& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const;  // negative i counts from the end
  int64_t numel() const;
  size_t bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }

  void* raw() { return static_cast<char*>(buffer_->data) + offset_; }
  const void* raw() const { return static_cast<const char*>(buffer_->data) + offset_; }

  // Typed access; throws when T does not match the dtype (host code reading device memory is a bug
  // the kernel catches, not this accessor).
  template <class T>
  T* data() {
    check_dtype(dtype_of<T>());
    return static_cast<T*>(raw());
  }
  template <class T>
  const T* data() const {
    check_dtype(dtype_of<T>());
    return static_cast<const T*>(raw());
  }

  // A view sharing the same buffer: same bytes, new shape (numel must match).
  Tensor reshaped(Shape shape) const;
  // Rows [begin, end) of the leading dimension, as a view.
  Tensor rows(int64_t begin, int64_t end) const;

  const std::shared_ptr<Buffer>& buffer() const { return buffer_; }
  std::string describe() const;  // "f32[4096, 512] on cpu"

 private:
  void check_dtype(DType expected) const;
  std::shared_ptr<Buffer> buffer_;
  DType dtype_ = DType::f32;
  Shape shape_;
  size_t offset_ = 0;
};

// Host memory, zero-filled. Used for inputs, weights files and results that leave a kernel.
Tensor host_tensor(DType dtype, Shape shape);
template <class T>
Tensor host_tensor(Shape shape) {
  return host_tensor(dtype_of<T>(), std::move(shape));
}

// Element i of a host tensor of any numeric dtype as a double, and the reverse (bf16 rounds to
// nearest even). For small host-side bookkeeping (balancers' per-expert vectors), not hot loops.
double host_value(const Tensor& host, int64_t i);
void set_host_value(Tensor& host, int64_t i, double value);

// Checks shapes at module boundaries: throws RuntimeError naming `what`, expected and actual shape.
void expect_shape(const Tensor& t, const Shape& expected, const char* what);

}  // namespace moelab
