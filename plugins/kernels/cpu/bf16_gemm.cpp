// bf16 GEMMs on oneDNN, or widened to f32 on OpenBLAS (bf16_gemm.hpp).
#include "bf16_gemm.hpp"

#include <cblas.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "moelab/error.hpp"
#include "threads.hpp"

#if MOELAB_HAVE_ONEDNN
#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace moelab::cpu {

#if defined(__x86_64__) && defined(__GNUC__)
#define MOELAB_BF16_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define MOELAB_BF16_CLONES
#endif

MOELAB_BF16_CLONES void round_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_from_f32(src[i]);
}

MOELAB_BF16_CLONES void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_from_bf16(src[i]);
}

namespace {

// Blocks of c, fixed by the shape: big enough that a call's overhead (~2 us) is lost in its
// arithmetic, small enough that 2-32 threads find work in a layer's GEMMs.
constexpr int64_t kBlockRows = 256;
constexpr int64_t kBlockCols = 256;
// Below this many multiply-adds in all, one thread does every block.
constexpr double kMinThreadedFlops = double(int64_t{1} << 22);

// The part of c one call computes.
struct Block {
  size_t call;
  int64_t row_begin, row_end, col_begin, col_end;
  double price() const { return double(row_end - row_begin) * double(col_end - col_begin); }
};

std::vector<Block> blocks_of(const std::vector<Bf16GemmCall>& calls) {
  std::vector<Block> blocks;
  for (size_t i = 0; i < calls.size(); ++i) {
    const Bf16GemmCall& call = calls[i];
    if (call.m == 0 || call.n == 0) continue;
    const bool by_rows = call.m > kBlockRows || call.n <= kBlockCols;
    const int64_t extent = by_rows ? call.m : call.n, step = by_rows ? kBlockRows : kBlockCols;
    for (int64_t begin = 0; begin < extent; begin += step) {
      const int64_t end = std::min(extent, begin + step);
      blocks.push_back(by_rows ? Block{i, begin, end, 0, call.n} : Block{i, 0, call.m, begin, end});
    }
  }
  return blocks;
}

// c[rows, cols] = beta * c: a GEMM with k = 0 is an empty sum.
void scale_c(const Bf16GemmCall& call) {
  for (int64_t r = 0; r < call.m; ++r) {
    float* row = call.c + r * call.ldc;
    if (call.beta == 0.0f)
      std::fill_n(row, call.n, 0.0f);
    else
      for (int64_t j = 0; j < call.n; ++j) row[j] *= call.beta;
  }
}

}  // namespace

#if MOELAB_HAVE_ONEDNN

namespace {

const char* isa_name(dnnl::cpu_isa isa) {
  switch (isa) {
    case dnnl::cpu_isa::avx512_core_amx:
      return "avx512_core_amx (AMX tiles)";
    case dnnl::cpu_isa::avx512_core_bf16:
      return "avx512_core_bf16 (AVX-512 BF16)";
    case dnnl::cpu_isa::avx512_core_vnni:
      return "avx512_core_vnni (bf16 emulated on AVX-512)";
    case dnnl::cpu_isa::avx512_core:
      return "avx512_core (bf16 emulated on AVX-512)";
    default:
      return "no AVX-512";
  }
}

}  // namespace

struct Bf16Gemm::OneDnn {
  using Key = std::tuple<bool, bool, int64_t, int64_t, int64_t, uint32_t>;  // transposes, lda, ldb, ldc, beta
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  std::mutex mutex;
  std::map<Key, std::shared_ptr<dnnl::matmul>> primitives;

  static constexpr dnnl::memory::dim kRuntime = DNNL_RUNTIME_DIM_VAL;
  using dt = dnnl::memory::data_type;

  static dnnl::memory::dims a_strides(bool trans, int64_t ld) {
    return trans ? dnnl::memory::dims{1, ld} : dnnl::memory::dims{ld, 1};
  }

