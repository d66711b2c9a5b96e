// Conformance of a kernel's Ops slots against the reference kernel (conformance.hpp): every slot of
// Ops, in f64 and in f32, on the kernel under test and on the reference with the same fresh random
// inputs, outputs compared on the host.
//
//  - Inputs are drawn on the host from Rng(seed, stream), one stream per check and dtype (an FNV-1a
//    hash of the check's name, so adding a check leaves the others' inputs as they were): normal
//    values (never zeros), positive ones where the op needs them (normalize_rows, AdamW's v), i32
//    index tensors in range with a repeated entry.
//  - Read-only inputs reach each kernel through to_device. Outputs the op adds to or updates in
//    place (beta != 0, accumulate, axpy, AdamW's state, copy_columns' other columns) start from the
//    same random values on both sides, in a fresh allocation of each kernel (empty + copy: to_device
//    is a view of the host tensor on a cpu kernel, and the other side would see what the first
//    wrote). Outputs the op overwrites come from that kernel's empty.
//  - Backward slots read their saved tensors (softmax's y, rstd, attention's out and lse, ...) from
//    the reference's forward, the same host values on both sides, so each backward is judged on
//    its own and not on the forward's error as well.
//  - The reference runs first, so a kernel that writes into its inputs cannot change what the
//    reference saw.
//
// bf16 (ABI 7.0) is checked in the f32 pass: cast to bf16 and back, and, where the kernel takes
// set_matmul_precision(bf16), its GEMMs in bf16 precision against the reference's.
//
// Each variant (transposes, accumulate or overwrite, bias or none, every Activation) is its own
// SlotResult. Its error is the largest |a - r| / max(1, |r|) over all outputs (absolute below 1, so
// entries near zero do not dominate). Tolerances: 1e-10 in f64; in f32 1e-4, and 2e-4 for the GEMMs
// and attention, whose sums of products may run in any order, blocked or fused. Integer outputs
// (top-k indices) must be identical. A slot that throws on either side, an output that is not finite
// where the reference's is, or an output whose shape or dtype differs is a failure with a message;
// nothing a slot or a check throws escapes compare_kernel_slots.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "conformance_detail.hpp"
#include "moelab/kernel.hpp"
#include "moelab/module.hpp"
#include "moelab/rng.hpp"
#include "moelab/tensor.hpp"

namespace moelab::conformance_detail {
namespace {

// --- tolerances and shapes ------------------------------------------------------------------------

constexpr double kFloor = 1.0;  // relative error, absolute below 1
constexpr double kToleranceF64 = 1e-10;
constexpr double kToleranceF32 = 1e-4;
constexpr double kToleranceF32Reduction = 2e-4;  // GEMMs and attention in f32

// Which f32 tolerance a slot gets.
enum class Kind { plain, reduction };

double tolerance_of(DType dtype, Kind kind) {
  if (dtype == DType::f64) return kToleranceF64;
  return kind == Kind::reduction ? kToleranceF32Reduction : kToleranceF32;
}

// Small shapes: the whole run takes a few milliseconds on one core.
constexpr int64_t kRows = 7;             // rows of row-wise ops, tokens of the GEMMs
constexpr int64_t kInner = 5;            // the GEMMs' K
constexpr int64_t kCols = 6;             // columns of elementwise and row-wise ops, the GEMMs' N
constexpr int64_t kExperts = 8;          // columns of softmax, logsumexp, top-k; cross-entropy's vocabulary
constexpr int64_t kGroups = 3;           // grouped GEMM groups (one of them empty)
constexpr int64_t kPicks = 9;            // entries of the gather and scatter index tensors
constexpr int kTopK = 3;                 // k of topk_rows and grouped_topk_rows
constexpr int64_t kGroupedExperts = 12;  // grouped_topk_rows: 4 groups of 3

constexpr Activation kActivations[] = {Activation::identity, Activation::relu, Activation::gelu_tanh,
                                       Activation::gelu_erf, Activation::silu};

// --- running a slot on one kernel -----------------------------------------------------------------

// One output of a slot, back on the host, with the name it is reported under.
struct Output {
  std::string name;
  Tensor host;
};
using Outputs = std::vector<Output>;
// Runs one slot on the given kernel with the inputs the check drew, and returns its outputs.
using Run = std::function<Outputs(Ops&)>;

// A read-only input on `ops`'s device.
Tensor input(Ops& ops, const Tensor& host) {
  return ops.to_device(host);
}

// An output that starts from `host`'s values (accumulated into, updated in place): a fresh
// allocation of `ops`, so that neither side sees what the other wrote.
Tensor initial(Ops& ops, const Tensor& host) {
  Tensor t = ops.empty(host.dtype(), host.shape());
  ops.copy(host, t);
  return t;
}

Output out(Ops& ops, std::string name, const Tensor& t) {
  ops.synchronize();
  return Output{std::move(name), ops.to_host(t)};
}

// "slot (note, note)" for the notes that are not empty; "slot" when none is.
std::string named(std::string_view slot, std::initializer_list<std::string_view> notes) {
  std::string joined;
  for (const std::string_view note : notes) {
    if (note.empty()) continue;
    if (!joined.empty()) joined += ", ";
    joined += note;
  }
  return joined.empty() ? std::string(slot) : fmt::format("{} ({})", slot, joined);
}

// --- comparing outputs ----------------------------------------------------------------------------

bool is_integer(DType dtype) {
  return dtype == DType::i32 || dtype == DType::i64 || dtype == DType::u8;
}

// The multi-index of flat element `flat` of `shape`, as "[r, c]".
std::string position(const Shape& shape, int64_t flat) {
  std::vector<int64_t> index(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    const int64_t extent = std::max<int64_t>(shape[d], 1);
    index[d] = flat % extent;
    flat /= extent;
  }
  std::string text = "[";
  for (size_t d = 0; d < index.size(); ++d) text += fmt::format("{}{}", d == 0 ? "" : ", ", index[d]);
  return text + "]";
}

// Sets result.error to the largest relative error over the outputs, and result.failure at the
// first output that is not a rounding difference away: another shape or dtype, an integer that
// differs, a non-finite value where the reference's is finite (or another non-finite value).
void compare_outputs(const Outputs& got, const Outputs& want, SlotResult& result) {
  if (got.size() != want.size()) {
    result.failure = fmt::format("{} outputs on the kernel, {} on the reference", got.size(), want.size());
    return;
  }
  for (size_t i = 0; i < want.size(); ++i) {
    const Tensor& a = got[i].host;
    const Tensor& r = want[i].host;
    const std::string& name = want[i].name;
    if (a.dtype() != r.dtype() || a.shape() != r.shape()) {
      result.failure = fmt::format("{} is {} on the kernel, {} on the reference", name, a.describe(), r.describe());
      return;
    }
    const bool exact = is_integer(r.dtype());
    for (int64_t j = 0; j < r.numel(); ++j) {
      const double av = host_value(a, j), rv = host_value(r, j);
      if (exact || !std::isfinite(rv)) {
        if (av == rv || (std::isnan(av) && std::isnan(rv))) continue;
        result.failure =
            fmt::format("{}{} is {} on the kernel, {} on the reference", name, position(r.shape(), j), av, rv);
        return;
      }
      if (!std::isfinite(av)) {
        result.failure =
            fmt::format("{}{} is {} on the kernel where the reference gives {}", name, position(r.shape(), j), av, rv);
        return;
      }
      result.error = std::max(result.error, std::abs(av - rv) / std::max(kFloor, std::abs(rv)));
    }
  }
}

// Runs `run` on `ops`; nullopt and the message in `error` when it throws.
std::optional<Outputs> attempt(Ops& ops, const Run& run, std::string& error) {
  try {
    return run(ops);
  } catch (const std::exception& e) {
    error = e.what();
  } catch (...) {
    error = "an exception not derived from std::exception";
  }
  return std::nullopt;
}

// What a check works with: both kernels, the dtype, its own random stream, and the results so far.
class Harness {
 public:
  Harness(Ops& kernel, Ops& reference, DType type, Rng random, std::vector<SlotResult>& results)
      : dtype(type), rng(random), kernel_(kernel), reference_(reference), results_(results) {}

