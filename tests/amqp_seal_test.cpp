// Sealed messages (runnel::amqp::sealer): AES-256-GCM known answers through
// the EVP calls, round trips, every single-bit flip rejected, key rotation,
// the key text forms and their errors (never showing key bytes). No broker:
// the round trip through one (tampered messages dead-lettered and counted)
// is in amqp_bridge_test.cpp, which has one running already.
#include <catch2/catch.hpp>

#include <runnel/amqp.hpp>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace amqp = runnel::amqp;

namespace {

std::string unhex(const std::string& h) {
  std::string out;
  for (std::size_t i = 0; i + 1 < h.size(); i += 2) out.push_back(static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16)));
  return out;
}
std::string tohex(const unsigned char* p, std::size_t n) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (std::size_t i = 0; i < n; ++i) {
    s.push_back(d[p[i] >> 4]);
    s.push_back(d[p[i] & 15]);
  }
  return s;
}
amqp::sealer::key_bytes key_of(const std::string& hex) {
  amqp::sealer::key_bytes k{};
  const std::string b = unhex(hex);
  REQUIRE(b.size() == k.size());
  std::copy(b.begin(), b.end(), k.begin());
  return k;
}

// Test keys (never used anywhere else); the tests grep output for them.
const std::string hex1 = "8f3a1c5e7b9d2f4a6c8e0b1d3f5a7c9e1b3d5f7a9c0e2b4d6f8a1c3e5b7d9f20";
const std::string hex2 = "27c4e6a8b0d2f4163850729bd4f61a3c5e7092b4d6f81a3c5e7092b4d6f81a3c";

amqp::sealer one_key(const std::string& id = "k1", const std::string& hex = hex1) {
  return amqp::sealer::parse(id + ":" + hex);
}

amqp::message sample(std::string body = "hello, sealed world") {
  amqp::message m;
  m.body = std::move(body);
  m.routing_key = "orders";
  m.message_id = "m-42";
  return m;
}

const std::string* header(const amqp::message& m, const std::string& k) {
  for (const auto& h : m.headers)
    if (h.first == k) return &h.second;
  return nullptr;
}

// what() of the seal_error that f throws ("" when none is thrown).
template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const amqp::seal_error& e) {
    return e.what();
  }
  return "";
}

// No 8-character piece of either key's hex (either case) is in s.
bool shows_no_key(const std::string& s) {
  for (const std::string* k : {&hex1, &hex2})
    for (std::size_t i = 0; i + 8 <= k->size(); i += 4) {
      std::string piece = k->substr(i, 8), upper = piece;
      for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
      if (s.find(piece) != std::string::npos || s.find(upper) != std::string::npos) return false;
    }
  return true;
}

struct gcm_case {
  const char* name;
  const char* key;
  const char* iv;
  const char* aad;
  const char* plain;
  const char* cipher;
  const char* tag;
};

// The AES-256 test cases 13-16 of McGrew & Viega, "The Galois/Counter Mode
// of Operation (GCM)" (the GCM specification submitted to NIST), all with
// 96-bit IVs.
const gcm_case gcm_cases[] = {
    {"13: zero key, empty", "0000000000000000000000000000000000000000000000000000000000000000",
     "000000000000000000000000", "", "", "", "530f8afbc74536b9a963b4f1c4cb738b"},
    {"14: zero key, one zero block", "0000000000000000000000000000000000000000000000000000000000000000",
     "000000000000000000000000", "", "00000000000000000000000000000000", "cea7403d4d606b6e074ec5d3baf39d18",
     "d0d1c8a799996bf0265b98b5d48ab919"},
    {"15: four blocks, no AAD", "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
     "cafebabefacedbaddecaf888", "",
     "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525"
     "b16aedf5aa0de657ba637b391aafd255",
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838"
     "c5f61e6393ba7a0abcc9f662898015ad",
     "b094dac5d93471bdec1a502270e3cc6c"},
    {"16: 60 bytes, 20 bytes AAD", "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
     "cafebabefacedbaddecaf888", "feedfacedeadbeeffeedfacedeadbeefabaddad2",
     "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525"
     "b16aedf5aa0de657ba637b39",
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838"
     "c5f61e6393ba7a0abcc9f662",
     "76fc6ece0f4e1768cddf8853bb2d551b"},
};

}  // namespace

