// metrics.jsonl (training.hpp): one JSON object per line, flushed as written, by rank 0 only.
#include <fmt/format.h>

#include <cmath>
#include <map>

#include "run_files.hpp"
#include "training.hpp"

namespace moelab::training {
namespace {

namespace json = boost::json;

// Summed balancer losses by balancer name over the MoE layers.
json::object balancer_losses(const std::vector<MoeLayer*>& layers) {
  std::map<std::string, double> sums;
  for (MoeLayer* layer : layers)
    for (const auto& [name, value] : layer->stats().balancer_losses) sums[name] += value;
  json::object o;
  for (const auto& [name, value] : sums) o[name] = value;
  return o;
}

}  // namespace

json::value number_or_null(double v) {
  return std::isfinite(v) ? json::value(v) : json::value(nullptr);
}

MetricsLog::MetricsLog(const std::filesystem::path& file, bool writer) : file_(file), writer_(writer) {
  if (!writer_) return;
  out_.open(file, std::ios::binary | std::ios::app);
  if (!out_) throw RuntimeError(fmt::format("cannot write {}", file.string()));
}

void MetricsLog::write(const json::object& line) {
  if (!writer_) return;
  out_ << json::serialize(line) << "\n";
  out_.flush();
}

void MetricsLog::train(int64_t step, double loss, double lr, double grad_norm, double tokens_per_second,
                       Transformer& model, bool mtp) {
  const std::vector<MoeLayer*> layers = model.moe_layers();
  json::object m;
  m["kind"] = "train";
  m["step"] = step;
  m["loss"] = loss;
  m["aux_loss"] = model.aux_loss();
  if (mtp) m["mtp_loss"] = model.mtp_loss();
  m["balancer_losses"] = balancer_losses(layers);
  m["lr"] = lr;
  m["grad_norm"] = grad_norm;
  m["tokens_per_second"] = tokens_per_second;
  json::array out;
  for (MoeLayer* layer : layers) {
    json::object o = layer_json(layer->stats(), layer->dead_experts().dead());
    o["layer"] = layer->spec().layer_index;
    out.push_back(std::move(o));
  }
  m["layers"] = std::move(out);
  write(m);
}

void MetricsLog::eval(int64_t step, const Evaluation& e, double optimal_loss, double entropy_rate, Transformer& model) {
  const std::vector<MoeLayer*> layers = model.moe_layers();
  json::object m;
  m["kind"] = "eval";
  m["step"] = step;
  m["loss"] = e.loss;
  m["optimal_loss"] = number_or_null(optimal_loss);
  m["entropy_rate"] = number_or_null(entropy_rate);
  json::array out;
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerTotals& t = e.layers[l];
    json::object o;
    o["layer"] = layers[l]->spec().layer_index;
    o["tokens_per_expert"] = json::array(t.tokens_per_expert.begin(), t.tokens_per_expert.end());
    o["routed_per_expert"] = json::array(t.routed_per_expert.begin(), t.routed_per_expert.end());
    o["drop_fraction"] = t.drop_fraction();
    o["max_violation"] = t.mean_max_violation();
    o["routed_max_violation"] = t.mean_routed_max_violation();
    o["router_entropy"] = t.mean_router_entropy();
    const std::vector<int64_t> dead = layers[l]->dead_experts().dead();
    o["dead_experts"] = json::array(dead.begin(), dead.end());
    out.push_back(std::move(o));
  }
  m["layers"] = std::move(out);
  write(m);
}

void MetricsLog::message(const char* kind, int64_t step, const std::string& text) {
  json::object m;
  m["kind"] = kind;
  m["step"] = step;
  m["message"] = text;
  write(m);
}

void MetricsLog::close() {
  if (!writer_) return;
  out_.close();
  if (!out_) throw RuntimeError(fmt::format("cannot write {}", file_.string()));
}

void truncate_metrics(const std::filesystem::path& file, int64_t step) {
  std::ifstream in(file, std::ios::binary);
  std::string kept, line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    boost::system::error_code ec;
    const json::value v = json::parse(line, ec);
    if (ec || !v.is_object() || !v.as_object().contains("step")) continue;  // a torn last line
    if (v.as_object().at("step").to_number<int64_t>() <= step) kept += line + "\n";
  }
  in.close();
  write_text(file, kept);
}

}  // namespace moelab::training
