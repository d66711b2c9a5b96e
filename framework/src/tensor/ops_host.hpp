// What the host implementations of Ops' optional slots (ops_fallback.cpp, ops_routing.cpp) share.
#pragma once

#include <fmt/format.h>

#include "moelab/kernel.hpp"

namespace moelab::host_ops {

// Calls f(float{}) or f(double{}) for the tensor's dtype; other dtypes are an error naming `op`.
template <class F>
void with_float_type(DType dtype, const char* op, F&& f) {
  if (dtype == DType::f32)
    f(float{});
  else if (dtype == DType::f64)
    f(double{});
  else
    throw RuntimeError(fmt::format("{}: dtype {} is not supported (f32 or f64)", op, dtype_name(dtype)));
}

inline void check_same(const Tensor& a, const Tensor& b, const char* op) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype())
    throw RuntimeError(fmt::format("{}: operands differ: {} vs {}", op, a.describe(), b.describe()));
}

// A host tensor to compute `dst`'s result in: dst itself on the cpu.
inline Tensor host_out(const Tensor& dst) {
  return dst.device() == DeviceKind::cpu ? dst : host_tensor(dst.dtype(), dst.shape());
}

// Writes a host result back into `dst`, which may live on the device.
inline void store(Ops& ops, const Tensor& host, Tensor& dst) {
  if (dst.device() == DeviceKind::cpu && host.raw() == dst.raw()) return;
  ops.copy(host, dst);
}

}  // namespace moelab::host_ops