  // The primitive for this layout, made on first use; null where oneDNN has only its reference
  // implementation for it (then the call is widened).
  std::shared_ptr<dnnl::matmul> primitive(const Bf16GemmCall& call) {
    const Key key{call.trans_a, call.trans_b, call.lda, call.ldb, call.ldc, std::bit_cast<uint32_t>(call.beta)};
    const std::lock_guard<std::mutex> lock(mutex);
    if (const auto found = primitives.find(key); found != primitives.end()) return found->second;
    dnnl::primitive_attr attr;
    attr.set_output_scales(0, {DNNL_RUNTIME_F32_VAL});
    if (call.beta != 0.0f) {
      dnnl::post_ops sum;
      sum.append_sum(call.beta);
      attr.set_post_ops(sum);
    }
    const dnnl::memory::desc a({kRuntime, kRuntime}, dt::bf16, a_strides(call.trans_a, call.lda));
    const dnnl::memory::desc b({kRuntime, kRuntime}, dt::bf16, a_strides(call.trans_b, call.ldb));
    const dnnl::memory::desc c({kRuntime, kRuntime}, dt::f32, {call.ldc, 1});
    std::shared_ptr<dnnl::matmul> made;
    try {
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), attr, engine);
      if (std::string(pd.impl_info_str()).rfind("ref", 0) != 0) made = std::make_shared<dnnl::matmul>(pd);
    } catch (const dnnl::error&) {
      // no implementation for this layout: widened
    }
    primitives.emplace(key, made);
    return made;
  }

  void execute(dnnl::stream& stream, const dnnl::matmul& matmul, const Bf16GemmCall& call, const Block& block) {
    const int64_t rows = block.row_end - block.row_begin, cols = block.col_end - block.col_begin;
    const uint16_t* a = call.a + (call.trans_a ? block.row_begin : block.row_begin * call.lda);
    const uint16_t* b = call.b + (call.trans_b ? block.col_begin * call.ldb : block.col_begin);
    float* c = call.c + block.row_begin * call.ldc + block.col_begin;
    float alpha = call.alpha;
    // oneDNN takes non-const handles; it only reads a, b and the scale.
    dnnl::memory ma({{rows, call.k}, dt::bf16, a_strides(call.trans_a, call.lda)}, engine, const_cast<uint16_t*>(a));
    dnnl::memory mb({{call.k, cols}, dt::bf16, a_strides(call.trans_b, call.ldb)}, engine, const_cast<uint16_t*>(b));
    dnnl::memory mc({{rows, cols}, dt::f32, {call.ldc, 1}}, engine, c);
    dnnl::memory scale({{1}, dt::f32, {1}}, engine, &alpha);
    matmul.execute(
        stream, {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}, {DNNL_ARG_ATTR_OUTPUT_SCALES, scale}});
  }
};

Bf16Gemm::Bf16Gemm(bool want_onednn) {
  const dnnl_version_t* version = dnnl_version();
  const dnnl::cpu_isa isa = dnnl::get_effective_cpu_isa();
  // Without AVX-512, oneDNN's bf16 GEMM is its reference loop: OpenBLAS on widened operands is faster.
  const bool fast = isa == dnnl::cpu_isa::avx512_core_amx || isa == dnnl::cpu_isa::avx512_core_bf16 ||
                    isa == dnnl::cpu_isa::avx512_core_vnni || isa == dnnl::cpu_isa::avx512_core;
  if (want_onednn && fast) {
    onednn_ = std::make_unique<OneDnn>();
    path_ = Bf16Path::onednn;
    description_ = fmt::format("oneDNN {}.{}.{} matmul (gemm:jit), ISA {}", version->major, version->minor,
                               version->patch, isa_name(isa));
  } else {
    description_ = fmt::format("widened to f32 on OpenBLAS ({})",
                               want_onednn ? fmt::format("oneDNN {}.{}.{} has no fast bf16 GEMM on this CPU: {}",
                                                         version->major, version->minor, version->patch, isa_name(isa))
                                           : std::string("chosen by the kernel's bf16_gemm parameter"));
  }
}

#else

struct Bf16Gemm::OneDnn {};

