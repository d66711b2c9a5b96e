// What the two trainers (experiment.cpp's layer task, lm_trainer.cpp's language model) share when
// they write a run folder.
#pragma once

#include <boost/json.hpp>
#include <filesystem>
#include <string>
#include <vector>

#include "moelab/experiment.hpp"
#include "moelab/moe_layer.hpp"

namespace moelab {

// One MoE layer's figures for metrics.jsonl: load, drops, f_i, P_i, MaxVio, entropy, dead experts.
boost::json::object layer_json(const LayerStats& stats, const std::vector<int64_t>& dead);
// "`switch_aux`, `z_loss`" (or "none"): the balancers of a layer, for reports.
std::string balancer_list(const MoeConfig& moe);
// The report's two table rows of dropped assignments, in training and in evaluation.
std::string drop_rows(const MoeConfig& moe, const RunResult& result);
// "#####....." of `width` characters, `fraction` of them filled.
std::string bar(double fraction, int width);
// Writes `text` to `file`, replacing it; RuntimeError when it cannot.
void write_text(const std::filesystem::path& file, const std::string& text);
// plugins.json: which file served each plugin of the recipe (its key, kind, name, version, ABI,
// path, size and SHA-256), so a run can be traced to the exact code that made it.
void write_plugin_provenance(const std::filesystem::path& run_dir, const RunConfig& config,
                             const PluginRegistry& registry);

}  // namespace moelab
