// libFuzzer harness over sealer::open: arbitrary bytes become a message
// (routing key, message id, x-runnel-seal header, body); every input must
// open or throw seal_error, never crash or leak. The first byte picks the
// field lengths; a few inputs are also sealed first and then altered by the
// rest, to reach past the tag check's setup.
#include <runnel/amqp/seal.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

namespace {

const runnel::amqp::sealer& keys() {
  static const runnel::amqp::sealer s = runnel::amqp::sealer::parse(
      "k1:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n"
      "k2:1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100");
  return s;
}

std::string take(const std::uint8_t*& p, std::size_t& n, std::size_t len) {
  len = len < n ? len : n;
  std::string s(reinterpret_cast<const char*>(p), len);
  p += len;
  n -= len;
  return s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const std::uint8_t mode = data[0];
  const std::uint8_t* p = data + 1;
  std::size_t n = size - 1;
  runnel::amqp::message m;
  m.routing_key = take(p, n, mode & 7);
  m.message_id = take(p, n, (mode >> 3) & 7);
  if (mode & 0x40) m.headers.emplace_back(runnel::amqp::seal_header, take(p, n, 3));
  m.body = take(p, n, n);
  if (mode & 0x80) {
    // Seal a fixed body, then xor the rest of the input into the sealed one.
    runnel::amqp::message s;
    s.routing_key = m.routing_key;
    s.message_id = m.message_id;
    s.body = "fuzz";
    keys().seal(s);
    for (std::size_t i = 0; i < m.body.size() && i < s.body.size(); ++i) s.body[i] ^= m.body[i];
    if (m.body.size() > s.body.size()) s.body.append(m.body, s.body.size(), std::string::npos);
    m = std::move(s);
  }
  const runnel::amqp::message before = m;
  try {
    keys().open(m);
  } catch (const runnel::amqp::seal_error&) {
    // A refusal must leave the message as it was.
    if (m.body != before.body || m.headers != before.headers) __builtin_trap();
  }
  return 0;
}