TEST_CASE("AES-256-GCM known answers (GCM spec cases 13-16) through the EVP calls", "[amqp][seal]") {
  for (const auto& c : gcm_cases) {
    INFO("case " << c.name);
    const auto key = key_of(c.key);
    const std::string iv = unhex(c.iv), aad = unhex(c.aad), plain = unhex(c.plain);
    const auto* ivp = reinterpret_cast<const unsigned char*>(iv.data());
    std::vector<unsigned char> out(plain.size() + 1), tag(16);
    REQUIRE(amqp::sealer::gcm(true, key, ivp, aad, reinterpret_cast<const unsigned char*>(plain.data()),
                              plain.size(), out.data(), tag.data()));
    CHECK(tohex(out.data(), plain.size()) == c.cipher);
    CHECK(tohex(tag.data(), tag.size()) == c.tag);

    // Decrypting the vector's ciphertext gives its plaintext; a changed tag
    // or AAD is refused.
    const std::string cipher = unhex(c.cipher);
    std::vector<unsigned char> back(cipher.size() + 1);
    auto want_tag = tag;
    CHECK(amqp::sealer::gcm(false, key, ivp, aad, reinterpret_cast<const unsigned char*>(cipher.data()),
                            cipher.size(), back.data(), want_tag.data()));
    CHECK(std::string(reinterpret_cast<char*>(back.data()), cipher.size()) == plain);
    auto bad_tag = tag;
    bad_tag[15] ^= 1;
    CHECK_FALSE(amqp::sealer::gcm(false, key, ivp, aad, reinterpret_cast<const unsigned char*>(cipher.data()),
                                  cipher.size(), back.data(), bad_tag.data()));
    want_tag = tag;
    CHECK_FALSE(amqp::sealer::gcm(false, key, ivp, aad + "x", reinterpret_cast<const unsigned char*>(cipher.data()),
                                  cipher.size(), back.data(), want_tag.data()));
  }
}

TEST_CASE("the associated data is the documented length-prefixed encoding", "[amqp][seal]") {
  const std::string a = amqp::sealer::associated_data("k1", "orders", "m-42");
  const std::string want = std::string("runnel-seal-1\0", 14) + std::string("\0\0\0\2", 4) + "k1" +
                           std::string("\0\0\0\6", 4) + "orders" + std::string("\0\0\0\4", 4) + "m-42";
  CHECK(a == want);
  // Moving bytes between fields changes the AAD.
  CHECK(amqp::sealer::associated_data("k1", "ab", "c") != amqp::sealer::associated_data("k1", "a", "bc"));
}

TEST_CASE("seal then open gives back empty, small and 1 MiB bodies; nonces differ", "[amqp][seal]") {
  const amqp::sealer s = one_key();
  std::string big(1 << 20, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 2654435761u) >> 13);
  for (const std::string& body : {std::string{}, std::string("x"), std::string("hello, sealed world"), big}) {
    INFO("body of " << body.size() << " bytes");
    amqp::message m = sample(body);
    s.seal(m);
    CHECK(m.body.size() == body.size() + amqp::sealer::overhead);
    REQUIRE(header(m, amqp::seal_header) != nullptr);
    CHECK(*header(m, amqp::seal_header) == "k1");
    if (body.size() > 16) CHECK(m.body.find(body.substr(0, 16)) == std::string::npos);
    s.open(m);
    CHECK(m.body == body);
    CHECK(header(m, amqp::seal_header) == nullptr);  // removed once opened
  }
  amqp::message a = sample(), b = sample();
  s.seal(a);
  s.seal(b);
  CHECK(a.body.substr(0, 12) != b.body.substr(0, 12));
  CHECK(a.body != b.body);
}