  const DType dtype;
  Rng rng;

  // Host tensors of fresh random values in this dtype.
  Tensor normal(const Shape& shape, double std = 1.0) {
    Tensor t = host_tensor(dtype, shape);
    fill_normal(t, std, rng);
    return t;
  }
  Tensor positive(const Shape& shape) {  // |normal| + 0.25
    Tensor t = normal(shape);
    for (int64_t i = 0; i < t.numel(); ++i) set_host_value(t, i, std::abs(host_value(t, i)) + 0.25);
    return t;
  }
  // i32 [count] in [0, bound), the last entry repeating the first.
  Tensor index(int64_t count, int64_t bound) {
    Tensor t = host_tensor(DType::i32, {count});
    int32_t* p = t.data<int32_t>();
    for (int64_t i = 0; i < count; ++i) p[i] = static_cast<int32_t>(rng.below(static_cast<uint64_t>(bound)));
    if (count > 1) p[count - 1] = p[0];
    return t;
  }

  // Runs `run` on the reference, then on the kernel, and records how their outputs compare.
  void compare(std::string slot, Kind kind, const Run& run) {
    SlotResult result = start(std::move(slot), kind);
    std::string reference_error, kernel_error;
    const std::optional<Outputs> want = attempt(reference_, run, reference_error);
    const std::optional<Outputs> got = attempt(kernel_, run, kernel_error);
    if (!got && !want)
      result.failure = fmt::format("threw: kernel: {}; reference: {}", kernel_error, reference_error);
    else if (!got)
      result.failure = fmt::format("threw: kernel: {}", kernel_error);
    else if (!want)
      result.failure = fmt::format("threw: reference: {}", reference_error);
    else
      compare_outputs(*got, *want, result);
    results_.push_back(std::move(result));
  }

  // The reference's outputs of `forward`: the saved tensors the backward `slot` reads. When the
  // reference throws, a failure for `slot` and nullopt.
  std::optional<std::vector<Tensor>> saved(const std::string& slot, const Run& forward) {
    std::string error;
    std::optional<Outputs> outputs = attempt(reference_, forward, error);
    if (!outputs) {
      fail(slot, fmt::format("threw: reference: {} (its forward, for the saved inputs)", error));
      return std::nullopt;
    }
    std::vector<Tensor> tensors;
    for (Output& output : *outputs) tensors.push_back(std::move(output.host));
    return tensors;
  }

