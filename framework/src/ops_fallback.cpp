// Generic implementations of Ops' optional slots: copy to the host, compute, copy back. For the
// cpu kernel the copies are views, so these are as fast as a plain loop there.
#include <fmt/format.h>

#include <cmath>

#include "moelab/kernel.hpp"

namespace moelab {
namespace {

template <class F>
void with_float_type(DType dtype, const char* op, F&& f) {
  if (dtype == DType::f32) f(float{});
  else if (dtype == DType::f64) f(double{});
  else throw RuntimeError(fmt::format("{}: dtype {} is not supported", op, dtype_name(dtype)));
}

void check_same(const Tensor& a, const Tensor& b, const char* op) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype())
    throw RuntimeError(fmt::format("{}: operands differ: {} vs {}", op, a.describe(), b.describe()));
}

// Writes a host result back into `dst`, which may live on the device.
void store(Ops& ops, const Tensor& host, Tensor& dst) {
  if (dst.device() == DeviceKind::cpu && host.raw() == dst.raw()) return;
  ops.copy(host, dst);
}

}  // namespace

void Ops::mul(const Tensor& a, const Tensor& b, Tensor& out) {
  check_same(a, b, "mul");
  check_same(a, out, "mul");
  Tensor ha = to_host(a), hb = to_host(b);
  Tensor ho = out.device() == DeviceKind::cpu ? out : host_tensor(out.dtype(), out.shape());
  with_float_type(a.dtype(), "mul", [&](auto zero) {
    using T = decltype(zero);
    const T* pa = ha.data<T>();
    const T* pb = hb.data<T>();
    T* po = ho.data<T>();
    for (int64_t i = 0; i < ho.numel(); ++i) po[i] = pa[i] * pb[i];
  });
  store(*this, ho, out);
}

void Ops::normalize_rows(const Tensor& x, Tensor& y) {
  check_same(x, y, "normalize_rows");
  MOELAB_CHECK(x.rank() == 2, "normalize_rows: expected a matrix, got {}", x.describe());
  Tensor hx = to_host(x);
  Tensor hy = y.device() == DeviceKind::cpu ? y : host_tensor(y.dtype(), y.shape());
  const int64_t rows = x.dim(0), cols = x.dim(1);
  with_float_type(x.dtype(), "normalize_rows", [&](auto zero) {
    using T = decltype(zero);
    const T* px = hx.data<T>();
    T* py = hy.data<T>();
    for (int64_t r = 0; r < rows; ++r) {
      T sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += px[r * cols + c];
      for (int64_t c = 0; c < cols; ++c) py[r * cols + c] = px[r * cols + c] / sum;
    }
  });
  store(*this, hy, y);
}

void Ops::normalize_rows_backward(const Tensor& x, const Tensor& y, const Tensor& dy, bool accumulate,
                                  Tensor& dx) {
  check_same(x, y, "normalize_rows_backward");
  check_same(x, dy, "normalize_rows_backward");
  check_same(x, dx, "normalize_rows_backward");
  Tensor hx = to_host(x), hy = to_host(y), hdy = to_host(dy);
  Tensor hdx = dx.device() == DeviceKind::cpu ? dx : to_host(dx);
  const int64_t rows = x.dim(0), cols = x.dim(1);
  with_float_type(x.dtype(), "normalize_rows_backward", [&](auto zero) {
    using T = decltype(zero);
    const T* px = hx.data<T>();
    const T* py = hy.data<T>();
    const T* pdy = hdy.data<T>();
    T* pdx = hdx.data<T>();
    for (int64_t r = 0; r < rows; ++r) {
      T sum = 0, dot = 0;
      for (int64_t c = 0; c < cols; ++c) {
        sum += px[r * cols + c];
        dot += pdy[r * cols + c] * py[r * cols + c];
      }
      for (int64_t c = 0; c < cols; ++c) {
        const T g = (pdy[r * cols + c] - dot) / sum;
        pdx[r * cols + c] = accumulate ? pdx[r * cols + c] + g : g;
      }
    }
  });
  store(*this, hdx, dx);
}

double Ops::sum_squares(const Tensor& x) {
  const Tensor hx = to_host(x);
  double sum = 0;
  with_float_type(x.dtype(), "sum_squares", [&](auto zero) {
    using T = decltype(zero);
    const T* p = hx.data<T>();
    for (int64_t i = 0; i < hx.numel(); ++i) sum += static_cast<double>(p[i]) * static_cast<double>(p[i]);
  });
  return sum;
}

void Ops::adamw_update(const AdamW& h, const Tensor& grad, Tensor& param, Tensor& m, Tensor& v) {
  check_same(grad, param, "adamw_update");
  check_same(grad, m, "adamw_update");
  check_same(grad, v, "adamw_update");
  const Tensor hg = to_host(grad);
  Tensor hp = param.device() == DeviceKind::cpu ? param : to_host(param);
  Tensor hm = m.device() == DeviceKind::cpu ? m : to_host(m);
  Tensor hv = v.device() == DeviceKind::cpu ? v : to_host(v);
  const double correction1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
  const double correction2 = 1.0 - std::pow(h.beta2, static_cast<double>(h.step));
  with_float_type(grad.dtype(), "adamw_update", [&](auto zero) {
    using T = decltype(zero);
    const T* g = hg.data<T>();
    T* p = hp.data<T>();
    T* pm = hm.data<T>();
    T* pv = hv.data<T>();
    for (int64_t i = 0; i < hg.numel(); ++i) {
      const double gi = g[i];
      const double mi = h.beta1 * pm[i] + (1.0 - h.beta1) * gi;
      const double vi = h.beta2 * pv[i] + (1.0 - h.beta2) * gi * gi;
      pm[i] = static_cast<T>(mi);
      pv[i] = static_cast<T>(vi);
      const double update = (mi / correction1) / (std::sqrt(vi / correction2) + h.eps) + h.weight_decay * p[i];
      p[i] = static_cast<T>(p[i] - h.lr * update);
    }
  });
  store(*this, hp, param);
  store(*this, hm, m);
  store(*this, hv, v);
}

}  // namespace moelab
