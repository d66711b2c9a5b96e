// safetensors: round trips, byte-exact agreement with files built by hand from the format's
// description, and every malformed-file check (each must be a UsageError naming the file and the
// problem, never a crash).
#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>

#include "moelab/safetensors.hpp"
#include "test_files.hpp"

namespace fs = std::filesystem;
using namespace moelab;

using test::ScratchFolder;
using test::usage_error;
using test::write_bytes;

namespace {

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream content;
  content << in.rdbuf();
  return content.str();
}

std::string le64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[static_cast<size_t>(i)] = static_cast<char>((value >> (8 * i)) & 0xff);
  return bytes;
}

// A file with exactly this header text (no padding) and this data buffer.
std::string safetensors_bytes(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

// Writes `bytes` to <scratch>/weights.safetensors and returns the message reading it gives;
// checks the message names the file.
std::string read_error(const ScratchFolder& scratch, const std::string& bytes) {
  const fs::path file = scratch / "weights.safetensors";
  write_bytes(file, bytes);
  const std::string message = usage_error([&] { read_safetensors(file); });
  CHECK_MESSAGE(message.find(file.string()) != std::string::npos, message);
  return message;
}

#define CHECK_CONTAINS(text, part) CHECK_MESSAGE((text).find(part) != std::string::npos, (text))

template <class T>
Tensor filled(Shape shape, std::function<T(int64_t)> value) {
  Tensor t = host_tensor<T>(std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.data<T>()[i] = value(i);
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.bytes()) == 0;
}

// One f32 tensor entry.
std::string entry(const std::string& name, const std::string& shape, uint64_t begin, uint64_t end,
                  const std::string& dtype = "F32") {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

}  // namespace

TEST_CASE("every dtype, empty tensors and metadata survive a round trip") {
  ScratchFolder scratch("safetensors");
  Tensor bf16 = host_tensor(DType::bf16, {2, 3});
  const uint16_t bf16_bits[] = {0x3f80, 0xbf80, 0x0000, 0x8000, 0x7f80, 0x4049};  // 1, -1, 0, -0, inf, ~3.14
  std::memcpy(bf16.raw(), bf16_bits, sizeof bf16_bits);
  const std::vector<std::pair<std::string, Tensor>> tensors = {
      {"layers.0.w1", filled<float>({4, 8}, [](int64_t i) { return 0.25f * static_cast<float>(i) - 3.0f; })},
      {"f64", filled<double>({3}, [](int64_t i) { return std::ldexp(1.0, -1000) * static_cast<double>(i + 1); })},
      {"bf16", bf16},
      {"i32", filled<int32_t>({2, 2}, [](int64_t i) { return static_cast<int32_t>(i) - 2147483647; })},
      {"i64", filled<int64_t>({2}, [](int64_t i) { return std::numeric_limits<int64_t>::min() + i; })},
      {"u8", filled<uint8_t>({5}, [](int64_t i) { return static_cast<uint8_t>(250 + i); })},
      {"empty", host_tensor<float>({0})},
      {"empty_rows", host_tensor<int64_t>({3, 0})},
      {"scalar", filled<float>({}, [](int64_t) { return 42.0f; })},
  };
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "ünïcode \"quoted\"\n"}};
  const fs::path file = scratch / "weights.safetensors";
  write_safetensors(file, tensors, metadata);

  const SafetensorsFile read = read_safetensors(file);
  CHECK(read.path == file);
  CHECK(read.metadata == metadata);
  REQUIRE(read.names.size() == tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    // Data is laid out in the given order, so file order is the given order.
    CHECK(read.names[i] == tensors[i].first);
    CHECK_MESSAGE(same_bytes(read.at(tensors[i].first), tensors[i].second), tensors[i].first);
    CHECK(read.at(tensors[i].first).device() == DeviceKind::cpu);
  }
  // The data after the header starts 8-byte aligned.
  const std::string bytes = read_bytes(file);
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, bytes.data(), 8);
  CHECK(header_bytes % 8 == 0);

  // Writing what was read reproduces the file (writing is deterministic).
  std::vector<std::pair<std::string, Tensor>> again;
  for (const auto& name : read.names) again.emplace_back(name, read.at(name));
  write_safetensors(scratch / "again.safetensors", again, read.metadata);
  CHECK(read_bytes(scratch / "again.safetensors") == bytes);
}