  // Whether the kernel under test computes f32 GEMMs in bf16 (Ops::set_matmul_precision): an
  // optional capability, whose checks are skipped where it is missing.
  bool kernel_has_bf16_gemm() {
    try {
      const MatmulPrecisionScope scope(kernel_, DType::bf16);
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }

  void fail(std::string slot, std::string failure) {
    SlotResult result = start(std::move(slot), Kind::plain);
    result.failure = std::move(failure);
    results_.push_back(std::move(result));
  }

 private:
  SlotResult start(std::string slot, Kind kind) const {
    SlotResult result;
    result.slot = std::move(slot);
    result.dtype = dtype_name(dtype);
    result.tolerance = tolerance_of(dtype, kind);
    return result;
  }

  Ops& kernel_;
  Ops& reference_;
  std::vector<SlotResult>& results_;
};

// --- memory ---------------------------------------------------------------------------------------

void check_memory(Harness& h) {
  const double value = h.rng.normal();
  h.compare("fill", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor t = ops.empty(h.dtype, {kRows, kCols});
    ops.fill(t, value);
    return {out(ops, "dst", t)};
  });
  h.compare("zeros", Kind::plain, [&](Ops& ops) -> Outputs {
    const Tensor t = ops.zeros(h.dtype, {kRows, kCols});
    return {out(ops, "zeros", t)};
  });
  const Tensor x = h.normal({kRows, kCols});
  h.compare("copy", Kind::plain, [&](Ops& ops) -> Outputs {
    // host -> device, device -> device into another shape of as many elements, device -> host
    Tensor device = ops.empty(h.dtype, {kRows, kCols});
    ops.copy(x, device);
    Tensor reshaped = ops.empty(h.dtype, {kCols, kRows});
    ops.copy(device, reshaped);
    Tensor back = host_tensor(h.dtype, {kRows * kCols});
    ops.copy(reshaped, back);
    ops.synchronize();
    return {Output{"dst", back}};
  });
}

// --- dense and grouped GEMM -----------------------------------------------------------------------

void check_gemm(Harness& h) {
  for (const bool trans_a : {false, true})
    for (const bool trans_b : {false, true}) {
      const Tensor a = h.normal(trans_a ? Shape{kInner, kRows} : Shape{kRows, kInner});
      const Tensor b = h.normal(trans_b ? Shape{kCols, kInner} : Shape{kInner, kCols});
      const Tensor c0 = h.normal({kRows, kCols});
      h.compare(named("gemm", {trans_a ? "trans_a" : "", trans_b ? "trans_b" : ""}), Kind::reduction,
                [&](Ops& ops) -> Outputs {
                  Tensor c = initial(ops, c0);
                  ops.gemm(trans_a, trans_b, -0.7, input(ops, a), input(ops, b), 0.3, c);
                  return {out(ops, "c", c)};
                });
    }
  // beta = 0 overwrites c
  const Tensor a = h.normal({kRows, kInner}), b = h.normal({kInner, kCols});
  h.compare("gemm (beta = 0)", Kind::reduction, [&](Ops& ops) -> Outputs {
    Tensor c = ops.empty(h.dtype, {kRows, kCols});
    ops.gemm(false, false, 1.3, input(ops, a), input(ops, b), 0.0, c);
    return {out(ops, "c", c)};
  });
}

// Rows [0, 3) are group 0, group 1 is empty, rows [3, 7) are group 2.
const std::vector<int64_t>& grouped_offsets() {
  static const std::vector<int64_t> offsets = {0, 3, 3, kRows};
  return offsets;
}

void check_grouped_gemm(Harness& h) {
  for (const bool trans_w : {false, true}) {
    const Tensor x = h.normal({kRows, kInner});
    const Tensor w = h.normal(trans_w ? Shape{kGroups, kCols, kInner} : Shape{kGroups, kInner, kCols});
    const Tensor y0 = h.normal({kRows, kCols});
    h.compare(named("grouped_gemm", {trans_w ? "trans_w" : ""}), Kind::reduction, [&](Ops& ops) -> Outputs {
      Tensor y = initial(ops, y0);
      ops.grouped_gemm(input(ops, x), input(ops, w), trans_w, grouped_offsets(), 1.3, 0.5, y);
      return {out(ops, "y", y)};
    });
  }
}

void check_grouped_gemm_weight_grad(Harness& h) {
  for (const bool trans_w : {false, true})
    for (const bool accumulate : {false, true}) {
      const Tensor x = h.normal({kRows, kInner});
      const Tensor dy = h.normal({kRows, kCols});
      const Tensor dw0 = h.normal(trans_w ? Shape{kGroups, kCols, kInner} : Shape{kGroups, kInner, kCols});
      h.compare(named("grouped_gemm_weight_grad", {trans_w ? "trans_w" : "", accumulate ? "accumulate" : ""}),
                Kind::reduction, [&](Ops& ops) -> Outputs {
                  // overwriting must zero the empty group's dw as well
                  Tensor dw = accumulate ? initial(ops, dw0) : ops.empty(h.dtype, dw0.shape());
                  ops.grouped_gemm_weight_grad(input(ops, x), input(ops, dy), trans_w, grouped_offsets(), accumulate,
                                               dw);
                  return {out(ops, "dw", dw)};
                });
    }
}

// --- precision (bf16) ------------------------------------------------------------------------------

// bf16 belongs to f32 models: checked in the f32 pass only. Both kernels round to nearest even, so
// a cast must agree exactly, and a bf16 GEMM (exact products of the same rounded operands) within
// the f32 sums' rounding.
void check_precision(Harness& h) {
  if (h.dtype != DType::f32) return;
  const Tensor x = h.normal({kRows, kCols});
  h.compare("cast (f32 -> bf16 -> f32)", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor low = ops.empty(DType::bf16, x.shape());
    ops.cast(input(ops, x), low);
    Tensor back = ops.empty(DType::f32, x.shape());
    ops.cast(low, back);
    return {out(ops, "dst", back)};
  });
  if (!h.kernel_has_bf16_gemm()) return;
  const Tensor a = h.normal({kRows, kInner}), b = h.normal({kCols, kInner}), c0 = h.normal({kRows, kCols});
  h.compare("gemm (bf16 precision)", Kind::reduction, [&](Ops& ops) -> Outputs {
    const MatmulPrecisionScope scope(ops, DType::bf16);
    Tensor c = initial(ops, c0);
    ops.gemm(false, true, -0.7, input(ops, a), input(ops, b), 0.3, c);
    return {out(ops, "c", c)};
  });
  const Tensor w = h.normal({kGroups, kInner, kCols}), dy = h.normal({kRows, kCols});
  h.compare("grouped_gemm and its weight gradient (bf16 precision)", Kind::reduction, [&](Ops& ops) -> Outputs {
    const MatmulPrecisionScope scope(ops, DType::bf16);
    Tensor y = ops.empty(DType::f32, {kRows, kCols});
    ops.grouped_gemm(input(ops, a), input(ops, w), false, grouped_offsets(), 1.0, 0.0, y);
    Tensor dw = ops.empty(DType::f32, w.shape());
    ops.grouped_gemm_weight_grad(input(ops, a), input(ops, dy), false, grouped_offsets(), false, dw);
    return {out(ops, "y", y), out(ops, "dw", dw)};
  });
}

// --- elementwise ----------------------------------------------------------------------------------

void check_activation(Harness& h) {
  for (const Activation act : kActivations) {
    const Tensor x = h.normal({kRows, kCols}, 2.0);
    h.compare(named("activation", {activation_name(act)}), Kind::plain, [&](Ops& ops) -> Outputs {
      Tensor y = ops.empty(h.dtype, x.shape());
      ops.activation(act, input(ops, x), y);
      return {out(ops, "y", y)};
    });
    const Tensor dy = h.normal(x.shape());
    for (const bool accumulate : {false, true}) {
      const Tensor dx0 = h.normal(x.shape());
      h.compare(named("activation_backward", {activation_name(act), accumulate ? "accumulate" : ""}), Kind::plain,
                [&](Ops& ops) -> Outputs {
                  Tensor dx = accumulate ? initial(ops, dx0) : ops.empty(h.dtype, x.shape());
                  ops.activation_backward(act, input(ops, x), input(ops, dy), accumulate, dx);
                  return {out(ops, "dx", dx)};
                });
    }
  }
}

void check_glu(Harness& h) {
  for (const Activation act : kActivations) {
    const Tensor gate_up = h.normal({kRows, 2 * kCols}, 2.0);
    h.compare(named("glu", {activation_name(act)}), Kind::plain, [&](Ops& ops) -> Outputs {
      Tensor hidden = ops.empty(h.dtype, {kRows, kCols});
      ops.glu(act, input(ops, gate_up), hidden);
      return {out(ops, "h", hidden)};
    });
    const Tensor dh = h.normal({kRows, kCols});
    h.compare(named("glu_backward", {activation_name(act)}), Kind::plain, [&](Ops& ops) -> Outputs {
      Tensor dgate_up = ops.empty(h.dtype, gate_up.shape());
      ops.glu_backward(act, input(ops, gate_up), input(ops, dh), dgate_up);
      return {out(ops, "dgate_up", dgate_up)};
    });
  }
}

void check_axpy(Harness& h) {
  const Tensor z = h.normal({kRows, kCols}), y0 = h.normal({kRows, kCols});
  h.compare("axpy", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor y = initial(ops, y0);
    ops.axpy(-0.6, input(ops, z), y);
    return {out(ops, "y", y)};
  });
}

