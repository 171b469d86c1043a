// libFuzzer harness over connection_options::from_url (the URL and its query,
// TLS keys included): every input gives options or a runnel::amqp::error,
// never a crash, a leak or another exception; an error never repeats the
// password of a URL that has one.
#include <runnel/amqp/options.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string url(reinterpret_cast<const char*>(data), size);
  try {
    const auto o = runnel::amqp::connection_options::from_url(url);
    if (o.endpoints.empty()) __builtin_trap();
    for (const auto& e : o.endpoints)
      if (e.host.empty() || e.port < 1 || e.port > 65535) __builtin_trap();
  } catch (const runnel::amqp::error& e) {
    // The password must not be echoed. Checked when it is certainly the
    // password ("u:pwSECRET@" right after the scheme) and its text appears
    // nowhere else in the URL (a query key with that text may be named).
    const bool shaped = url.rfind("amqp://u:pwSECRET@", 0) == 0 || url.rfind("amqps://u:pwSECRET@", 0) == 0;
    const auto at = url.find("pwSECRET");
    const bool once = at != std::string::npos && url.find("pwSECRET", at + 1) == std::string::npos;
    if (shaped && once && std::string(e.what()).find("pwSECRET") != std::string::npos) __builtin_trap();
  }
  return 0;
}