TEST_CASE("a file with no tensors round trips") {
  ScratchFolder scratch("safetensors");
  write_safetensors(scratch / "none.safetensors", {});
  CHECK(read_bytes(scratch / "none.safetensors") == le64(8) + "{}      ");
  const SafetensorsFile read = read_safetensors(scratch / "none.safetensors");
  CHECK(read.names.empty());
  CHECK(read.metadata.empty());
}

TEST_CASE("written bytes match a file built by hand from the format description") {
  ScratchFolder scratch("safetensors");
  // Header keys sorted by name with "__metadata__" first, compact JSON, fields in the order
  // dtype, shape, data_offsets, padded with spaces to a multiple of 8 (138 -> 144 bytes).
  // Data in the given order: b (I32 [2]) at [0, 8), then a (U8 [3]) at [8, 11).
  const std::string header = R"({"__metadata__":{"format":"pt"},"a":{"dtype":"U8","shape":[3],"data_offsets":[8,11]},)"
                             R"("b":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})"
                             "      ";
  REQUIRE(header.size() == 144);
  const std::string expected =
      std::string("\x90\0\0\0\0\0\0\0", 8) + header + std::string("\x01\0\0\0\xfe\xff\xff\xff", 8) + "\x07\x08\x09";

  Tensor b = host_tensor<int32_t>({2});
  b.data<int32_t>()[0] = 1;
  b.data<int32_t>()[1] = -2;
  Tensor a = host_tensor<uint8_t>({3});
  for (int i = 0; i < 3; ++i) a.data<uint8_t>()[i] = static_cast<uint8_t>(7 + i);
  const fs::path file = scratch / "hand.safetensors";
  write_safetensors(file, {{"b", b}, {"a", a}}, {{"format", "pt"}});
  CHECK(read_bytes(file) == expected);

  // And the hand-built bytes read back as the tensors, in offset order.
  write_bytes(scratch / "expected.safetensors", expected);
  const SafetensorsFile read = read_safetensors(scratch / "expected.safetensors");
  CHECK(read.names == std::vector<std::string>{"b", "a"});
  CHECK(same_bytes(read.at("a"), a));
  CHECK(same_bytes(read.at("b"), b));
  CHECK(read.metadata == std::map<std::string, std::string>{{"format", "pt"}});
}

TEST_CASE("reads the reference implementation's documented example file") {
  // From safetensors/src/tensor.rs (SafeTensors::deserialize docs): N = 60 ('<'), no padding.
  ScratchFolder scratch("safetensors");
  const std::string bytes = std::string("<\0\0\0\0\0\0\0", 8) +
                            R"({"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}})" + std::string(16, '\0');
  write_bytes(scratch / "reference.safetensors", bytes);
  const SafetensorsFile read = read_safetensors(scratch / "reference.safetensors");
  REQUIRE(read.names == std::vector<std::string>{"test"});
  CHECK(read.at("test").dtype() == DType::i32);
  CHECK(read.at("test").shape() == Shape{2, 2});
  for (int i = 0; i < 4; ++i) CHECK(read.at("test").data<int32_t>()[i] == 0);
}

TEST_CASE("F16 is widened to f32 exactly") {
  ScratchFolder scratch("safetensors");
  // 1, -2, 65504 (largest half), 2^-24 (smallest subnormal), 2^-14 (smallest normal),
  // 0x03ff (largest subnormal), -0, +inf, -inf, NaN
  const uint16_t halves[] = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x0400, 0x03ff, 0x8000, 0x7c00, 0xfc00, 0x7e00};
  const float expected[] = {1.0f,
                            -2.0f,
                            65504.0f,
                            std::ldexp(1.0f, -24),
                            std::ldexp(1.0f, -14),
                            1023.0f * std::ldexp(1.0f, -24),
                            -0.0f,
                            INFINITY,
                            -INFINITY,
                            NAN};
  std::string data(reinterpret_cast<const char*>(halves), sizeof halves);
  write_bytes(scratch / "half.safetensors", safetensors_bytes("{" + entry("h", "[10]", 0, 20, "F16") + "}", data));
  const SafetensorsFile read = read_safetensors(scratch / "half.safetensors");
  const Tensor& h = read.at("h");
  REQUIRE(h.dtype() == DType::f32);
  REQUIRE(h.shape() == Shape{10});
  for (int i = 0; i < 10; ++i) {
    const float got = h.data<float>()[i];
    if (std::isnan(expected[i])) {
      CHECK(std::isnan(got));
    } else {
      CHECK(got == expected[i]);
      CHECK(std::signbit(got) == std::signbit(expected[i]));
    }
  }
}