void check_scale(Harness& h) {
  const Tensor y0 = h.normal({kRows, kCols});
  h.compare("scale", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor y = initial(ops, y0);
    ops.scale(1.7, y);
    return {out(ops, "y", y)};
  });
}

void check_scale_rows(Harness& h) {
  const Tensor s = h.normal({kRows}), y0 = h.normal({kRows, kCols});
  h.compare("scale_rows", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor y = initial(ops, y0);
    ops.scale_rows(input(ops, s), y);
    return {out(ops, "y", y)};
  });
}

void check_add_row_vector(Harness& h) {
  const Tensor b = h.normal({kCols}), y0 = h.normal({kRows, kCols});
  h.compare("add_row_vector", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor y = initial(ops, y0);
    ops.add_row_vector(input(ops, b), y);
    return {out(ops, "y", y)};
  });
}

void check_mul(Harness& h) {
  const Tensor a = h.normal({kRows, kCols}), b = h.normal({kRows, kCols});
  h.compare("mul", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor product = ops.empty(h.dtype, a.shape());
    ops.mul(input(ops, a), input(ops, b), product);
    return {out(ops, "out", product)};
  });
  h.compare("mul (out aliases a)", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor product = initial(ops, a);
    ops.mul(product, input(ops, b), product);
    return {out(ops, "out", product)};
  });
}

void check_transpose(Harness& h) {
  const Tensor x = h.normal({kRows, kCols});
  h.compare("transpose", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor y = ops.empty(h.dtype, {kCols, kRows});
    ops.transpose(input(ops, x), y);
    return {out(ops, "y", y)};
  });
}

// --- row reductions -------------------------------------------------------------------------------

void check_sum_rows(Harness& h) {
  const Tensor x = h.normal({kRows, kCols});
  for (const bool accumulate : {false, true}) {
    const Tensor out0 = h.normal({kCols});
    h.compare(named("sum_rows", {accumulate ? "accumulate" : ""}), Kind::plain, [&](Ops& ops) -> Outputs {
      Tensor sums = accumulate ? initial(ops, out0) : ops.empty(h.dtype, {kCols});
      ops.sum_rows(input(ops, x), accumulate, sums);
      return {out(ops, "out", sums)};
    });
  }
}

void check_row_dot(Harness& h) {
  const Tensor a = h.normal({kRows, kCols}), b = h.normal({kRows, kCols});
  h.compare("row_dot", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor dots = ops.empty(h.dtype, {kRows});
    ops.row_dot(input(ops, a), input(ops, b), dots);
    return {out(ops, "out", dots)};
  });
}

void check_sum_squares(Harness& h) {
  const Tensor x = h.normal({kRows, kCols});
  h.compare("sum_squares", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor sum = host_tensor(DType::f64, {1});
    set_host_value(sum, 0, ops.sum_squares(input(ops, x)));
    return {Output{"sum", sum}};
  });
}

void check_normalize_rows(Harness& h) {
  const Tensor x = h.positive({kRows, kCols});  // gate weights: row sums well away from 0
  const Run forward = [&](Ops& ops) -> Outputs {
    Tensor y = ops.empty(h.dtype, x.shape());
    ops.normalize_rows(input(ops, x), y);
    return {out(ops, "y", y)};
  };
  h.compare("normalize_rows", Kind::plain, forward);
  const auto saved = h.saved("normalize_rows_backward", forward);
  if (!saved) return;
  const Tensor& y = (*saved)[0];
  const Tensor dy = h.normal(x.shape());
  for (const bool accumulate : {false, true}) {
    const Tensor dx0 = h.normal(x.shape());
    h.compare(named("normalize_rows_backward", {accumulate ? "accumulate" : ""}), Kind::plain,
              [&](Ops& ops) -> Outputs {
                Tensor dx = accumulate ? initial(ops, dx0) : ops.empty(h.dtype, x.shape());
                ops.normalize_rows_backward(input(ops, x), input(ops, y), input(ops, dy), accumulate, dx);
                return {out(ops, "dx", dx)};
              });
  }
}

