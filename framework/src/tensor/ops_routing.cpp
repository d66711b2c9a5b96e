// Generic implementations of the routing-maths slots of Ops (kernel.hpp, ABI 4.0): copy to the
// host, compute in the tensor's own precision, copy back. For the cpu kernel the copies are views.
#include <fmt/format.h>

#include <cmath>

#include "moelab/kernel.hpp"
#include "ops_host.hpp"

namespace moelab {
namespace {

using host_ops::check_same;
using host_ops::host_out;
using host_ops::store;
using host_ops::with_float_type;

void check_matrix(const Tensor& x, const char* op) {
  if (x.rank() != 2) throw RuntimeError(fmt::format("{}: expected a matrix, got {}", op, x.describe()));
}

void check_vector(const Tensor& v, int64_t n, DType dtype, const char* op, const char* what) {
  if (v.rank() != 1 || v.dim(0) != n || v.dtype() != dtype)
    throw RuntimeError(fmt::format("{}: expected {} {}[{}], got {}", op, what, dtype_name(dtype), n, v.describe()));
}

// out[i] = f(a[i]) or out[i] (+)= f(a[i], b[i]): the elementwise slots, in one loop each.
template <class F>
void unary(Ops& ops, const char* op, const Tensor& a, Tensor& out, F&& f) {
  check_same(a, out, op);
  const Tensor ha = ops.to_host(a);
  Tensor ho = host_out(out);
  with_float_type(a.dtype(), op, [&](auto zero) {
    using T = decltype(zero);
    const T* pa = ha.data<T>();
    T* po = ho.data<T>();
    for (int64_t i = 0; i < ho.numel(); ++i) po[i] = f(pa[i]);
  });
  store(ops, ho, out);
}

template <class F>
void binary(Ops& ops, const char* op, const Tensor& a, const Tensor& b, bool accumulate, Tensor& out, F&& f) {
  check_same(a, b, op);
  check_same(a, out, op);
  const Tensor ha = ops.to_host(a), hb = ops.to_host(b);
  Tensor ho = accumulate ? ops.to_host(out) : host_out(out);
  with_float_type(a.dtype(), op, [&](auto zero) {
    using T = decltype(zero);
    const T* pa = ha.data<T>();
    const T* pb = hb.data<T>();
    T* po = ho.data<T>();
    for (int64_t i = 0; i < ho.numel(); ++i) po[i] = (accumulate ? po[i] : T{0}) + f(pa[i], pb[i]);
  });
  store(ops, ho, out);
}

}  // namespace

void Ops::exp(const Tensor& x, Tensor& y) {
  unary(*this, "exp", x, y, [](auto v) { return std::exp(v); });
}

void Ops::exp_backward(const Tensor& y, const Tensor& dy, bool accumulate, Tensor& dx) {
  binary(*this, "exp_backward", y, dy, accumulate, dx, [](auto yv, auto g) { return yv * g; });
}

void Ops::log(const Tensor& x, Tensor& y) {
  unary(*this, "log", x, y, [](auto v) { return std::log(v); });
}

void Ops::log_backward(const Tensor& x, const Tensor& dy, bool accumulate, Tensor& dx) {
  binary(*this, "log_backward", x, dy, accumulate, dx, [](auto xv, auto g) { return g / xv; });
}

void Ops::divide(const Tensor& a, const Tensor& b, Tensor& out) {
  binary(*this, "divide", a, b, false, out, [](auto av, auto bv) { return av / bv; });
}

void Ops::divide_backward(const Tensor& a, const Tensor& b, const Tensor& dy, bool accumulate, Tensor* da, Tensor* db) {
  check_same(a, dy, "divide_backward");
  if (da) binary(*this, "divide_backward", dy, b, accumulate, *da, [](auto g, auto bv) { return g / bv; });
  if (db) {
    // db = -dy * a / b^2 = -(dy / b) * (a / b)
    Tensor quotient = empty(a.dtype(), a.shape());
    divide(a, b, quotient);
    Tensor scaled = empty(a.dtype(), a.shape());
    divide(dy, b, scaled);
    binary(*this, "divide_backward", scaled, quotient, accumulate, *db, [](auto s, auto q) { return -s * q; });
  }
}

void Ops::scale_columns(const Tensor& s, Tensor& y) {
  check_matrix(y, "scale_columns");
  const int64_t rows = y.dim(0), cols = y.dim(1);
  check_vector(s, cols, y.dtype(), "scale_columns", "s");
  const Tensor hs = to_host(s);
  Tensor hy = to_host(y);
  with_float_type(y.dtype(), "scale_columns", [&](auto zero) {
    using T = decltype(zero);
    const T* ps = hs.data<T>();
    T* py = hy.data<T>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) py[r * cols + c] *= ps[c];
  });
  store(*this, hy, y);
}

