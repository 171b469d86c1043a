// How a process pool's messages cross between processes: as bytes.
//
// runnel::process_codec<T> turns a T into bytes and back. The primary
// template handles trivially copyable types (their object representation is
// copied); std::string is provided; for any other type specialise
//
//   template <> struct runnel::process_codec<MyType> {
//     static void encode(const MyType& v, std::string& out);   // out is empty on entry
//     static MyType decode(std::string_view bytes);            // may throw
//   };
//
// or pass a codec type with the same two functions as process_pool's third
// (requests) or fourth (replies) template argument.
#pragma once

#include <array>
#include <bit>
#include <concepts>
#include <cstddef>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace runnel {

template <class T>
struct process_codec {
  static void encode(const T& v, std::string& out)
    requires std::is_trivially_copyable_v<T>
  {
    out.assign(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  static T decode(std::string_view bytes)
    requires std::is_trivially_copyable_v<T>
  {
    if (bytes.size() != sizeof(T))
      throw std::length_error("runnel::process_codec: a trivially copyable message arrived with " +
                              std::to_string(bytes.size()) + " bytes, expected " + std::to_string(sizeof(T)));
    std::array<std::byte, sizeof(T)> raw;
    std::memcpy(raw.data(), bytes.data(), sizeof(T));
    return std::bit_cast<T>(raw);
  }
};

template <>
struct process_codec<std::string> {
  static void encode(const std::string& v, std::string& out) { out = v; }
  static std::string decode(std::string_view bytes) { return std::string(bytes); }
};

// C encodes and decodes T (the functions process_pool calls).
template <class C, class T>
concept process_codec_for = requires(const T& v, std::string& out, std::string_view bytes) {
  C::encode(v, out);
  { C::decode(bytes) } -> std::same_as<T>;
};

}  // namespace runnel