Bf16Gemm::Bf16Gemm(bool want_onednn) {
  description_ = want_onednn ? "widened to f32 on OpenBLAS (oneDNN was not found when the kernel was built: "
                               "tools/setup-deps installs libdnnl-dev)"
                             : "widened to f32 on OpenBLAS (chosen by the kernel's bf16_gemm parameter)";
}

#endif

Bf16Gemm::~Bf16Gemm() = default;

void Bf16Gemm::run_widened(const Bf16GemmCall& call) {
  if (call.m == 0 || call.n == 0) return;
  if (call.k == 0) return scale_c(call);
  // The stored extent of a matrix: `rows` rows of `ld`, the last one `cols` wide.
  const auto widen = [](const uint16_t* src, int64_t rows, int64_t cols, int64_t ld) {
    std::vector<float> out(static_cast<size_t>((rows - 1) * ld + cols));
    widen_bf16(src, out.data(), static_cast<int64_t>(out.size()));
    return out;
  };
  const std::vector<float> a =
      call.trans_a ? widen(call.a, call.k, call.m, call.lda) : widen(call.a, call.m, call.k, call.lda);
  const std::vector<float> b =
      call.trans_b ? widen(call.b, call.n, call.k, call.ldb) : widen(call.b, call.k, call.n, call.ldb);
  cblas_sgemm(CblasRowMajor, call.trans_a ? CblasTrans : CblasNoTrans, call.trans_b ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(call.m), static_cast<blasint>(call.n), static_cast<blasint>(call.k), call.alpha,
              a.data(), static_cast<blasint>(call.lda), b.data(), static_cast<blasint>(call.ldb), call.beta, call.c,
              static_cast<blasint>(call.ldc));
}

void Bf16Gemm::run(int threads, const std::vector<Bf16GemmCall>& calls) {
#if MOELAB_HAVE_ONEDNN
  if (path_ == Bf16Path::onednn) {
    std::vector<std::shared_ptr<dnnl::matmul>> primitives;
    std::vector<Bf16GemmCall> widened;
    for (const Bf16GemmCall& call : calls) {
      if (call.k == 0) scale_c(call);
      primitives.push_back(call.k > 0 && call.m > 0 && call.n > 0 ? onednn_->primitive(call) : nullptr);
      if (call.k > 0 && call.m > 0 && call.n > 0 && primitives.back() == nullptr) widened.push_back(call);
    }
    std::vector<Block> blocks;
    for (const Block& block : blocks_of(calls))
      if (primitives[block.call] != nullptr) blocks.push_back(block);
    // Contiguous runs of blocks of about equal arithmetic, one per thread.
    std::vector<double> cumulative{0.0};
    for (const Block& block : blocks)
      cumulative.push_back(cumulative.back() + block.price() * double(calls[block.call].k));
    const int64_t runs = cumulative.back() < kMinThreadedFlops
                             ? 1
                             : std::min<int64_t>(std::max(threads, 1), static_cast<int64_t>(blocks.size()));
    std::vector<size_t> starts{0};
    for (int64_t r = 1; r < runs; ++r)
      starts.push_back(static_cast<size_t>(
          std::lower_bound(cumulative.begin(), cumulative.end(), cumulative.back() * double(r) / double(runs)) -
          cumulative.begin()));
    starts.push_back(blocks.size());
    try {
      run_shares(static_cast<int>(runs), [&](int r) {
        omp_set_num_threads(1);  // this thread's oneDNN calls stay on it (see the header)
        dnnl::stream stream(onednn_->engine);
        for (size_t i = starts[r]; i < starts[r + 1]; ++i)
          onednn_->execute(stream, *primitives[blocks[i].call], calls[blocks[i].call], blocks[i]);
        stream.wait();
      });
    } catch (const dnnl::error& error) {
      throw RuntimeError(fmt::format("cpu kernel: bf16 GEMM: oneDNN failed: {}", error.what()));
    }
    for (const Bf16GemmCall& call : widened) run_widened(call);
    return;
  }
#endif
  (void)threads;
  for (const Bf16GemmCall& call : calls) run_widened(call);
}

}  // namespace moelab::cpu