TEST_CASE("a thread seals and opens every message with one cipher context", "[amqp][seal]") {
  // Two threads of their own, 200 messages each, sealed and opened with two
  // keys alternately: one context a thread, reused (and wiped) per message.
  const amqp::sealer s = one_key();
  const amqp::sealer t = amqp::sealer::parse(
      "k9:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff");
  const std::uint64_t before = amqp::sealer::contexts_created();
  auto work = [&] {
    for (int i = 0; i < 200; ++i) {
      const amqp::sealer& k = i % 2 == 0 ? s : t;
      amqp::message m = sample("message " + std::to_string(i));
      k.seal(m);
      k.open(m);
      if (m.body != "message " + std::to_string(i)) throw std::runtime_error("round trip changed the body");
    }
  };
  std::thread a(work), b(work);
  a.join();
  b.join();
  CHECK(amqp::sealer::contexts_created() - before == 2);
}

TEST_CASE("every single-bit flip of a sealed message is rejected and leaves it unchanged", "[amqp][seal]") {
  // k3 has k1's key bytes: a flip of the key id "k1" into "k3" (bit 1 of
  // '1') must fail because the id is bound as associated data, not only
  // because the key differs.
  const amqp::sealer s = amqp::sealer::parse("k1:" + hex1 + "\nk3:" + hex1);
  amqp::message sealed = sample();
  s.seal(sealed);
  {
    amqp::message m = sealed;
    s.open(m);  // the untouched message opens
    CHECK(m.body == "hello, sealed world");
  }
  std::size_t flips = 0, rejected = 0;
  auto try_flip = [&](auto field) {
    amqp::message m = sealed;
    std::string& f = field(m);
    for (std::size_t bit = 0; bit < 8 * f.size(); ++bit) {
      amqp::message t = m;
      std::string& g = field(t);
      g[bit / 8] = static_cast<char>(g[bit / 8] ^ (1 << (bit % 8)));
      const amqp::message before = t;
      ++flips;
      const std::string what = error_of([&] { s.open(t); });
      if (!what.empty()) ++rejected;
      else FAIL_CHECK("a flip of bit " << bit << " opened");
      CHECK(t.body == before.body);
      CHECK(shows_no_key(what));
    }
  };
  try_flip([](amqp::message& m) -> std::string& { return m.body; });  // nonce, ciphertext, tag
  try_flip([](amqp::message& m) -> std::string& {
    for (auto& h : m.headers)
      if (h.first == amqp::seal_header) return h.second;  // key id
    throw std::logic_error("no seal header");
  });
  try_flip([](amqp::message& m) -> std::string& {
    for (auto& h : m.headers)
      if (h.first == amqp::seal_header) return h.first;  // the header's name
    throw std::logic_error("no seal header");
  });
  try_flip([](amqp::message& m) -> std::string& { return m.routing_key; });
  try_flip([](amqp::message& m) -> std::string& { return m.message_id; });
  CHECK(flips == 8 * (sealed.body.size() + 2 + std::string(amqp::seal_header).size() + 6 + 4));
  CHECK(rejected == flips);

  // Truncated by any number of bytes, or grown by one, it does not open.
  for (std::size_t n = 0; n < sealed.body.size(); ++n) {
    amqp::message t = sealed;
    t.body.resize(n);
    CHECK_FALSE(error_of([&] { s.open(t); }).empty());
  }
  amqp::message longer = sealed;
  longer.body.push_back('\0');
  CHECK(error_of([&] { s.open(longer); }).find("authentication failed") != std::string::npos);
  amqp::message shorter = sealed;
  shorter.body.resize(5);
  CHECK(error_of([&] { s.open(shorter); }).find("truncated") != std::string::npos);
  amqp::message plain = sample();
  CHECK(error_of([&] { s.open(plain); }).find("not sealed") != std::string::npos);
}

