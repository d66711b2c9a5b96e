#include "moelab/tensor.hpp"

#include <fmt/format.h>

#include <cstdlib>
#include <cstring>

namespace moelab {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return 4;
    case DType::f64:
      return 8;
    case DType::bf16:
      return 2;
    case DType::i32:
      return 4;
    case DType::i64:
      return 8;
    case DType::u8:
      return 1;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return "f32";
    case DType::f64:
      return "f64";
    case DType::bf16:
      return "bf16";
    case DType::i32:
      return "i32";
    case DType::i64:
      return "i64";
    case DType::u8:
      return "u8";
  }
  return "?";
}

const char* device_name(DeviceKind device) {
  switch (device) {
    case DeviceKind::cpu:
      return "cpu";
    case DeviceKind::cuda:
      return "cuda";
    case DeviceKind::meta:
      return "meta";
  }
  return "?";
}

std::string shape_str(const Shape& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

Tensor::Tensor(std::shared_ptr<Buffer> buffer, DType dtype, Shape shape, size_t byte_offset)
    : buffer_(std::move(buffer)), dtype_(dtype), shape_(std::move(shape)), offset_(byte_offset) {
  for (int64_t d : shape_) MOELAB_CHECK(d >= 0, "negative dimension in shape {}", shape_str(shape_));
  MOELAB_CHECK(buffer_ && offset_ + bytes() <= buffer_->bytes,
               "tensor {} does not fit its buffer ({} bytes at offset {})", shape_str(shape_),
               buffer_ ? buffer_->bytes : 0, offset_);
}

int64_t Tensor::dim(int i) const {
  const int r = rank();
  const int j = i < 0 ? i + r : i;
  MOELAB_CHECK(j >= 0 && j < r, "dimension {} out of range for {}", i, describe());
  return shape_[static_cast<size_t>(j)];
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

Tensor Tensor::reshaped(Shape shape) const {
  Tensor t = *this;
  t.shape_ = std::move(shape);
  MOELAB_CHECK(t.numel() == numel(), "cannot reshape {} to {}", describe(), shape_str(t.shape_));
  return t;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  MOELAB_CHECK(rank() >= 1 && begin >= 0 && begin <= end && end <= shape_[0], "rows [{}, {}) out of range for {}",
               begin, end, describe());
  Tensor t = *this;
  const int64_t row_elems = shape_[0] == 0 ? 0 : numel() / shape_[0];
  t.offset_ = offset_ + static_cast<size_t>(begin * row_elems) * dtype_size(dtype_);
  t.shape_[0] = end - begin;
  return t;
}

std::string Tensor::describe() const {
  return fmt::format("{}{} on {}", dtype_name(dtype_), shape_str(shape_), device_name(device()));
}

void Tensor::check_dtype(DType expected) const {
  MOELAB_CHECK(buffer_ != nullptr, "access to an undefined tensor");
  MOELAB_CHECK(expected == dtype_, "tensor {} accessed as {}", describe(), dtype_name(expected));
}

Tensor host_tensor(DType dtype, Shape shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  const size_t bytes = static_cast<size_t>(n) * dtype_size(dtype);
  auto buffer = std::make_shared<Buffer>();
  void* data = std::calloc(bytes == 0 ? 1 : bytes, 1);
  if (!data) throw RuntimeError(fmt::format("out of host memory allocating {} bytes", bytes));
  buffer->data = data;
  buffer->bytes = bytes;
  buffer->device = DeviceKind::cpu;
  buffer->owner = std::shared_ptr<void>(data, [](void* p) { std::free(p); });
  return Tensor(std::move(buffer), dtype, std::move(shape));
}

double host_value(const Tensor& t, int64_t i) {
  MOELAB_CHECK(t.device() == DeviceKind::cpu && i >= 0 && i < t.numel(), "host_value({}) on {}", i, t.describe());
  switch (t.dtype()) {
    case DType::f32:
      return t.data<float>()[i];
    case DType::f64:
      return t.data<double>()[i];
    case DType::i32:
      return t.data<int32_t>()[i];
    case DType::i64:
      return static_cast<double>(t.data<int64_t>()[i]);
    case DType::u8:
      return t.data<uint8_t>()[i];
    case DType::bf16: {
      uint16_t bits;
      std::memcpy(&bits, static_cast<const char*>(t.raw()) + 2 * i, 2);
      const uint32_t wide = static_cast<uint32_t>(bits) << 16;
      float f;
      std::memcpy(&f, &wide, 4);
      return f;
    }
  }
  return 0;
}

void set_host_value(Tensor& t, int64_t i, double v) {
  MOELAB_CHECK(t.device() == DeviceKind::cpu && i >= 0 && i < t.numel(), "set_host_value({}) on {}", i, t.describe());
  switch (t.dtype()) {
    case DType::f32:
      t.data<float>()[i] = static_cast<float>(v);
      return;
    case DType::f64:
      t.data<double>()[i] = v;
      return;
    case DType::i32:
      t.data<int32_t>()[i] = static_cast<int32_t>(v);
      return;
    case DType::i64:
      t.data<int64_t>()[i] = static_cast<int64_t>(v);
      return;
    case DType::u8:
      t.data<uint8_t>()[i] = static_cast<uint8_t>(v);
      return;
    case DType::bf16: {
      const float f = static_cast<float>(v);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      if ((bits & 0x7fffffffu) > 0x7f800000u)
        bits |= 0x400000u;  // a NaN stays a (quiet) NaN
      else
        bits += 0x7fff + ((bits >> 16) & 1);  // round to nearest even
      const uint16_t high = static_cast<uint16_t>(bits >> 16);
      std::memcpy(static_cast<char*>(t.raw()) + 2 * i, &high, 2);
      return;
    }
  }
}

void expect_shape(const Tensor& t, const Shape& expected, const char* what) {
  if (!t.defined() || t.shape() != expected)
    throw RuntimeError(fmt::format("{}: expected shape {}, got {}", what, shape_str(expected),
                                   t.defined() ? shape_str(t.shape()) : std::string("an undefined tensor")));
}

}  // namespace moelab
