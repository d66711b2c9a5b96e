// safetensors reader and writer. Format: https://github.com/huggingface/safetensors, README
// "Format": 8-byte little-endian u64 N, N bytes of UTF-8 JSON header, then the byte buffer the
// header's data_offsets index into. The checks follow the reference implementation
// (safetensors/src/tensor.rs: header limit 100 MB, offsets sorted and contiguous, the tensors
// cover the buffer exactly) and add the ones it leaves to serde (duplicate keys, unknown keys).
#include "moelab/safetensors.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <boost/json/basic_parser_impl.hpp>
#include <boost/json/parser.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>
#include <cerrno>
#include <cmath>
#include <limits>
#include <optional>
#include <set>
#include <string_view>
#include <system_error>

#include "moelab/params.hpp"  // nearest_name
#include "utf8.hpp"

namespace moelab {
namespace {

// Tensor bytes are copied between file and memory as they are; the format is little-endian.
static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; a big-endian host would need byte swapping");

namespace json = boost::json;

constexpr uint64_t max_header_bytes = 100'000'000;  // the reference's MAX_HEADER_SIZE
constexpr std::string_view metadata_key = "__metadata__";
constexpr size_t header_alignment = 8;

// ---------------------------------------------------------------------------------------------
// Messages

// A name or value from the file as it can be shown in one line of a message: control bytes (and
// every non-ASCII byte when the text is not UTF-8) escaped, very long strings cut (a hostile file
// may carry a megabyte-long name).
std::string printable(std::string_view text) {
  constexpr size_t max_shown = 200;
  const bool utf8 = !invalid_utf8_at(text);
  std::string out;
  for (size_t i = 0; i < text.size() && i < max_shown; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == 0x7f || (c >= 0x80 && !utf8))
      out += fmt::format("\\x{:02x}", c);
    else
      out += static_cast<char>(c);
  }
  if (text.size() > max_shown) out += fmt::format("... ({} bytes)", text.size());
  return out;
}

template <class... Args>
[[noreturn]] void fail(const std::filesystem::path& file, fmt::format_string<Args...> format, Args&&... args) {
  throw UsageError(fmt::format("{}: {}", file.string(), fmt::format(format, std::forward<Args>(args)...)));
}

template <class... Args>
[[noreturn]] void fail_tensor(const std::filesystem::path& file, std::string_view name,
                              fmt::format_string<Args...> format, Args&&... args) {
  throw UsageError(fmt::format("{}: tensor '{}': {}", file.string(), printable(name),
                               fmt::format(format, std::forward<Args>(args)...)));
}

std::string errno_text(int error) {
  return std::generic_category().message(error);
}

// "an array", "the string \"x\"", "the number -3": what a JSON value is, for "expected X, got Y".
std::string describe_json(const json::value& value) {
  switch (value.kind()) {
    case json::kind::object:
      return "an object";
    case json::kind::array:
      return "an array";
    case json::kind::string:
      return "the string \"" + printable(value.get_string()) + "\"";
    case json::kind::int64:
    case json::kind::uint64:
      return "the number " + json::serialize(value);
    case json::kind::double_:
      return fmt::format("the floating-point number {}", value.get_double());
    case json::kind::bool_:
      return value.get_bool() ? "true" : "false";
    case json::kind::null:
      return "null";
  }
  return "an unknown JSON value";
}

// "line 1, column 57 (file byte 64)" for byte `offset` of the header text.
std::string header_position(std::string_view header, size_t offset) {
  offset = std::min(offset, header.size());
  size_t line = 1, column = 1;
  for (size_t i = 0; i < offset; ++i) {
    if (header[i] == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
  }
  return fmt::format("line {}, column {} (file byte {})", line, column, offset + 8);
}

// ---------------------------------------------------------------------------------------------
// dtypes

struct FileDType {
  std::string_view name;  // as in the header
  DType dtype;            // what it is held as in memory
  size_t file_bytes;      // bytes per element in the file
  bool half;              // F16: widened to f32 on reading
};

constexpr FileDType file_dtypes[] = {
    {"F32", DType::f32, 4, false}, {"F64", DType::f64, 8, false}, {"BF16", DType::bf16, 2, false},
    {"F16", DType::f32, 2, true},  {"I32", DType::i32, 4, false}, {"I64", DType::i64, 8, false},
    {"U8", DType::u8, 1, false},
};
constexpr std::string_view supported_dtypes = "F32, F64, BF16, F16 (read as f32), I32, I64, U8";

const FileDType* file_dtype_named(std::string_view name) {
  for (const auto& d : file_dtypes)
    if (d.name == name) return &d;
  return nullptr;
}

// "f32", "bf16", "f16": the file's dtype spelled like moelab's dtype_name.
std::string lower_case(std::string_view name) {
  std::string lower(name);
  for (char& c : lower)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return lower;
}

// The header name a tensor of `dtype` is written as; nullptr for a value outside the enum.
const char* file_dtype_name(DType dtype) {
  for (const auto& d : file_dtypes)
    if (d.dtype == dtype && !d.half) return d.name.data();
  return nullptr;
}

// Half to single precision, exactly (every half is a float). Bits: sign 1, exponent 5 (bias 15),
// mantissa 10.
float half_to_float(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fu;
  const uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent != 0)                                                                         // normal: rebias 15 -> 127
    return std::bit_cast<float>(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
  // zero or subnormal: mantissa * 2^-24, a normal float
  const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  return sign ? -magnitude : magnitude;
}

// ---------------------------------------------------------------------------------------------
// POSIX file handling (pread for bounded reads, fsync + rename for atomic writes)

class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  // Closes now, reporting the error (a failed close can mean lost writes on some filesystems).
  int close() {
    const int result = ::close(fd_);
    fd_ = -1;
    return result;
  }

 private:
  int fd_;
};

// Reads `size` bytes at `offset`. Returns how many were read: fewer only when the file ends.
size_t read_at(const std::filesystem::path& file, int fd, void* destination, size_t size, uint64_t offset) {
  size_t done = 0;
  while (done < size) {
    const ssize_t n =
        ::pread(fd, static_cast<char*>(destination) + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(file, "read error at byte {}: {}", offset + done, errno_text(errno));
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

void write_all(const std::filesystem::path& file, int fd, const void* source, size_t size) {
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, static_cast<const char*>(source) + done, size - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw RuntimeError(fmt::format("{}: write failed: {}", file.string(), errno_text(errno)));
    }
    done += static_cast<size_t>(n);
  }
}

// ---------------------------------------------------------------------------------------------
// Header parsing

// A basic_parser handler that only looks for a key repeated within one object: json::parser
// keeps the last of duplicate keys silently, and a repeated tensor name would hide a tensor.
class DuplicateKeyFinder {
 public:
  static constexpr size_t max_array_size = static_cast<size_t>(-1);
  static constexpr size_t max_object_size = static_cast<size_t>(-1);
  static constexpr size_t max_string_size = static_cast<size_t>(-1);
  static constexpr size_t max_key_size = static_cast<size_t>(-1);

  std::string duplicate;      // the repeated key; empty when none
  std::string top_level_key;  // the tensor (or "__metadata__") whose entry holds it, at depth > 1
  size_t depth = 0;           // 1: top-level object

  bool on_document_begin(json::error_code&) { return true; }
  bool on_document_end(json::error_code&) { return true; }
  bool on_array_begin(json::error_code&) { return true; }
  bool on_array_end(size_t, json::error_code&) { return true; }
  bool on_object_begin(json::error_code&) {
    keys_.emplace_back();
    return true;
  }
  bool on_object_end(size_t, json::error_code&) {
    keys_.pop_back();
    return true;
  }
  bool on_string_part(json::string_view, size_t, json::error_code&) { return true; }
  bool on_string(json::string_view, size_t, json::error_code&) { return true; }
  bool on_key_part(json::string_view part, size_t, json::error_code&) {
    key_.append(part.data(), part.size());
    return true;
  }
  bool on_key(json::string_view last, size_t, json::error_code& ec) {
    key_.append(last.data(), last.size());
    if (keys_.size() == 1) top_level_key = key_;
    if (!keys_.back().insert(key_).second) {
      duplicate = key_;
      depth = keys_.size();
      ec = json::error::syntax;  // stops the parser; `duplicate` says why
      return false;
    }
    key_.clear();
    return true;
  }
  bool on_number_part(json::string_view, json::error_code&) { return true; }
  bool on_int64(int64_t, json::string_view, json::error_code&) { return true; }
  bool on_uint64(uint64_t, json::string_view, json::error_code&) { return true; }
  bool on_double(double, json::string_view, json::error_code&) { return true; }
  bool on_bool(bool, json::error_code&) { return true; }
  bool on_null(json::error_code&) { return true; }
  bool on_comment_part(json::string_view, json::error_code&) { return true; }
  bool on_comment(json::string_view, json::error_code&) { return true; }

 private:
  std::vector<std::set<std::string>> keys_;  // one set per open object, innermost last
  std::string key_;
};

json::object parse_header(const std::filesystem::path& file, const std::string& header) {
  if (auto bad = invalid_utf8_at(header)) fail(file, "header is not valid UTF-8 at {}", header_position(header, *bad));

  // Default options: strict JSON (no comments, no trailing commas), nesting at most 32 deep.
  json::parser parser;
  json::error_code ec;
  const size_t consumed = parser.write(header.data(), header.size(), ec);
  if (ec) fail(file, "header is not valid JSON at {}: {}", header_position(header, consumed), ec.message());
  json::value root = parser.release();

  json::basic_parser<DuplicateKeyFinder> finder(json::parse_options{});
  const size_t stopped = finder.write_some(false, header.data(), header.size(), ec);
  const DuplicateKeyFinder& found = finder.handler();
  if (!found.duplicate.empty()) {
    const std::string where = header_position(header, stopped);
    if (found.depth == 1)
      fail(file, "tensor '{}' appears twice in the header, the second time at {}", printable(found.duplicate), where);
    fail(file, "key '{}' appears twice in the entry of '{}', the second time at {}", printable(found.duplicate),
         printable(found.top_level_key), where);
  }
  if (ec) fail(file, "header is not valid JSON at {}: {}", header_position(header, stopped), ec.message());

  if (!root.is_object())
    fail(file, "header must be a JSON object {{\"tensor name\": {{...}}, ...}}, got {}", describe_json(root));
  return std::move(root.get_object());
}

// A non-negative integer that fits in int64 (shape dimensions and offsets).
std::optional<int64_t> as_count(const json::value& value) {
  if (value.is_int64() && value.get_int64() >= 0) return value.get_int64();
  if (value.is_uint64() && value.get_uint64() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    return static_cast<int64_t>(value.get_uint64());
  return std::nullopt;
}

struct Entry {
  std::string name;
  const FileDType* dtype = nullptr;
  Shape shape;
  uint64_t numel = 0;
  uint64_t begin = 0, end = 0;  // in the data buffer
};

// One tensor's header entry, checked on its own (offsets against the buffer size; the layout
// across tensors is checked afterwards).
Entry parse_entry(const std::filesystem::path& file, std::string_view name, const json::value& value,
                  uint64_t buffer_bytes) {
  constexpr std::string_view expected_entry = "{\"dtype\": \"F32\", \"shape\": [..], \"data_offsets\": [begin, end]}";
  if (!value.is_object()) fail_tensor(file, name, "expected an entry {}, got {}", expected_entry, describe_json(value));
  const json::object& object = value.get_object();
  for (const auto& field : object) {
    const std::string_view key(field.key().data(), field.key().size());
    if (key != "dtype" && key != "shape" && key != "data_offsets")
      fail_tensor(file, name, "unknown key '{}' in its entry (expected dtype, shape, data_offsets)", printable(key));
  }
  auto field = [&](std::string_view key) -> const json::value& {
    const json::value* found = object.if_contains(json::string_view(key.data(), key.size()));
    if (!found) fail_tensor(file, name, "entry has no '{}' (expected {})", key, expected_entry);
    return *found;
  };

  Entry entry;
  entry.name = std::string(name);

  const json::value& dtype = field("dtype");
  if (!dtype.is_string())
    fail_tensor(file, name, "dtype must be a string such as \"F32\", got {}", describe_json(dtype));
  const std::string_view dtype_text(dtype.get_string().data(), dtype.get_string().size());
  entry.dtype = file_dtype_named(dtype_text);
  if (!entry.dtype)
    fail_tensor(file, name, "dtype '{}' is not supported (moelab reads {})", printable(dtype_text), supported_dtypes);

  const json::value& shape = field("shape");
  if (!shape.is_array()) fail_tensor(file, name, "shape must be an array of sizes, got {}", describe_json(shape));
  // numel of the non-zero dimensions must fit in int64: then every prefix product Tensor::numel
  // forms does too, even where a zero dimension makes the tensor empty.
  uint64_t nonzero_product = 1;
  bool has_zero = false;
  for (size_t i = 0; i < shape.get_array().size(); ++i) {
    const json::value& dimension = shape.get_array()[i];
    const std::optional<int64_t> size = as_count(dimension);
    if (!size)
      fail_tensor(file, name, "shape[{}] must be an integer in [0, 2^63), got {}", i, describe_json(dimension));
    entry.shape.push_back(*size);
    if (*size == 0) {
      has_zero = true;
    } else if (__builtin_mul_overflow(nonzero_product, static_cast<uint64_t>(*size), &nonzero_product) ||
               nonzero_product > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      fail_tensor(file, name, "shape {} has more elements than a signed 64-bit count holds",
                  printable(json::serialize(shape)));
    }
  }
  entry.numel = has_zero ? 0 : nonzero_product;
  // "f32[4, 8]", for messages only.
  auto described = [&] { return printable(lower_case(entry.dtype->name) + shape_str(entry.shape)); };
  uint64_t needed_bytes = 0;
  if (__builtin_mul_overflow(entry.numel, entry.dtype->file_bytes, &needed_bytes))
    fail_tensor(file, name, "{} needs more bytes than fit in 64 bits", described());

  const json::value& offsets = field("data_offsets");
  if (!offsets.is_array() || offsets.get_array().size() != 2)
    fail_tensor(
        file, name, "data_offsets must be [begin, end], got {}",
        offsets.is_array() ? fmt::format("an array of length {}", offsets.get_array().size()) : describe_json(offsets));
  for (size_t i = 0; i < 2; ++i)
    if (!as_count(offsets.get_array()[i]))
      fail_tensor(file, name, "data_offsets[{}] must be an integer in [0, 2^63), got {}", i,
                  describe_json(offsets.get_array()[i]));
  entry.begin = static_cast<uint64_t>(*as_count(offsets.get_array()[0]));
  entry.end = static_cast<uint64_t>(*as_count(offsets.get_array()[1]));
  if (entry.begin > entry.end)
    fail_tensor(file, name, "data_offsets [{}, {}] begin after they end (expected [begin, end] with begin <= end)",
                entry.begin, entry.end);
  if (entry.end - entry.begin != needed_bytes)
    fail_tensor(file, name, "data_offsets [{}, {}] hold {} bytes but {} needs {}", entry.begin, entry.end,
                entry.end - entry.begin, described(), needed_bytes);
  if (entry.end > buffer_bytes)
    fail_tensor(file, name, "data_offsets [{}, {}] reach past the end of the data buffer ({} bytes)", entry.begin,
                entry.end, buffer_bytes);
  return entry;
}

std::map<std::string, std::string> parse_metadata(const std::filesystem::path& file, const json::value& value) {
  if (!value.is_object())
    fail(file, "'__metadata__' must be an object of strings {{\"key\": \"value\"}}, got {}", describe_json(value));
  std::map<std::string, std::string> metadata;
  for (const auto& [key, text] : value.get_object()) {
    if (!text.is_string())
      fail(file, "'__metadata__' entry '{}' must be a string, got {}", printable(key), describe_json(text));
    metadata.emplace(std::string(key), std::string(text.get_string()));
  }
  return metadata;
}

// Sorted by offset, the tensors must tile [0, buffer_bytes): the format forbids overlaps and
// holes, and bytes no tensor owns are a sign of a truncated or corrupted header.
void check_layout(const std::filesystem::path& file, std::vector<Entry>& entries, uint64_t buffer_bytes) {
  // Stable: tensors at the same offset (empty ones) keep their header order.
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t covered = 0;
  const Entry* previous = nullptr;
  for (const Entry& entry : entries) {
    if (entry.begin < covered)
      fail_tensor(file, entry.name, "data_offsets [{}, {}] overlap tensor '{}' at [{}, {}]", entry.begin, entry.end,
                  printable(previous->name), previous->begin, previous->end);
    if (entry.begin > covered)
      fail(file, "bytes [{}, {}) of the data buffer belong to no tensor ({}); the format allows no holes", covered,
           entry.begin,
           previous ? fmt::format("between '{}' and '{}'", printable(previous->name), printable(entry.name))
                    : fmt::format("before '{}'", printable(entry.name)));
    covered = entry.end;
    if (entry.end > entry.begin || !previous) previous = &entry;
  }
  if (covered != buffer_bytes)
    fail(file,
         "the data buffer has {} bytes but the tensors cover only the first {}: {} trailing bytes belong to no tensor",
         buffer_bytes, covered, buffer_bytes - covered);
}

}  // namespace

// ---------------------------------------------------------------------------------------------

const Tensor& SafetensorsFile::at(const std::string& name) const {
  if (auto it = tensors.find(name); it != tensors.end()) return it->second;
  // Up to three closest names, by edit distance.
  std::vector<std::string> candidates = names, close;
  while (close.size() < 3) {
    std::string nearest = nearest_name(name, candidates);
    if (nearest.empty()) break;
    candidates.erase(std::find(candidates.begin(), candidates.end(), nearest));
    close.push_back(std::move(nearest));
  }
  std::string hint;
  if (!close.empty()) {
    hint = fmt::format("did you mean '{}'?", fmt::join(close, "', '"));
  } else if (names.empty()) {
    hint = "the file holds no tensors";
  } else {
    constexpr size_t shown = 5;
    std::vector<std::string> first(names.begin(),
                                   names.begin() + static_cast<std::ptrdiff_t>(std::min(shown, names.size())));
    hint = fmt::format("it holds {} tensors: '{}'{}", names.size(), fmt::join(first, "', '"),
                       names.size() > shown ? ", ..." : "");
  }
  throw UsageError(fmt::format("{}: no tensor '{}' ({})", path.string(), printable(name), hint));
}

SafetensorsFile read_safetensors(const std::filesystem::path& file) {
  FileDescriptor fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) fail(file, "cannot open: {}", errno_text(errno));
  struct stat status {};
  if (::fstat(fd.get(), &status) != 0) fail(file, "cannot stat: {}", errno_text(errno));
  if (!S_ISREG(status.st_mode)) fail(file, "not a regular file");
  const auto file_bytes = static_cast<uint64_t>(status.st_size);

  constexpr uint64_t length_bytes = 8;
  if (file_bytes < length_bytes)
    fail(file, "file is {} bytes, too short for the 8-byte header length (is it a safetensors file?)", file_bytes);
  unsigned char length_field[length_bytes];
  if (read_at(file, fd.get(), length_field, length_bytes, 0) != length_bytes)
    fail(file, "file ended inside the 8-byte header length");
  uint64_t header_bytes = 0;
  for (size_t i = 0; i < length_bytes; ++i) header_bytes |= static_cast<uint64_t>(length_field[i]) << (8 * i);
  if (header_bytes > max_header_bytes)
    fail(file, "header length {} is over the {}-byte limit (is it a safetensors file?)", header_bytes,
         max_header_bytes);
  if (header_bytes > file_bytes - length_bytes)
    fail(file, "header length {} is more than the {} bytes that follow it (truncated file?)", header_bytes,
         file_bytes - length_bytes);
  const uint64_t buffer_start = length_bytes + header_bytes;
  const uint64_t buffer_bytes = file_bytes - buffer_start;

  std::string header(header_bytes, '\0');
  if (read_at(file, fd.get(), header.data(), header.size(), length_bytes) != header.size())
    fail(file, "file ended inside the header (it shrank while being read?)");
  const json::object root = parse_header(file, header);

  SafetensorsFile result;
  result.path = file;
  std::vector<Entry> entries;
  for (const auto& [key, value] : root) {
    const std::string_view name(key.data(), key.size());
    if (name == metadata_key)
      result.metadata = parse_metadata(file, value);
    else
      entries.push_back(parse_entry(file, name, value, buffer_bytes));
  }
  check_layout(file, entries, buffer_bytes);

  // Sizes are now checked against the file, so every allocation below is bounded by it (twice
  // it for F16, widened to f32). One allocation per tensor keeps each one aligned for its dtype.
  for (const Entry& entry : entries) {
    Tensor tensor = host_tensor(entry.dtype->dtype, entry.shape);
    const size_t bytes = static_cast<size_t>(entry.end - entry.begin);
    size_t read = 0;
    if (entry.dtype->half) {
      std::vector<uint16_t> halves(static_cast<size_t>(entry.numel));
      read = read_at(file, fd.get(), halves.data(), bytes, buffer_start + entry.begin);
      float* out = tensor.data<float>();
      for (size_t i = 0; i < halves.size(); ++i) out[i] = half_to_float(halves[i]);
    } else {
      read = read_at(file, fd.get(), tensor.raw(), bytes, buffer_start + entry.begin);
    }
    if (read != bytes) fail_tensor(file, entry.name, "file ended while reading its data (it shrank while being read?)");
    result.names.push_back(entry.name);
    result.tensors.emplace(entry.name, std::move(tensor));
  }
  return result;
}

// ---------------------------------------------------------------------------------------------

namespace {

// Removes the temporary file unless the write got as far as renaming it over the target.
class TemporaryFile {
 public:
  explicit TemporaryFile(std::filesystem::path path) : path_(std::move(path)) {}
  TemporaryFile(const TemporaryFile&) = delete;
  TemporaryFile& operator=(const TemporaryFile&) = delete;
  ~TemporaryFile() {
    if (!renamed_) ::unlink(path_.c_str());
  }
  const std::filesystem::path& path() const { return path_; }
  void renamed() { renamed_ = true; }