TEST_CASE("tensors come back in offset order whatever the header order") {
  ScratchFolder scratch("safetensors");
  const std::string header = "{" + entry("z_last", "[1]", 8, 12) + "," + entry("a_empty", "[0]", 4, 4) + "," +
                             entry("m_first", "[1]", 0, 4) + "," + entry("b_mid", "[1]", 4, 8) + "}";
  write_bytes(scratch / "order.safetensors", safetensors_bytes(header, std::string(12, '\0')));
  const SafetensorsFile read = read_safetensors(scratch / "order.safetensors");
  CHECK(read.names == std::vector<std::string>{"m_first", "a_empty", "b_mid", "z_last"});
}

TEST_CASE("at() names the file, the missing tensor and close names") {
  ScratchFolder scratch("safetensors");
  const fs::path file = scratch / "weights.safetensors";
  write_safetensors(file, {{"layers.0.w1", host_tensor<float>({2})},
                           {"layers.0.w2", host_tensor<float>({2})},
                           {"router.weight", host_tensor<float>({2})}});
  const SafetensorsFile read = read_safetensors(file);
  std::string message = usage_error([&] { read.at("layers.0.w3"); });
  CHECK_CONTAINS(message, file.string());
  CHECK_CONTAINS(message, "no tensor 'layers.0.w3'");
  CHECK_CONTAINS(message, "'layers.0.w1'");
  CHECK_CONTAINS(message, "'layers.0.w2'");
  message = usage_error([&] { read.at("completely_different_name"); });
  CHECK_CONTAINS(message, "it holds 3 tensors");
  CHECK_CONTAINS(message, "'router.weight'");
}

TEST_CASE("files that cannot be opened or are too short") {
  ScratchFolder scratch("safetensors");
  std::string message = usage_error([&] { read_safetensors(scratch / "missing.safetensors"); });
  CHECK_CONTAINS(message, "missing.safetensors");
  CHECK_CONTAINS(message, "cannot open");
  message = usage_error([&] { read_safetensors(scratch.path()); });
  CHECK_CONTAINS(message, "not a regular file");

  CHECK_CONTAINS(read_error(scratch, ""), "file is 0 bytes, too short for the 8-byte header length");
  CHECK_CONTAINS(read_error(scratch, std::string("\x05\0\0\0", 4)), "file is 4 bytes, too short");
}

TEST_CASE("header lengths larger than the file or absurdly large") {
  ScratchFolder scratch("safetensors");
  CHECK_CONTAINS(read_error(scratch, le64(100'000'001) + "{}"),
                 "header length 100000001 is over the 100000000-byte limit");
  CHECK_CONTAINS(read_error(scratch, le64(~uint64_t{0}) + "{}"), "is over the 100000000-byte limit");
  CHECK_CONTAINS(read_error(scratch, le64(3) + "{}"), "header length 3 is more than the 2 bytes that follow it");
}

TEST_CASE("headers that are not valid JSON, not UTF-8, or not an object") {
  ScratchFolder scratch("safetensors");
  // The parser stops at the '}' where a value was expected: byte 6 of the header.
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes(R"({"a": })", "")),
                 "header is not valid JSON at line 1, column 7 (file byte 14)");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes("{\n  \"a\": {},\n  oops\n}", "")),
                 "header is not valid JSON at line 3, column 3");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes("", "")), "header is not valid JSON at line 1, column 1");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes(R"({"a":{}} extra)", "")), "header is not valid JSON");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes("{\"a\xff\":{}}", "")),
                 "header is not valid UTF-8 at line 1, column 4");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes("[1, 2]", "")), "header must be a JSON object");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes("[1, 2]", "")), "got an array");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes("\"text\"", "")), "got the string \"text\"");
}