TEST_CASE("key rotation: the old key opens while listed, and fails clearly once removed", "[amqp][seal]") {
  const amqp::sealer before = one_key("2026-a", hex1);
  amqp::message old_msg = sample("sealed before the rotation");
  before.seal(old_msg);

  const amqp::sealer rotated = amqp::sealer::parse("2026-b:" + hex2 + "\n2026-a:" + hex1);
  CHECK(rotated.sealing_key_id() == "2026-b");
  CHECK(rotated.key_count() == 2);
  amqp::message new_msg = sample("sealed after the rotation");
  rotated.seal(new_msg);
  CHECK(*header(new_msg, amqp::seal_header) == "2026-b");
  {
    amqp::message m = old_msg;
    rotated.open(m);
    CHECK(m.body == "sealed before the rotation");
  }
  // The old sealer does not know the new key.
  {
    amqp::message m = new_msg;
    CHECK(error_of([&] { before.open(m); }) == "runnel::amqp::sealer: unknown key id '2026-b'");
  }
  const amqp::sealer after = one_key("2026-b", hex2);
  amqp::message m = old_msg;
  CHECK(error_of([&] { after.open(m); }) == "runnel::amqp::sealer: unknown key id '2026-a'");
  amqp::message n = new_msg;
  after.open(n);
  CHECK(n.body == "sealed after the rotation");

  // Same id, other key bytes (a key replaced without a new id): refused.
  const amqp::sealer replaced = one_key("2026-a", hex2);
  amqp::message o = old_msg;
  CHECK(error_of([&] { replaced.open(o); }).find("authentication failed (key id '2026-a')") != std::string::npos);
}

TEST_CASE("keys from text, a file and the environment; errors never show key bytes", "[amqp][seal]") {
  const amqp::sealer s = amqp::sealer::parse("# keys\n\nk2:" + hex2 + "\r\nk1:" + hex1 + "\n");
  CHECK(s.sealing_key_id() == "k2");
  CHECK(s.key_count() == 2);

  char path[] = "/tmp/runnel-seal-keysXXXXXX";
  const int fd = ::mkstemp(path);
  REQUIRE(fd >= 0);
  ::close(fd);
  {
    std::ofstream(path) << "k1:" << hex1 << "\n";
  }
  amqp::message m = sample();
  amqp::sealer::from_file(path).seal(m);
  ::setenv("RUNNEL_SEAL_TEST_KEYS", ("k9:" + hex2 + ",k1:" + hex1).c_str(), 1);
  const amqp::sealer e = amqp::sealer::from_env("RUNNEL_SEAL_TEST_KEYS");
  CHECK(e.sealing_key_id() == "k9");
  e.open(m);
  CHECK(m.body == "hello, sealed world");
  std::remove(path);

  // Every malformed form is refused; no message shows key bytes.
  std::vector<std::string> errors;
  const std::string short_hex = hex1.substr(0, 63);
  for (const std::string& text :
       {std::string(""), std::string("# only a comment\n"), hex1, "k1=" + hex1, "k1:" + short_hex,
        "k1:" + hex1 + "0", "k1:" + hex1.substr(0, 62) + "zz", ":" + hex1, "bad/id:" + hex1,
        hex1 + ":" + hex1, "k1:" + hex1 + "\nk1:" + hex2, std::string(40, 'a') + ":" + hex1}) {
    errors.push_back(error_of([&] { (void)amqp::sealer::parse(text); }));
    INFO("text " << errors.size());
    CHECK_FALSE(errors.back().empty());
    CHECK(shows_no_key(errors.back()));
  }
  errors.push_back(error_of([] { (void)amqp::sealer::from_file("/nonexistent/runnel.keys"); }));
  CHECK(errors.back() == "runnel::amqp::sealer: cannot read key file '/nonexistent/runnel.keys'");
  ::unsetenv("RUNNEL_SEAL_TEST_KEYS");
  errors.push_back(error_of([] { (void)amqp::sealer::from_env("RUNNEL_SEAL_TEST_KEYS"); }));
  CHECK(errors.back() == "runnel::amqp::sealer: RUNNEL_SEAL_TEST_KEYS is not set");
  // A key pasted where the id goes is not echoed as an "unknown key id".
  amqp::message pasted = sample();
  one_key().seal(pasted);
  for (auto& h : pasted.headers)
    if (h.first == amqp::seal_header) h.second = hex2;
  errors.push_back(error_of([&] { one_key().open(pasted); }));
  CHECK(errors.back() == "runnel::amqp::sealer: unknown key id '?'");
  for (const auto& w : errors) CHECK(shows_no_key(w));
}