// --- probabilities --------------------------------------------------------------------------------

void check_softmax_rows(Harness& h) {
  constexpr double temperature = 0.7;
  const Tensor x = h.normal({kRows, kExperts}, 2.0);
  const Run forward = [&](Ops& ops) -> Outputs {
    Tensor y = ops.empty(h.dtype, x.shape());
    ops.softmax_rows(input(ops, x), temperature, y);
    return {out(ops, "y", y)};
  };
  h.compare("softmax_rows (temperature 0.7)", Kind::plain, forward);
  const auto saved = h.saved("softmax_rows_backward", forward);
  if (!saved) return;
  const Tensor& y = (*saved)[0];
  const Tensor dy = h.normal(x.shape());
  for (const bool accumulate : {false, true}) {
    const Tensor dx0 = h.normal(x.shape());
    h.compare(named("softmax_rows_backward", {"temperature 0.7", accumulate ? "accumulate" : ""}), Kind::plain,
              [&](Ops& ops) -> Outputs {
                Tensor dx = accumulate ? initial(ops, dx0) : ops.empty(h.dtype, x.shape());
                ops.softmax_rows_backward(input(ops, y), input(ops, dy), temperature, accumulate, dx);
                return {out(ops, "dx", dx)};
              });
  }
}

void check_sigmoid(Harness& h) {
  const Tensor x = h.normal({kRows, kCols}, 2.0);
  const Run forward = [&](Ops& ops) -> Outputs {
    Tensor y = ops.empty(h.dtype, x.shape());
    ops.sigmoid(input(ops, x), y);
    return {out(ops, "y", y)};
  };
  h.compare("sigmoid", Kind::plain, forward);
  const auto saved = h.saved("sigmoid_backward", forward);
  if (!saved) return;
  const Tensor& y = (*saved)[0];
  const Tensor dy = h.normal(x.shape());
  for (const bool accumulate : {false, true}) {
    const Tensor dx0 = h.normal(x.shape());
    h.compare(named("sigmoid_backward", {accumulate ? "accumulate" : ""}), Kind::plain, [&](Ops& ops) -> Outputs {
      Tensor dx = accumulate ? initial(ops, dx0) : ops.empty(h.dtype, x.shape());
      ops.sigmoid_backward(input(ops, y), input(ops, dy), accumulate, dx);
      return {out(ops, "dx", dx)};
    });
  }
}

void check_softplus(Harness& h) {
  const Tensor x = h.normal({kRows, kCols}, 2.0);
  h.compare("softplus", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor y = ops.empty(h.dtype, x.shape());
    ops.softplus(input(ops, x), y);
    return {out(ops, "y", y)};
  });
  const Tensor dy = h.normal(x.shape());
  for (const bool accumulate : {false, true}) {
    const Tensor dx0 = h.normal(x.shape());
    h.compare(named("softplus_backward", {accumulate ? "accumulate" : ""}), Kind::plain, [&](Ops& ops) -> Outputs {
      Tensor dx = accumulate ? initial(ops, dx0) : ops.empty(h.dtype, x.shape());
      ops.softplus_backward(input(ops, x), input(ops, dy), accumulate, dx);
      return {out(ops, "dx", dx)};
    });
  }
}

void check_logsumexp_rows(Harness& h) {
  const Tensor x = h.normal({kRows, kExperts}, 2.0);
  h.compare("logsumexp_rows", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor lse = ops.empty(h.dtype, {kRows});
    ops.logsumexp_rows(input(ops, x), lse);
    return {out(ops, "out", lse)};
  });
}

// --- selection and movement -----------------------------------------------------------------------

void check_topk_rows(Harness& h) {
  const Tensor scores = h.normal({kRows, kExperts});
  const Tensor bias = h.normal({kExperts}, 0.5);
  for (const bool biased : {false, true})
    h.compare(named("topk_rows", {biased ? "bias" : ""}), Kind::plain, [&](Ops& ops) -> Outputs {
      const Tensor b = input(ops, bias);
      Tensor values = ops.empty(h.dtype, {kRows, kTopK});
      Tensor indices = ops.empty(DType::i32, {kRows, kTopK});
      ops.topk_rows(input(ops, scores), kTopK, biased ? &b : nullptr, values, indices);
      return {out(ops, "values", values), out(ops, "indices", indices)};
    });
}

void check_grouped_topk_rows(Harness& h) {
  constexpr int groups = 4, keep_groups = 2, group_top = 2;  // groups of 3 columns
  const Tensor scores = h.normal({kRows, kGroupedExperts});
  const Tensor bias = h.normal({kGroupedExperts}, 0.5);
  for (const bool biased : {false, true})
    h.compare(named("grouped_topk_rows", {"4 groups, keep 2, top 2", biased ? "bias" : ""}), Kind::plain,
              [&](Ops& ops) -> Outputs {
                const Tensor b = input(ops, bias);
                Tensor values = ops.empty(h.dtype, {kRows, kTopK});
                Tensor indices = ops.empty(DType::i32, {kRows, kTopK});
                ops.grouped_topk_rows(input(ops, scores), kTopK, biased ? &b : nullptr, groups, keep_groups, group_top,
                                      values, indices);
                return {out(ops, "values", values), out(ops, "indices", indices)};
              });
}

void check_gather_rows(Harness& h) {
  const Tensor src = h.normal({kRows, kCols});
  const Tensor index = h.index(kPicks, kRows);
  h.compare("gather_rows", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor dst = ops.empty(h.dtype, {kPicks, kCols});
    ops.gather_rows(input(ops, src), input(ops, index), dst);
    return {out(ops, "dst", dst)};
  });
}