void Ops::scale_columns_backward(const Tensor& x, const Tensor& s, const Tensor& dy, bool accumulate, Tensor& dx,
                                 Tensor& ds) {
  check_matrix(x, "scale_columns_backward");
  check_same(x, dy, "scale_columns_backward");
  check_same(x, dx, "scale_columns_backward");
  const int64_t rows = x.dim(0), cols = x.dim(1);
  check_vector(s, cols, x.dtype(), "scale_columns_backward", "s");
  check_vector(ds, cols, x.dtype(), "scale_columns_backward", "ds");
  const Tensor hx = to_host(x), hs = to_host(s), hdy = to_host(dy);
  Tensor hdx = accumulate ? to_host(dx) : host_out(dx);
  Tensor hds = accumulate ? to_host(ds) : host_out(ds);
  with_float_type(x.dtype(), "scale_columns_backward", [&](auto zero) {
    using T = decltype(zero);
    const T *px = hx.data<T>(), *ps = hs.data<T>(), *pdy = hdy.data<T>();
    T *pdx = hdx.data<T>(), *pds = hds.data<T>();
    if (!accumulate)
      for (int64_t c = 0; c < cols; ++c) pds[c] = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t i = r * cols + c;
        pdx[i] = (accumulate ? pdx[i] : T{0}) + pdy[i] * ps[c];
        pds[c] += pdy[i] * px[i];
      }
  });
  store(*this, hdx, dx);
  store(*this, hds, ds);
}

void Ops::row_sums(const Tensor& x, bool accumulate, Tensor& out) {
  check_matrix(x, "row_sums");
  const int64_t rows = x.dim(0), cols = x.dim(1);
  check_vector(out, rows, x.dtype(), "row_sums", "out");
  const Tensor hx = to_host(x);
  Tensor ho = accumulate ? to_host(out) : host_out(out);
  with_float_type(x.dtype(), "row_sums", [&](auto zero) {
    using T = decltype(zero);
    const T* px = hx.data<T>();
    T* po = ho.data<T>();
    for (int64_t r = 0; r < rows; ++r) {
      T sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += px[r * cols + c];
      po[r] = (accumulate ? po[r] : T{0}) + sum;
    }
  });
  store(*this, ho, out);
}

void Ops::max_rows(const Tensor& x, Tensor& values, Tensor& indices) {
  check_matrix(x, "max_rows");
  const int64_t rows = x.dim(0), cols = x.dim(1);
  if (cols < 1) throw RuntimeError(fmt::format("max_rows: a row needs at least one column, got {}", x.describe()));
  check_vector(values, rows, x.dtype(), "max_rows", "values");
  check_vector(indices, rows, DType::i32, "max_rows", "indices");
  const Tensor hx = to_host(x);
  Tensor hv = host_out(values), hi = host_out(indices);
  with_float_type(x.dtype(), "max_rows", [&](auto zero) {
    using T = decltype(zero);
    const T* px = hx.data<T>();
    T* pv = hv.data<T>();
    int32_t* pi = hi.data<int32_t>();
    for (int64_t r = 0; r < rows; ++r) {
      int64_t best = 0;
      for (int64_t c = 1; c < cols; ++c)
        if (px[r * cols + c] > px[r * cols + best]) best = c;  // strict: ties keep the lower column
      pv[r] = px[r * cols + best];
      pi[r] = static_cast<int32_t>(best);
    }
  });
  store(*this, hv, values);
  store(*this, hi, indices);
}

void Ops::threshold_rows(const Tensor& x, const Tensor& threshold, Tensor& mask) {
  check_matrix(x, "threshold_rows");
  check_same(x, mask, "threshold_rows");
  const int64_t rows = x.dim(0), cols = x.dim(1);
  check_vector(threshold, rows, x.dtype(), "threshold_rows", "threshold");
  const Tensor hx = to_host(x), ht = to_host(threshold);
  Tensor hm = host_out(mask);
  with_float_type(x.dtype(), "threshold_rows", [&](auto zero) {
    using T = decltype(zero);
    const T *px = hx.data<T>(), *pt = ht.data<T>();
    T* pm = hm.data<T>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) pm[r * cols + c] = px[r * cols + c] >= pt[r] ? T{1} : T{0};
  });
  store(*this, hm, mask);
}

}  // namespace moelab