 private:
  std::filesystem::path path_;
  bool renamed_ = false;
};

// A name no other writer in this or another process picks: pid plus a per-process counter.
std::filesystem::path temporary_name(const std::filesystem::path& file) {
  static std::atomic<uint64_t> counter{0};
  const std::filesystem::path folder = file.has_parent_path() ? file.parent_path() : std::filesystem::path(".");
  return folder / fmt::format(".{}.tmp-{}-{}", file.filename().string(), ::getpid(), counter++);
}

// Makes the rename itself durable. Best effort: the file is complete and in place whether or not
// the folder can be synced (some filesystems refuse fsync on a directory).
void sync_folder(const std::filesystem::path& file) {
  const std::filesystem::path folder = file.has_parent_path() ? file.parent_path() : std::filesystem::path(".");
  const int fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

void check_utf8(const std::filesystem::path& file, std::string_view what, std::string_view text) {
  if (auto bad = invalid_utf8_at(text))
    fail(file, "{} '{}' is not valid UTF-8 (byte {}); the header is UTF-8 JSON", what, printable(text), *bad);
}

}  // namespace

void write_safetensors(const std::filesystem::path& file, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // Every argument is checked before anything touches the disk.
  std::set<std::string_view> seen;
  for (const auto& [name, tensor] : tensors) {
    check_utf8(file, "tensor name", name);
    if (name == metadata_key)
      fail(file, "a tensor cannot be called '__metadata__': the name is reserved for the metadata map");
    if (!seen.insert(name).second) fail_tensor(file, name, "given twice; tensor names must be unique");
    if (!tensor.defined()) fail_tensor(file, name, "is undefined (it has no buffer)");
    if (tensor.device() != DeviceKind::cpu)
      fail_tensor(file, name, "is on {}; copy it to the host first (files are written from host memory)",
                  device_name(tensor.device()));
    if (!file_dtype_name(tensor.dtype()))
      fail_tensor(file, name, "dtype #{} has no safetensors equivalent", static_cast<int>(tensor.dtype()));
  }
  for (const auto& [key, value] : metadata) {
    check_utf8(file, "metadata key", key);
    check_utf8(file, "metadata value", value);
  }

  // Offsets follow the given order; header keys go in name order, "__metadata__" first as the
  // reference writes it.
  std::vector<std::pair<uint64_t, uint64_t>> offsets;
  uint64_t buffer_bytes = 0;
  for (const auto& [name, tensor] : tensors) {
    offsets.emplace_back(buffer_bytes, buffer_bytes + tensor.bytes());
    buffer_bytes += tensor.bytes();
  }
  std::vector<size_t> by_name(tensors.size());
  for (size_t i = 0; i < by_name.size(); ++i) by_name[i] = i;
  std::sort(by_name.begin(), by_name.end(), [&](size_t a, size_t b) { return tensors[a].first < tensors[b].first; });

  json::object root;
  if (!metadata.empty()) {
    json::object entries;
    for (const auto& [key, value] : metadata) entries.emplace(key, value);
    root.emplace(metadata_key, std::move(entries));
  }
  for (size_t index : by_name) {
    const auto& [name, tensor] = tensors[index];
    json::array shape;
    for (int64_t size : tensor.shape()) shape.emplace_back(size);
    json::object entry;
    entry.emplace("dtype", file_dtype_name(tensor.dtype()));
    entry.emplace("shape", std::move(shape));
    entry.emplace("data_offsets", json::array{offsets[index].first, offsets[index].second});
    root.emplace(name, std::move(entry));
  }
  std::string header = json::serialize(root);
  header.append((header_alignment - header.size() % header_alignment) % header_alignment, ' ');
  if (header.size() > max_header_bytes)
    fail(file, "the header would be {} bytes, over the {}-byte limit readers accept", header.size(), max_header_bytes);

  std::string prefix(8, '\0');
  for (size_t i = 0; i < 8; ++i)
    prefix[i] = static_cast<char>((static_cast<uint64_t>(header.size()) >> (8 * i)) & 0xff);

  TemporaryFile temporary(temporary_name(file));
  FileDescriptor fd(::open(temporary.path().c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666));
  if (fd.get() < 0) {
    temporary.renamed();  // nothing was created, so there is nothing to remove
    fail(file, "cannot create '{}' to write into: {}", temporary.path().string(), errno_text(errno));
  }
  write_all(file, fd.get(), prefix.data(), prefix.size());
  write_all(file, fd.get(), header.data(), header.size());
  for (const auto& [name, tensor] : tensors) write_all(file, fd.get(), tensor.raw(), tensor.bytes());
  if (::fsync(fd.get()) != 0)
    throw RuntimeError(fmt::format("{}: cannot flush to disk: {}", file.string(), errno_text(errno)));
  if (fd.close() != 0)
    throw RuntimeError(fmt::format("{}: closing after writing failed: {}", file.string(), errno_text(errno)));
  if (::rename(temporary.path().c_str(), file.c_str()) != 0)
    fail(file, "cannot replace it with the newly written '{}': {}", temporary.path().string(), errno_text(errno));
  temporary.renamed();
  sync_folder(file);
}

}  // namespace moelab