void check_scatter_add_rows(Harness& h) {
  const Tensor src = h.normal({kPicks, kCols});
  const Tensor index = h.index(kPicks, kRows);  // repeats: several rows land on one destination
  const Tensor weight = h.normal({kPicks});
  const Tensor dst0 = h.normal({kRows, kCols});
  for (const bool weighted : {false, true})
    h.compare(named("scatter_add_rows", {weighted ? "weight" : ""}), Kind::plain, [&](Ops& ops) -> Outputs {
      const Tensor w = input(ops, weight);
      Tensor dst = initial(ops, dst0);
      ops.scatter_add_rows(input(ops, src), input(ops, index), weighted ? &w : nullptr, dst);
      return {out(ops, "dst", dst)};
    });
}

void check_gather_elements(Harness& h) {
  const Tensor x = h.normal({kRows, kCols});
  const Tensor row = h.index(kPicks, kRows), col = h.index(kPicks, kCols);
  h.compare("gather_elements", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor picked = ops.empty(h.dtype, {kPicks});
    ops.gather_elements(input(ops, x), input(ops, row), input(ops, col), picked);
    return {out(ops, "out", picked)};
  });
}

void check_scatter_add_elements(Harness& h) {
  const Tensor dout = h.normal({kPicks});
  const Tensor row = h.index(kPicks, kRows), col = h.index(kPicks, kCols);  // (row, col) repeats
  const Tensor dx0 = h.normal({kRows, kCols});
  h.compare("scatter_add_elements", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor dx = initial(ops, dx0);
    ops.scatter_add_elements(input(ops, dout), input(ops, row), input(ops, col), dx);
    return {out(ops, "dx", dx)};
  });
}

// --- optimizer ------------------------------------------------------------------------------------

void check_adamw_update(Harness& h) {
  const Ops::AdamW hyper{1e-2, 0.9, 0.95, 1e-8, 0.1, 3};
  const Tensor grad = h.normal({kRows, kCols});
  const Tensor param0 = h.normal({kRows, kCols});
  const Tensor m0 = h.normal({kRows, kCols}, 0.1);
  Tensor v0 = h.normal({kRows, kCols}, 0.1);
  for (int64_t i = 0; i < v0.numel(); ++i) set_host_value(v0, i, host_value(v0, i) * host_value(v0, i));  // v >= 0
  h.compare("adamw_update (step 3, weight decay 0.1)", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor param = initial(ops, param0), m = initial(ops, m0), v = initial(ops, v0);
    ops.adamw_update(hyper, input(ops, grad), param, m, v);
    return {out(ops, "param", param), out(ops, "m", m), out(ops, "v", v)};
  });
}

// --- transformer ops ------------------------------------------------------------------------------

void check_copy_columns(Harness& h) {
  const Tensor src = h.normal({kRows, 9});
  for (const bool accumulate : {false, true}) {
    const Tensor dst0 = h.normal({kRows, 8});  // the columns outside [3, 7) must stay as they are
    h.compare(named("copy_columns", {accumulate ? "accumulate" : ""}), Kind::plain, [&](Ops& ops) -> Outputs {
      Tensor dst = initial(ops, dst0);
      ops.copy_columns(input(ops, src), 2, dst, 3, 4, accumulate);
      return {out(ops, "dst", dst)};
    });
  }
}

void check_rms_norm(Harness& h) {
  constexpr double eps = 1e-5;
  const Tensor x = h.normal({kRows, kCols});
  const Tensor weight = h.normal({kCols});
  const Run forward = [&](Ops& ops) -> Outputs {
    Tensor y = ops.empty(h.dtype, x.shape()), rstd = ops.empty(h.dtype, {kRows});
    ops.rms_norm(input(ops, x), input(ops, weight), eps, y, rstd);
    return {out(ops, "y", y), out(ops, "rstd", rstd)};
  };
  h.compare("rms_norm", Kind::plain, forward);
  const auto saved = h.saved("rms_norm_backward", forward);
  if (!saved) return;
  const Tensor& rstd = (*saved)[1];
  const Tensor dy = h.normal(x.shape());
  const Tensor dweight0 = h.normal({kCols});
  h.compare("rms_norm_backward", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor dx = ops.empty(h.dtype, x.shape()), dweight = initial(ops, dweight0);
    ops.rms_norm_backward(input(ops, x), input(ops, weight), input(ops, rstd), input(ops, dy), dx, dweight);
    return {out(ops, "dx", dx), out(ops, "dweight", dweight)};
  });
}

void check_layer_norm(Harness& h) {
  constexpr double eps = 1e-5;
  for (const bool with_bias : {true, false}) {
    const std::string_view note = with_bias ? "bias" : "no bias";
    const Tensor x = h.normal({kRows, kCols});
    const Tensor weight = h.normal({kCols}), bias = h.normal({kCols});
    const Run forward = [&](Ops& ops) -> Outputs {
      const Tensor b = input(ops, bias);
      Tensor y = ops.empty(h.dtype, x.shape());
      Tensor mean = ops.empty(h.dtype, {kRows}), rstd = ops.empty(h.dtype, {kRows});
      ops.layer_norm(input(ops, x), input(ops, weight), with_bias ? &b : nullptr, eps, y, mean, rstd);
      return {out(ops, "y", y), out(ops, "mean", mean), out(ops, "rstd", rstd)};
    };
    h.compare(named("layer_norm", {note}), Kind::plain, forward);
    const std::string backward = named("layer_norm_backward", {note});
    const auto saved = h.saved(backward, forward);
    if (!saved) continue;
    const Tensor& mean = (*saved)[1];
    const Tensor& rstd = (*saved)[2];
    const Tensor dy = h.normal(x.shape());
    const Tensor dweight0 = h.normal({kCols}), dbias0 = h.normal({kCols});
    h.compare(backward, Kind::plain, [&](Ops& ops) -> Outputs {
      Tensor dx = ops.empty(h.dtype, x.shape());
      Tensor dweight = initial(ops, dweight0), dbias = initial(ops, dbias0);
      ops.layer_norm_backward(input(ops, x), input(ops, weight), input(ops, mean), input(ops, rstd), input(ops, dy), dx,
                              dweight, with_bias ? &dbias : nullptr);
      Outputs outputs = {out(ops, "dx", dx), out(ops, "dweight", dweight)};
      if (with_bias) outputs.push_back(out(ops, "dbias", dbias));
      return outputs;
    });
  }
}

