// Compiled by the compile_fail_process_codec / compile_ok_process_codec
// tests in CMakeLists.txt. With NO_IN_CODEC (NO_OUT_CODEC) process_pool's
// request (reply) type is neither trivially copyable nor given a
// process_codec, and the pool must be refused with runnel's static_assert
// saying so (and nothing else); without either both have codecs and the same
// program compiles.
#include <runnel/process_pool.hpp>

#include <cstring>
#include <string>
#include <string_view>
#include <vector>

struct request {
  std::vector<int> values;
};
struct reply {
  std::string text;
};

#ifndef NO_IN_CODEC
template <>
struct runnel::process_codec<request> {
  static void encode(const request& r, std::string& out) {
    out.assign(reinterpret_cast<const char*>(r.values.data()), r.values.size() * sizeof(int));
  }
  static request decode(std::string_view bytes) {
    request r;
    r.values.resize(bytes.size() / sizeof(int));
    if (!r.values.empty()) std::memcpy(r.values.data(), bytes.data(), r.values.size() * sizeof(int));
    return r;
  }
};
#endif
#ifndef NO_OUT_CODEC
template <>
struct runnel::process_codec<reply> {
  static void encode(const reply& r, std::string& out) { out = r.text; }
  static reply decode(std::string_view bytes) { return reply{std::string(bytes)}; }
};
#endif

int main() {
  runnel::process_pool<request, reply> pool([](request&& r) { return reply{std::to_string(r.values.size())}; },
                                            {.workers = 1});
  return pool.call(request{{1, 2, 3}}).get().text == "3" ? 0 : 1;
}