TEST_CASE("tensor entries with missing keys, unknown keys or wrong JSON types") {
  ScratchFolder scratch("safetensors");
  auto with_entry = [&](const std::string& body, const std::string& data = std::string(16, '\0')) {
    return read_error(scratch, safetensors_bytes("{\"w1\":" + body + "}", data));
  };
  std::string message = with_entry("[]");
  CHECK_CONTAINS(message, "tensor 'w1': expected an entry {\"dtype\"");
  CHECK_CONTAINS(message, "got an array");
  CHECK_CONTAINS(with_entry(R"({"shape":[4],"data_offsets":[0,16]})"), "tensor 'w1': entry has no 'dtype'");
  CHECK_CONTAINS(with_entry(R"({"dtype":"F32","data_offsets":[0,16]})"), "tensor 'w1': entry has no 'shape'");
  CHECK_CONTAINS(with_entry(R"({"dtype":"F32","shape":[4]})"), "tensor 'w1': entry has no 'data_offsets'");
  CHECK_CONTAINS(with_entry(R"({"dtype":"F32","shape":[4],"offsets":[0,16]})"),
                 "tensor 'w1': unknown key 'offsets' in its entry (expected dtype, shape, data_offsets)");
  CHECK_CONTAINS(with_entry(R"({"dtype":4,"shape":[4],"data_offsets":[0,16]})"),
                 "tensor 'w1': dtype must be a string such as \"F32\", got the number 4");
  message = with_entry(R"({"dtype":"I16","shape":[8],"data_offsets":[0,16]})");
  CHECK_CONTAINS(message, "tensor 'w1': dtype 'I16' is not supported");
  CHECK_CONTAINS(message, "F32, F64, BF16, F16 (read as f32), I32, I64, U8");
  CHECK_CONTAINS(with_entry(R"({"dtype":"F32","shape":"4","data_offsets":[0,16]})"),
                 "tensor 'w1': shape must be an array of sizes, got the string \"4\"");
  CHECK_CONTAINS(with_entry(R"({"dtype":"F32","shape":[2,-2],"data_offsets":[0,16]})"),
                 "tensor 'w1': shape[1] must be an integer in [0, 2^63), got the number -2");
  CHECK_CONTAINS(with_entry(R"({"dtype":"F32","shape":[4.0],"data_offsets":[0,16]})"),
                 "tensor 'w1': shape[0] must be an integer in [0, 2^63), got the floating-point number 4");
  CHECK_CONTAINS(with_entry(R"({"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,16]})"),
                 "tensor 'w1': shape[0] must be an integer in [0, 2^63)");
  CHECK_CONTAINS(with_entry(R"({"dtype":"F32","shape":[4],"data_offsets":[0]})"),
                 "tensor 'w1': data_offsets must be [begin, end], got an array of length 1");
  CHECK_CONTAINS(with_entry(R"({"dtype":"F32","shape":[4],"data_offsets":{"begin":0}})"),
                 "tensor 'w1': data_offsets must be [begin, end], got an object");
  CHECK_CONTAINS(with_entry(R"({"dtype":"F32","shape":[4],"data_offsets":[0,null]})"),
                 "tensor 'w1': data_offsets[1] must be an integer in [0, 2^63), got null");
}

TEST_CASE("shapes whose size overflows") {
  ScratchFolder scratch("safetensors");
  auto with_shape = [&](const std::string& shape) {
    return read_error(scratch, safetensors_bytes("{" + entry("w1", shape, 0, 16) + "}", std::string(16, '\0')));
  };
  CHECK_CONTAINS(with_shape("[4294967296,4294967296]"),
                 "tensor 'w1': shape [4294967296,4294967296] has more elements than a signed 64-bit count holds");
  // A zero dimension does not excuse the others: Tensor::numel multiplies them in order.
  CHECK_CONTAINS(with_shape("[4294967296,4294967296,0]"), "has more elements than a signed 64-bit count holds");
  // 2^62 elements fit, but not 2^64 bytes of f32.
  CHECK_CONTAINS(with_shape("[4611686018427387904]"),
                 "tensor 'w1': f32[4611686018427387904] needs more bytes than fit in 64 bits");
}

TEST_CASE("offsets that disagree with the shape or leave the buffer") {
  ScratchFolder scratch("safetensors");
  // The example from the brief, word for word.
  const fs::path file = scratch / "weights.safetensors";
  std::string message =
      read_error(scratch, safetensors_bytes("{" + entry("w1", "[4,8]", 0, 96) + "}", std::string(96, '\0')));
  CHECK_CONTAINS(message, file.string() + ": tensor 'w1': data_offsets [0, 96] hold 96 bytes but f32[4, 8] needs 128");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes("{" + entry("w1", "[2]", 8, 4) + "}", std::string(8, '\0'))),
                 "tensor 'w1': data_offsets [8, 4] begin after they end");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes("{" + entry("w1", "[4]", 0, 16) + "}", std::string(8, '\0'))),
                 "tensor 'w1': data_offsets [0, 16] reach past the end of the data buffer (8 bytes)");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes(
                                         "{" + entry("w1", "[1]", 18446744073709551611u, 18446744073709551615u) + "}",
                                         std::string(8, '\0'))),
                 "tensor 'w1': data_offsets[0] must be an integer in [0, 2^63)");
  CHECK_CONTAINS(
      read_error(scratch, safetensors_bytes("{" + entry("w1", "[2]", 4, 12, "BF16") + "}", std::string(12, '\0'))),
      "tensor 'w1': data_offsets [4, 12] hold 8 bytes but bf16[2] needs 4");
  CHECK_CONTAINS(
      read_error(scratch, safetensors_bytes("{" + entry("w1", "[2]", 0, 8, "F16") + "}", std::string(8, '\0'))),
      "hold 8 bytes but f16[2] needs 4");
}