void check_rope(Harness& h) {
  constexpr int64_t heads = 2, head_dim = 8, seq_len = 5, rows = 2 * seq_len;
  constexpr double theta = 10000.0;
  const Tensor x = h.normal({rows, heads * head_dim});
  for (const bool inverse : {false, true})
    h.compare(named("rope", {inverse ? "inverse" : ""}), Kind::plain, [&](Ops& ops) -> Outputs {
      Tensor y = ops.empty(h.dtype, x.shape());
      ops.rope(input(ops, x), heads, seq_len, theta, inverse, y);
      return {out(ops, "y", y)};
    });
  h.compare("rope (y aliases x)", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor y = initial(ops, x);
    ops.rope(y, heads, seq_len, theta, false, y);
    return {out(ops, "y", y)};
  });
}

void check_causal_attention(Harness& h) {
  constexpr int64_t heads = 4, kv_heads = 2, seq_len = 5, sequences = 2, key_dim = 4, value_dim = 3;
  constexpr int64_t rows = sequences * seq_len;
  const double scale = 1.0 / std::sqrt(static_cast<double>(key_dim));
  const Tensor q = h.normal({rows, heads * key_dim});
  const Tensor k = h.normal({rows, kv_heads * key_dim});
  const Tensor v = h.normal({rows, kv_heads * value_dim});
  const Run forward = [&](Ops& ops) -> Outputs {
    Tensor attended = ops.empty(h.dtype, {rows, heads * value_dim});
    Tensor lse = ops.empty(h.dtype, {rows, heads});
    ops.causal_attention(input(ops, q), input(ops, k), input(ops, v), heads, kv_heads, seq_len, scale, attended, lse);
    return {out(ops, "out", attended), out(ops, "lse", lse)};
  };
  h.compare("causal_attention (4 heads, 2 kv heads)", Kind::reduction, forward);
  const std::string backward = "causal_attention_backward (4 heads, 2 kv heads)";
  const auto saved = h.saved(backward, forward);
  if (!saved) return;
  const Tensor& attended = (*saved)[0];
  const Tensor& lse = (*saved)[1];
  const Tensor dout = h.normal(attended.shape());
  h.compare(backward, Kind::reduction, [&](Ops& ops) -> Outputs {
    Tensor dq = ops.empty(h.dtype, q.shape()), dk = ops.empty(h.dtype, k.shape()), dv = ops.empty(h.dtype, v.shape());
    ops.causal_attention_backward(input(ops, q), input(ops, k), input(ops, v), input(ops, attended), input(ops, lse),
                                  input(ops, dout), heads, kv_heads, seq_len, scale, dq, dk, dv);
    return {out(ops, "dq", dq), out(ops, "dk", dk), out(ops, "dv", dv)};
  });
}

void check_cross_entropy(Harness& h) {
  constexpr double scale = 0.25;
  const Tensor logits = h.normal({kRows, kExperts}, 2.0);
  Tensor targets = h.index(kRows, kExperts);
  targets.data<int32_t>()[2] = -1;  // an ignored row
  const Run forward = [&](Ops& ops) -> Outputs {
    Tensor loss = ops.empty(h.dtype, {kRows}), lse = ops.empty(h.dtype, {kRows});
    ops.cross_entropy(input(ops, logits), input(ops, targets), loss, lse);
    return {out(ops, "loss", loss), out(ops, "lse", lse)};
  };
  h.compare("cross_entropy (an ignored row)", Kind::plain, forward);
  const std::string backward = "cross_entropy_backward (an ignored row)";
  const auto saved = h.saved(backward, forward);
  if (!saved) return;
  const Tensor& lse = (*saved)[1];
  h.compare(backward, Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor dlogits = ops.empty(h.dtype, logits.shape());
    ops.cross_entropy_backward(input(ops, logits), input(ops, targets), input(ops, lse), scale, dlogits);
    return {out(ops, "dlogits", dlogits)};
  });
}

// --- the table and the driver ---------------------------------------------------------------------

// --- routing maths (ABI 4.0) ------------------------------------------------------------------------

void check_exp_log(Harness& h) {
  const Tensor x = h.normal({kRows, kCols}), positive = h.positive({kRows, kCols}), dy = h.normal({kRows, kCols});
  h.compare("exp", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor y = ops.empty(h.dtype, x.shape());
    ops.exp(input(ops, x), y);
    return {out(ops, "y", y)};
  });
  h.compare("log", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor y = ops.empty(h.dtype, x.shape());
    ops.log(input(ops, positive), y);
    return {out(ops, "y", y)};
  });
  for (const bool accumulate : {false, true}) {
    const Tensor dx0 = h.normal(x.shape());
    h.compare(named("exp_backward", {accumulate ? "accumulate" : ""}), Kind::plain, [&](Ops& ops) -> Outputs {
      Tensor dx = accumulate ? initial(ops, dx0) : ops.empty(h.dtype, x.shape());
      ops.exp_backward(input(ops, positive), input(ops, dy), accumulate, dx);
      return {out(ops, "dx", dx)};
    });
    h.compare(named("log_backward", {accumulate ? "accumulate" : ""}), Kind::plain, [&](Ops& ops) -> Outputs {
      Tensor dx = accumulate ? initial(ops, dx0) : ops.empty(h.dtype, x.shape());
      ops.log_backward(input(ops, positive), input(ops, dy), accumulate, dx);
      return {out(ops, "dx", dx)};
    });
  }
}

