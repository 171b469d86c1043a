// The flagship scaling demo: parse -> hash -> aggregate of synthetic records.
//
//   generate (serial)    a text record such as
//                        "id=123456,user=8812,amount=1234.56,region=eu-west-2"
//   process  (parallel)  parse the fields, then a keyed digest of the record
//                        (hash_rounds passes of a 64-bit mixer, the stand-in
//                        for real per-message work: a few microseconds)
//   consume  (serial)    aggregate amount and digest per user bucket
//
// The stage is about two orders of magnitude dearer than generating and
// aggregating a record, so the serial ends do not cap the speed-up on the
// core counts of ordinary machines.
//
//   scaling_demo --peers --plot scaling.svg        (see --help)
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "runnel/scaling.hpp"

namespace {

constexpr int hash_rounds = 48;
constexpr std::size_t user_buckets = 1024;

struct record {
  std::array<char, 72> text{};
  std::uint8_t size = 0;
};

struct parsed {
  std::uint32_t user = 0;
  std::uint64_t cents = 0;
  std::uint64_t digest = 0;
};

// Deterministic per sequence number, so every run sees the same stream.
std::uint64_t mix(std::uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

record generate(std::uint64_t seq) {
  static constexpr const char* regions[] = {"eu-west-2", "us-east-1", "ap-south-1", "sa-east-1"};
  const std::uint64_t r = mix(seq);
  record rec;
  const int n = std::snprintf(rec.text.data(), rec.text.size(), "id=%llu,user=%u,amount=%u.%02u,region=%s",
                              static_cast<unsigned long long>(seq), static_cast<unsigned>(r % 100000),
                              static_cast<unsigned>((r >> 20) % 10000), static_cast<unsigned>((r >> 40) % 100),
                              regions[(r >> 50) % 4]);
  rec.size = static_cast<std::uint8_t>(n < 0 ? 0 : std::min<int>(n, static_cast<int>(rec.text.size()) - 1));
  return rec;
}

// The unsigned number after "key=" in text, and where it ends.
std::uint64_t field(const char* text, const char* end, const char* key, const char** stop) {
  const char* p = std::strstr(text, key);
  std::uint64_t v = 0;
  if (p != nullptr)
    for (p += std::strlen(key); p < end && *p >= '0' && *p <= '9'; ++p) v = v * 10 + static_cast<std::uint64_t>(*p - '0');
  *stop = p;
  return v;
}

parsed process(const record& rec) {
  const char* text = rec.text.data();
  const char* end = text + rec.size;
  const char* p = nullptr;
  parsed out;
  out.user = static_cast<std::uint32_t>(field(text, end, "user=", &p));
  out.cents = field(text, end, "amount=", &p) * 100;
  if (p != nullptr && p < end && *p == '.') out.cents += field(p, end, ".", &p);
  std::uint64_t h = 0x9e3779b97f4a7c15ull ^ out.user;
  for (int round = 0; round < hash_rounds; ++round)
    for (std::size_t i = 0; i < rec.size; i += 8) {
      std::uint64_t word = 0;
      std::memcpy(&word, text + i, std::min<std::size_t>(8, rec.size - i));
      h = mix(h ^ word) + static_cast<std::uint64_t>(round);
    }
  out.digest = h;
  return out;
}

struct aggregate {
  std::array<std::uint64_t, user_buckets> cents{};
  std::array<std::uint64_t, user_buckets> digests{};
  void operator()(const parsed& p) {
    cents[p.user % user_buckets] += p.cents;
    digests[p.user % user_buckets] ^= p.digest;
  }
};

}  // namespace

int main(int argc, char** argv) {
  return runnel::scaling::run_main(argc, argv, "scaling_demo: parse -> hash -> aggregate", generate, process,
                                   aggregate{});
}