TEST_CASE("overlapping tensors, holes and trailing bytes") {
  ScratchFolder scratch("safetensors");
  CHECK_CONTAINS(
      read_error(scratch, safetensors_bytes("{" + entry("a", "[2]", 0, 8) + "," + entry("b", "[2]", 4, 12) + "}",
                                            std::string(12, '\0'))),
      "tensor 'b': data_offsets [4, 12] overlap tensor 'a' at [0, 8]");
  // Two tensors on the very same bytes.
  CHECK_CONTAINS(
      read_error(scratch, safetensors_bytes("{" + entry("a", "[2]", 0, 8) + "," + entry("b", "[2]", 0, 8) + "}",
                                            std::string(8, '\0'))),
      "tensor 'b': data_offsets [0, 8] overlap tensor 'a' at [0, 8]");
  CHECK_CONTAINS(
      read_error(scratch, safetensors_bytes("{" + entry("a", "[1]", 0, 4) + "," + entry("b", "[1]", 8, 12) + "}",
                                            std::string(12, '\0'))),
      "bytes [4, 8) of the data buffer belong to no tensor (between 'a' and 'b'); the format allows no holes");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes("{" + entry("a", "[1]", 4, 8) + "}", std::string(8, '\0'))),
                 "bytes [0, 4) of the data buffer belong to no tensor (before 'a')");
  CHECK_CONTAINS(
      read_error(scratch, safetensors_bytes("{" + entry("a", "[1]", 0, 4) + "}", std::string(8, '\0'))),
      "the data buffer has 8 bytes but the tensors cover only the first 4: 4 trailing bytes belong to no tensor");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes("{}", std::string(3, '\0'))),
                 "3 trailing bytes belong to no tensor");
}

TEST_CASE("duplicate names and keys") {
  ScratchFolder scratch("safetensors");
  CHECK_CONTAINS(
      read_error(scratch, safetensors_bytes("{" + entry("a", "[1]", 0, 4) + "," + entry("a", "[1]", 4, 8) + "}",
                                            std::string(8, '\0'))),
      "tensor 'a' appears twice in the header, the second time at line 1, column 57 (file byte 64)");
  CHECK_CONTAINS(
      read_error(scratch, safetensors_bytes(R"({"a":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}})",
                                            std::string(4, '\0'))),
      "key 'dtype' appears twice in the entry of 'a'");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes(R"({"__metadata__":{},"__metadata__":{}})", "")),
                 "tensor '__metadata__' appears twice");
}

TEST_CASE("malformed __metadata__") {
  ScratchFolder scratch("safetensors");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes(R"({"__metadata__":["a"]})", "")),
                 "'__metadata__' must be an object of strings {\"key\": \"value\"}, got an array");
  CHECK_CONTAINS(read_error(scratch, safetensors_bytes(R"({"__metadata__":{"epochs":3}})", "")),
                 "'__metadata__' entry 'epochs' must be a string, got the number 3");
}

TEST_CASE("truncated or corrupted files are errors, never crashes") {
  ScratchFolder scratch("safetensors");
  const fs::path good = scratch / "good.safetensors";
  write_safetensors(good,
                    {{"w", filled<float>({3, 2}, [](int64_t i) { return static_cast<float>(i); })},
                     {"b", filled<int64_t>({2}, [](int64_t i) { return i; })},
                     {"e", host_tensor<uint8_t>({0})}},
                    {{"k", "v"}});
  const std::string bytes = read_bytes(good);
  const fs::path bad = scratch / "bad.safetensors";

  // Every proper prefix is rejected as a UsageError.
  for (size_t length = 0; length < bytes.size(); ++length) {
    write_bytes(bad, bytes.substr(0, length));
    CAPTURE(length);
    CHECK_THROWS_AS(read_safetensors(bad), UsageError);
  }
  // Any single corrupted byte either still reads or is a UsageError (anything else escapes and
  // fails the test).
  const char replacements[] = {'\0', '\xff', '"', '{', '}', '[', ',', '9', '-', ' ', '\x80'};
  size_t rejected = 0, accepted = 0;
  for (size_t position = 0; position < bytes.size(); ++position) {
    for (char replacement : replacements) {
      std::string corrupted = bytes;
      corrupted[position] = replacement;
      write_bytes(bad, corrupted);
      CAPTURE(position);
      try {
        read_safetensors(bad);
        ++accepted;
      } catch (const UsageError&) {
        ++rejected;
      }
    }
  }
  CHECK(rejected > 0);
  CHECK(accepted > 0);  // the data bytes can take any value
}

