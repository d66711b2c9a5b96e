// libFuzzer harness for the safetensors reader: the input is a whole file's bytes, written to a
// scratch file and read with read_safetensors. A UsageError (the reader refusing a malformed
// file, naming it) is correct; any other exception is a finding and aborts. Every tensor that
// comes back must match the header's promise: its bytes are inside the file.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>

#include "moelab/safetensors.hpp"

namespace {

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "fuzz_safetensors: finding: %s\n", what.c_str());
  std::abort();
}

std::filesystem::path scratch_file() {
  const char* shm = "/dev/shm";
  const std::filesystem::path folder =
      std::filesystem::is_directory(shm) ? shm : std::filesystem::temp_directory_path();
  return folder / ("moelab-fuzz-safetensors-" + std::to_string(::getpid()) + ".safetensors");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::filesystem::path file = scratch_file();
  {
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    if (!out) finding("cannot write the scratch file " + file.string());
  }
  try {
    const moelab::SafetensorsFile read = moelab::read_safetensors(file);
    size_t bytes = 0;
    for (const auto& [name, tensor] : read.tensors) bytes += tensor.bytes();
    if (bytes > 2 * size) finding("tensors hold more bytes than the file holds (F16 widens 2x)");
    if (read.names.size() != read.tensors.size()) finding("names and tensors disagree");
  } catch (const moelab::UsageError&) {
  } catch (const std::exception& e) {
    finding(std::string("a non-usage error: ") + e.what());
  }
  return 0;
}