void check_divide(Harness& h) {
  const Tensor a = h.normal({kRows, kCols}), b = h.positive({kRows, kCols}), dy = h.normal({kRows, kCols});
  h.compare("divide", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor quotient = ops.empty(h.dtype, a.shape());
    ops.divide(input(ops, a), input(ops, b), quotient);
    return {out(ops, "out", quotient)};
  });
  for (const bool accumulate : {false, true}) {
    const Tensor da0 = h.normal(a.shape()), db0 = h.normal(a.shape());
    h.compare(named("divide_backward", {accumulate ? "accumulate" : ""}), Kind::plain, [&](Ops& ops) -> Outputs {
      Tensor da = accumulate ? initial(ops, da0) : ops.empty(h.dtype, a.shape());
      Tensor db = accumulate ? initial(ops, db0) : ops.empty(h.dtype, a.shape());
      ops.divide_backward(input(ops, a), input(ops, b), input(ops, dy), accumulate, &da, &db);
      return {out(ops, "da", da), out(ops, "db", db)};
    });
  }
}

void check_scale_columns(Harness& h) {
  const Tensor s = h.normal({kCols}), x = h.normal({kRows, kCols}), dy = h.normal({kRows, kCols});
  h.compare("scale_columns", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor y = initial(ops, x);
    ops.scale_columns(input(ops, s), y);
    return {out(ops, "y", y)};
  });
  for (const bool accumulate : {false, true}) {
    const Tensor dx0 = h.normal(x.shape()), ds0 = h.normal({kCols});
    h.compare(named("scale_columns_backward", {accumulate ? "accumulate" : ""}), Kind::plain, [&](Ops& ops) -> Outputs {
      Tensor dx = accumulate ? initial(ops, dx0) : ops.empty(h.dtype, x.shape());
      Tensor ds = accumulate ? initial(ops, ds0) : ops.empty(h.dtype, {kCols});
      ops.scale_columns_backward(input(ops, x), input(ops, s), input(ops, dy), accumulate, dx, ds);
      return {out(ops, "dx", dx), out(ops, "ds", ds)};
    });
  }
}

void check_row_sums_max_threshold(Harness& h) {
  const Tensor x = h.normal({kRows, kExperts}), threshold = h.normal({kRows}, 0.5);
  for (const bool accumulate : {false, true}) {
    const Tensor out0 = h.normal({kRows});
    h.compare(named("row_sums", {accumulate ? "accumulate" : ""}), Kind::plain, [&](Ops& ops) -> Outputs {
      Tensor sums = accumulate ? initial(ops, out0) : ops.empty(h.dtype, {kRows});
      ops.row_sums(input(ops, x), accumulate, sums);
      return {out(ops, "out", sums)};
    });
  }
  h.compare("max_rows", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor values = ops.empty(h.dtype, {kRows}), indices = ops.empty(DType::i32, {kRows});
    ops.max_rows(input(ops, x), values, indices);
    return {out(ops, "values", values), out(ops, "indices", indices)};
  });
  h.compare("threshold_rows", Kind::plain, [&](Ops& ops) -> Outputs {
    Tensor mask = ops.empty(h.dtype, x.shape());
    ops.threshold_rows(input(ops, x), input(ops, threshold), mask);
    return {out(ops, "mask", mask)};
  });
}

struct SlotCheck {
  const char* name;  // names the check's random stream, and the result when the check itself throws
  void (*run)(Harness&);
};

constexpr SlotCheck kSlotChecks[] = {
    {"memory", check_memory},
    {"gemm", check_gemm},
    {"grouped_gemm", check_grouped_gemm},
    {"grouped_gemm_weight_grad", check_grouped_gemm_weight_grad},
    {"precision", check_precision},
    {"activation", check_activation},
    {"glu", check_glu},
    {"axpy", check_axpy},
    {"scale", check_scale},
    {"scale_rows", check_scale_rows},
    {"add_row_vector", check_add_row_vector},
    {"mul", check_mul},
    {"transpose", check_transpose},
    {"sum_rows", check_sum_rows},
    {"row_dot", check_row_dot},
    {"sum_squares", check_sum_squares},
    {"normalize_rows", check_normalize_rows},
    {"softmax_rows", check_softmax_rows},
    {"sigmoid", check_sigmoid},
    {"softplus", check_softplus},
    {"logsumexp_rows", check_logsumexp_rows},
    {"topk_rows", check_topk_rows},
    {"grouped_topk_rows", check_grouped_topk_rows},
    {"gather_rows", check_gather_rows},
    {"scatter_add_rows", check_scatter_add_rows},
    {"gather_elements", check_gather_elements},
    {"scatter_add_elements", check_scatter_add_elements},
    {"adamw_update", check_adamw_update},
    {"copy_columns", check_copy_columns},
    {"rms_norm", check_rms_norm},
    {"layer_norm", check_layer_norm},
    {"rope", check_rope},
    {"causal_attention", check_causal_attention},
    {"cross_entropy", check_cross_entropy},
    {"exp_log", check_exp_log},
    {"divide", check_divide},
    {"scale_columns", check_scale_columns},
    {"row_sums_max_threshold", check_row_sums_max_threshold},
};

// The random stream of a check in a dtype: FNV-1a of its name, so that streams do not depend on
// the order of the table.
uint64_t stream_of(std::string_view name, DType dtype) {
  uint64_t hash = 0xcbf29ce484222325ULL;
  for (const char c : name) hash = (hash ^ static_cast<unsigned char>(c)) * 0x100000001b3ULL;
  return hash ^ static_cast<uint64_t>(dtype);
}

}  // namespace

std::vector<SlotResult> compare_kernel_slots(Ops& kernel, Ops& reference, uint64_t seed) {
  std::vector<SlotResult> results;
  for (const DType dtype : {DType::f64, DType::f32})
    for (const SlotCheck& check : kSlotChecks) {
      Harness harness(kernel, reference, dtype, Rng(seed, stream_of(check.name, dtype)), results);
      // Slots' own exceptions are caught in Harness::compare; this catches the check's (drawing
      // inputs on the host), so that one broken check does not hide the others.
      try {
        check.run(harness);
      } catch (const std::exception& e) {
        harness.fail(check.name, fmt::format("threw: the check itself: {}", e.what()));
      } catch (...) {
        harness.fail(check.name, "threw: the check itself: an exception not derived from std::exception");
      }
    }
  return results;
}

}  // namespace moelab::conformance_detail