TEST_CASE("a failed write leaves no file and an existing target unchanged") {
  ScratchFolder scratch("safetensors");
  const fs::path file = scratch / "weights.safetensors";
  const Tensor good = filled<float>({2}, [](int64_t i) { return static_cast<float>(i); });
  write_safetensors(file, {{"w", good}});
  const std::string before = read_bytes(file);
  auto check_untouched = [&] {
    CHECK(read_bytes(file) == before);
    CHECK(scratch.entries() == std::vector<std::string>{"weights.safetensors"});
  };

  std::string message = usage_error([&] {
    write_safetensors(scratch / "no_such_folder" / "w.safetensors", {{"w", good}});
  });
  CHECK_CONTAINS(message, "no_such_folder");
  CHECK_CONTAINS(message, "No such file or directory");
  CHECK_FALSE(fs::exists(scratch / "no_such_folder"));
  check_untouched();

  // DType has a fixed underlying type, so any uint8_t is a value of it; 200 names no dtype.
  Tensor unknown_dtype(good.buffer(), static_cast<DType>(200), {2});
  message = usage_error([&] { write_safetensors(file, {{"w", good}, {"strange", unknown_dtype}}); });
  CHECK_CONTAINS(message, file.string() + ": tensor 'strange': dtype #200 has no safetensors equivalent");
  check_untouched();

  // A tensor whose buffer claims to be device memory (the bytes are host memory, never read).
  auto device_buffer = std::make_shared<Buffer>(*good.buffer());
  device_buffer->device = DeviceKind::cuda;
  message = usage_error([&] { write_safetensors(file, {{"on_gpu", Tensor(device_buffer, DType::f32, {2})}}); });
  CHECK_CONTAINS(message, "tensor 'on_gpu': is on cuda; copy it to the host first");
  check_untouched();

  message = usage_error([&] { write_safetensors(file, {{"w", Tensor()}}); });
  CHECK_CONTAINS(message, "tensor 'w': is undefined");
  check_untouched();

  message = usage_error([&] { write_safetensors(file, {{"w", good}, {"w", good}}); });
  CHECK_CONTAINS(message, "tensor 'w': given twice");
  check_untouched();

  message = usage_error([&] { write_safetensors(file, {{"__metadata__", good}}); });
  CHECK_CONTAINS(message, "a tensor cannot be called '__metadata__'");
  check_untouched();

  message = usage_error([&] { write_safetensors(file, {{"bad\xff", good}}); });
  CHECK_CONTAINS(message, "tensor name 'bad\\xff' is not valid UTF-8 (byte 3)");
  message = usage_error([&] { write_safetensors(file, {{"w", good}}, {{"key", "\xc0\xaf"}}); });  // overlong '/'
  CHECK_CONTAINS(message, "metadata value");
  check_untouched();

  // The target is a folder: everything is written, the rename fails, the temporary file goes.
  fs::create_directory(scratch / "folder.safetensors");
  message = usage_error([&] { write_safetensors(scratch / "folder.safetensors", {{"w", good}}); });
  CHECK_CONTAINS(message, "folder.safetensors");
  CHECK_CONTAINS(message, "cannot replace it");
  CHECK(scratch.entries() == std::vector<std::string>{"folder.safetensors", "weights.safetensors"});
  CHECK(fs::is_empty(scratch / "folder.safetensors"));
}

TEST_CASE("writing replaces an existing file whole") {
  ScratchFolder scratch("safetensors");
  const fs::path file = scratch / "weights.safetensors";
  write_safetensors(file, {{"big", host_tensor<double>({64})}});
  write_safetensors(file, {{"small", filled<int32_t>({1}, [](int64_t) { return 7; })}});
  const SafetensorsFile read = read_safetensors(file);
  CHECK(read.names == std::vector<std::string>{"small"});
  CHECK(read.at("small").data<int32_t>()[0] == 7);
  CHECK(scratch.entries() == std::vector<std::string>{"weights.safetensors"});
}
