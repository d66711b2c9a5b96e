// The meta kernel (meta_ops.hpp): allocation without storage, and a clear error for everything
// else, so that code which tries to compute on a counted-only model fails loudly, never silently.
#include "moelab/meta_ops.hpp"

#include <fmt/format.h>

namespace moelab {
namespace {

[[noreturn]] void no_data(const char* op) {
  throw RuntimeError(
      fmt::format("{}: meta tensors hold no data (the meta kernel only builds models to count "
                  "their parameters; run on a real kernel to compute)",
                  op));
}

class MetaOps final : public Ops {
 public:
  DeviceKind device() const override { return DeviceKind::meta; }
  std::string name() const override { return "meta"; }

  Tensor empty(DType dtype, const Shape& shape) override {
    int64_t n = 1;
    for (int64_t d : shape) {
      MOELAB_CHECK(d >= 0, "meta: negative dimension in shape {}", shape_str(shape));
      n *= d;
    }
    auto buffer = std::make_shared<Buffer>();
    buffer->data = nullptr;
    buffer->bytes = static_cast<size_t>(n) * dtype_size(dtype);
    buffer->device = DeviceKind::meta;
    return Tensor(std::move(buffer), dtype, shape);
  }
  // "Zero" is a statement about contents a meta tensor does not have: same as empty.
  Tensor zeros(DType dtype, const Shape& shape) override { return empty(dtype, shape); }
  void fill(Tensor&, double) override { no_data("fill"); }
  void copy(const Tensor&, Tensor&) override { no_data("copy"); }

  void gemm(bool, bool, double, const Tensor&, const Tensor&, double, Tensor&) override { no_data("gemm"); }
  void grouped_gemm(const Tensor&, const Tensor&, bool, const std::vector<int64_t>&, double, double, Tensor&) override {
    no_data("grouped_gemm");
  }
  void grouped_gemm_weight_grad(const Tensor&, const Tensor&, bool, const std::vector<int64_t>&, bool,
                                Tensor&) override {
    no_data("grouped_gemm_weight_grad");
  }
  void activation(Activation, const Tensor&, Tensor&) override { no_data("activation"); }
  void activation_backward(Activation, const Tensor&, const Tensor&, bool, Tensor&) override {
    no_data("activation_backward");
  }
  void glu(Activation, const Tensor&, Tensor&) override { no_data("glu"); }
  void glu_backward(Activation, const Tensor&, const Tensor&, Tensor&) override { no_data("glu_backward"); }
  void axpy(double, const Tensor&, Tensor&) override { no_data("axpy"); }
  void scale(double, Tensor&) override { no_data("scale"); }
  void scale_rows(const Tensor&, Tensor&) override { no_data("scale_rows"); }
  void add_row_vector(const Tensor&, Tensor&) override { no_data("add_row_vector"); }
  void sum_rows(const Tensor&, bool, Tensor&) override { no_data("sum_rows"); }
  void row_dot(const Tensor&, const Tensor&, Tensor&) override { no_data("row_dot"); }
  void softmax_rows(const Tensor&, double, Tensor&) override { no_data("softmax_rows"); }
  void softmax_rows_backward(const Tensor&, const Tensor&, double, bool, Tensor&) override {
    no_data("softmax_rows_backward");
  }
  void sigmoid(const Tensor&, Tensor&) override { no_data("sigmoid"); }
  void sigmoid_backward(const Tensor&, const Tensor&, bool, Tensor&) override { no_data("sigmoid_backward"); }
  void logsumexp_rows(const Tensor&, Tensor&) override { no_data("logsumexp_rows"); }
  void softplus(const Tensor&, Tensor&) override { no_data("softplus"); }
  void softplus_backward(const Tensor&, const Tensor&, bool, Tensor&) override { no_data("softplus_backward"); }
  void topk_rows(const Tensor&, int, const Tensor*, Tensor&, Tensor&) override { no_data("topk_rows"); }
  void gather_rows(const Tensor&, const Tensor&, Tensor&) override { no_data("gather_rows"); }
  void scatter_add_rows(const Tensor&, const Tensor&, const Tensor*, Tensor&) override { no_data("scatter_add_rows"); }
  void gather_elements(const Tensor&, const Tensor&, const Tensor&, Tensor&) override { no_data("gather_elements"); }
  void scatter_add_elements(const Tensor&, const Tensor&, const Tensor&, Tensor&) override {
    no_data("scatter_add_elements");
  }

  // The optional slots' host fallbacks would reach copy() and fail there; failing here names the op.
  void mul(const Tensor&, const Tensor&, Tensor&) override { no_data("mul"); }
  void normalize_rows(const Tensor&, Tensor&) override { no_data("normalize_rows"); }
  void normalize_rows_backward(const Tensor&, const Tensor&, const Tensor&, bool, Tensor&) override {
    no_data("normalize_rows_backward");
  }
  double sum_squares(const Tensor&) override { no_data("sum_squares"); }
  void adamw_update(const AdamW&, const Tensor&, Tensor&, Tensor&, Tensor&) override { no_data("adamw_update"); }
  void transpose(const Tensor&, Tensor&) override { no_data("transpose"); }
  void grouped_topk_rows(const Tensor&, int, const Tensor*, int, int, int, Tensor&, Tensor&) override {
    no_data("grouped_topk_rows");
  }
};

}  // namespace

std::shared_ptr<Ops> make_meta_ops() {
  return std::make_shared<MetaOps>();
}

}  // namespace moelab
