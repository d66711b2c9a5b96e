// SHA-256 (FIPS 180-4), for provenance (which plugin file served a run) and checkpoint integrity.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>

namespace moelab {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  std::string hex();  // finishes: 64 lowercase hex digits

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buffer_[64];
  size_t buffered_ = 0;
  uint64_t length_ = 0;
};

std::string sha256_hex(const void* data, size_t size);
// Of a file's bytes; throws RuntimeError naming the file when it cannot be read.
std::string file_sha256(const std::filesystem::path& file);

}  // namespace moelab
