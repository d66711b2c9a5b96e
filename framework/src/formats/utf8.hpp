// UTF-8 validation shared by the readers of user files (safetensors headers, text corpora).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace moelab {

// Offset of the first byte that is not part of well-formed UTF-8 (no overlong forms, no
// surrogates, nothing past U+10FFFF; RFC 3629 sec. 4); nullopt when all of `text` is valid.
inline std::optional<size_t> invalid_utf8_at(std::string_view text) {
  static constexpr uint32_t smallest_code_point[] = {0, 0x80, 0x800, 0x10000};
  size_t i = 0;
  while (i < text.size()) {
    const auto lead = static_cast<unsigned char>(text[i]);
    size_t continuation_bytes;
    uint32_t code_point;
    if (lead < 0x80) {
      ++i;
      continue;
    } else if ((lead & 0xe0) == 0xc0) {
      continuation_bytes = 1;
      code_point = lead & 0x1f;
    } else if ((lead & 0xf0) == 0xe0) {
      continuation_bytes = 2;
      code_point = lead & 0x0f;
    } else if ((lead & 0xf8) == 0xf0) {
      continuation_bytes = 3;
      code_point = lead & 0x07;
    } else {
      return i;
    }
    if (text.size() - i <= continuation_bytes) return i;
    for (size_t k = 1; k <= continuation_bytes; ++k) {
      const auto byte = static_cast<unsigned char>(text[i + k]);
      if ((byte & 0xc0) != 0x80) return i;
      code_point = (code_point << 6) | (byte & 0x3f);
    }
    if (code_point < smallest_code_point[continuation_bytes] || code_point > 0x10ffff ||
        (code_point >= 0xd800 && code_point <= 0xdfff))
      return i;
    i += continuation_bytes + 1;
  }
  return std::nullopt;
}

}  // namespace moelab
