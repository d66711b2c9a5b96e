// Reading and writing safetensors files (weights, checkpoints, tensor inputs).
//
// Format (https://github.com/huggingface/safetensors, README "Format"): an 8-byte little-endian
// u64 N, then N bytes of UTF-8 JSON
//   {"TENSOR": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {str: str}}
// then the byte buffer; offsets are relative to the start of the buffer, and the tensors must
// cover the buffer exactly (no overlaps, no holes, no trailing bytes).
//
// dtypes: F32, F64, BF16, I32, I64 and U8 map to the DType of the same name. F16 is read and
// widened to f32 (exactly: every half value is a float), so an F16 tensor comes back as f32 and
// is written back as F32. Any other dtype is an error naming the tensor and the dtype.
//
// Every problem with a file (truncated, oversized header, JSON that does not parse or has the
// wrong shape, inconsistent offsets, ...) is a UsageError whose message names the file, the
// tensor when there is one, and what was expected; the reader never reads out of bounds and
// never allocates from a size it has not checked against the file. docs/safetensors.md lists the
// checks.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "moelab/tensor.hpp"

namespace moelab {

struct SafetensorsFile {
  std::filesystem::path path;                   // where it was read from (for messages)
  std::vector<std::string> names;               // in file order: by data offset
  std::map<std::string, Tensor> tensors;        // host tensors, each in its own allocation
  std::map<std::string, std::string> metadata;  // "__metadata__"; empty when absent

  bool contains(const std::string& name) const { return tensors.count(name) != 0; }
  // The tensor called `name`; UsageError naming the file, the missing tensor and close names.
  const Tensor& at(const std::string& name) const;
};

// Reads and validates the whole file; UsageError on any malformed or unreadable file.
SafetensorsFile read_safetensors(const std::filesystem::path& file);

// Writes host tensors: header keys sorted by name ("__metadata__" first, omitted when empty),
// data laid out in the given order, header padded with spaces so the data starts 8-byte aligned
// (as the reference implementation does). The file is written to a temporary file in the same
// folder, synced, then renamed over `file`: a failure leaves no partial file and an existing
// `file` unchanged. UsageError for a bad argument (undefined or device tensor, duplicate or
// reserved name, text that is not UTF-8, folder that cannot be written); RuntimeError for an I/O
// failure while writing.
void write_safetensors(const std::filesystem::path& file, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace moelab
