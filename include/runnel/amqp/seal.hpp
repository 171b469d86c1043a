// runnel::amqp::sealer: authenticated encryption of message bodies
// (AES-256-GCM through OpenSSL's EVP API), so that a broker, or anybody who
// can read or write its queues, sees neither the bodies nor can change a
// body, routing key or message id unnoticed.
//
//   auto s = std::make_shared<const runnel::amqp::sealer>(
//       runnel::amqp::sealer::from_file("/etc/app/seal.keys"));
//   client.publish({.routing_key = "out", .seal = s});   // sealed before publishing
//   client.consume({.queue = "in", .open = s});          // opened before any stage
//
// Sealed message (format 1):
//   body   = nonce (12 random bytes, RAND_bytes) || ciphertext || tag (16 bytes)
//   header "x-runnel-seal" = the key id (which key sealed it)
//   AAD    = "runnel-seal-1" 0x00
//            || be32(len key id)      || key id
//            || be32(len routing key) || routing key
//            || be32(len message id)  || message id
// The AAD binds the key id, the routing key the message is published with
// and its message id (empty when it has none): a message replayed under
// another routing key or id, or with another key id, does not open. Each
// field is length-prefixed, so no two field tuples give the same AAD.
//
// Keys. One or more 256-bit keys, each with an id (1-32 characters of
// [A-Za-z0-9._-]). The first key seals; every key opens what it sealed. To
// rotate: put the new key first and keep the old one listed until no message
// sealed with it is left in any queue; then remove it.
// Text form (file or environment variable): one key a line, `id:hex64`
// (64 hex digits), blank lines and lines starting with '#' ignored; in an
// environment variable keys may also be separated by ',' or spaces.
//
// Failures. open() throws seal_error (an amqp::error) naming what failed
// (not sealed, unknown key id, truncated, authentication failed) and the key
// id; never key bytes. No message, log line or statistic holds key material;
// the key bytes are wiped (OPENSSL_cleanse) when the sealer is destroyed.
// A consumer with `.open` dead-letters a message that does not open at once
// (no retries: it cannot get better), with the reason in x-runnel-error, and
// counts it in client_stats::unopened; no stage ever sees it.
//
// Threads: a const sealer may be used from any number of threads.
#pragma once

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "delivery.hpp"
#include "error.hpp"

namespace runnel::amqp {

// A message that failed to open, or a malformed key list.
class seal_error : public error {
 public:
  using error::error;
};

inline constexpr const char* seal_header = "x-runnel-seal";

class sealer {
 public:
  static constexpr std::size_t key_size = 32;
  static constexpr std::size_t nonce_size = 12;
  static constexpr std::size_t tag_size = 16;
  static constexpr std::size_t overhead = nonce_size + tag_size;
  static constexpr std::size_t max_key_id = 32;
  using key_bytes = std::array<unsigned char, key_size>;

  // The first key seals; all open. Throws seal_error on no key, a bad or
  // repeated id.
  explicit sealer(std::vector<std::pair<std::string, key_bytes>> keys) : keys_(std::move(keys)) {
    if (keys_.empty()) throw seal_error("runnel::amqp::sealer: no key given");
    for (std::size_t i = 0; i < keys_.size(); ++i) {
      check_id(keys_[i].first);
      for (std::size_t j = 0; j < i; ++j)
        if (keys_[j].first == keys_[i].first)
          throw seal_error("runnel::amqp::sealer: key id '" + keys_[i].first + "' is listed twice");
    }
  }
  // Movable (to build one from parse()), never copied: key bytes live once.
  sealer(sealer&&) noexcept = default;
  sealer(const sealer&) = delete;
  sealer& operator=(const sealer&) = delete;
  sealer& operator=(sealer&&) = delete;
  ~sealer() {
    for (auto& k : keys_) OPENSSL_cleanse(k.second.data(), k.second.size());
  }

  // Parses the text form (see the top of this file). `source` names where
  // the text came from in error messages (a file or variable name).
  static sealer parse(std::string_view text, std::string_view source = "key list") {
    std::vector<std::pair<std::string, key_bytes>> keys;
    while (!text.empty()) {
      const auto end = text.find_first_of("\n, \t\r");
      std::string_view item = text.substr(0, end);
      const bool newline = end != std::string_view::npos && text[end] == '\n';
      text = end == std::string_view::npos ? std::string_view{} : text.substr(end + 1);
      if (item.empty()) continue;
      if (item.front() == '#') {  // a comment: skip to the end of the line
        if (!newline) {
          const auto nl = text.find('\n');
          text = nl == std::string_view::npos ? std::string_view{} : text.substr(nl + 1);
        }
        continue;
      }
      // Never echo the item: it may hold key bytes.
      const auto colon = item.find(':');
      const std::string where = std::string(source) + ", key " + std::to_string(keys.size() + 1);
      if (colon == std::string_view::npos)
        throw seal_error("runnel::amqp::sealer: " + where + ": expected id:hex64");
      std::pair<std::string, key_bytes> k;
      k.first = std::string(item.substr(0, colon));
      const std::string_view hex = item.substr(colon + 1);
      if (hex.size() != 2 * key_size)
        throw seal_error("runnel::amqp::sealer: " + where + " ('" + safe_id(k.first) + "'): the key must be " +
                         std::to_string(2 * key_size) + " hex digits, got " + std::to_string(hex.size()) +
                         " characters");
      for (std::size_t i = 0; i < key_size; ++i) {
        const int hi = hex_value(hex[2 * i]), lo = hex_value(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
          OPENSSL_cleanse(k.second.data(), k.second.size());
          throw seal_error("runnel::amqp::sealer: " + where + " ('" + safe_id(k.first) +
                           "'): the key has a non-hex character");
        }
        k.second[i] = static_cast<unsigned char>(hi * 16 + lo);
      }
      keys.push_back(std::move(k));
    }
    if (keys.empty()) throw seal_error("runnel::amqp::sealer: " + std::string(source) + " holds no key");
    return sealer(std::move(keys));
  }

  static sealer from_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw seal_error("runnel::amqp::sealer: cannot read key file '" + path + "'");
    std::ostringstream ss;
    ss << in.rdbuf();
    std::string text = ss.str();
    try {
      sealer s = parse(text, "key file '" + path + "'");
      OPENSSL_cleanse(text.data(), text.size());
      return s;
    } catch (...) {
      OPENSSL_cleanse(text.data(), text.size());
      throw;
    }
  }

  static sealer from_env(const char* var = "RUNNEL_AMQP_SEAL_KEYS") {
    const char* v = std::getenv(var);
    if (v == nullptr || *v == '\0') throw seal_error(std::string("runnel::amqp::sealer: ") + var + " is not set");
    return parse(v, std::string("environment variable ") + var);
  }

  const std::string& sealing_key_id() const noexcept { return keys_.front().first; }
  std::size_t key_count() const noexcept { return keys_.size(); }

  // Seals m.body in place for publishing with routing key `routing_key`
  // (the one the message will carry; m.routing_key when empty) and sets the
  // x-runnel-seal header. Throws seal_error only if OpenSSL fails.
  void seal(message& m, std::string_view routing_key = {}) const {
    const auto& [id, key] = keys_.front();
    const std::string aad = associated_data(id, routing_key.empty() ? m.routing_key : routing_key, m.message_id);
    std::string out(overhead + m.body.size(), '\0');
    auto* o = reinterpret_cast<unsigned char*>(out.data());
    if (RAND_bytes(o, static_cast<int>(nonce_size)) != 1)
      throw seal_error("runnel::amqp::sealer: RAND_bytes failed");
    gcm(true, key, o, aad, reinterpret_cast<const unsigned char*>(m.body.data()), m.body.size(), o + nonce_size,
        o + nonce_size + m.body.size());
    m.body = std::move(out);
    set_header(m, id);
  }

  // Opens a sealed m in place (routing key and message id as delivered) and
  // removes the x-runnel-seal header; throws seal_error saying why not, and
  // then leaves m unchanged.
  void open(message& m) const {
    auto h = m.headers.end();
    for (auto it = m.headers.begin(); it != m.headers.end(); ++it)
      if (it->first == seal_header) h = it;
    if (h == m.headers.end())
      throw seal_error("runnel::amqp::sealer: the message is not sealed (no x-runnel-seal header)");
    const key_bytes* key = nullptr;
    for (const auto& k : keys_)
      if (k.first == h->second) key = &k.second;
    if (key == nullptr) throw seal_error("runnel::amqp::sealer: unknown key id '" + safe_id(h->second) + "'");
    if (m.body.size() < overhead)
      throw seal_error("runnel::amqp::sealer: truncated message (" + std::to_string(m.body.size()) +
                       " bytes, a sealed body has at least " + std::to_string(overhead) + ")");
    const std::string aad = associated_data(h->second, m.routing_key, m.message_id);
    const std::size_t n = m.body.size() - overhead;
    std::string plain(n, '\0');
    const auto* in = reinterpret_cast<const unsigned char*>(m.body.data());
    if (!gcm(false, *key, in, aad, in + nonce_size, n, reinterpret_cast<unsigned char*>(plain.data()),
             const_cast<unsigned char*>(in + nonce_size + n))) {
      OPENSSL_cleanse(plain.data(), plain.size());  // unauthenticated bytes go nowhere
      throw seal_error("runnel::amqp::sealer: authentication failed (key id '" + h->second +
                       "'): the message was altered, or sealed with another key or routing key");
    }
    m.body = std::move(plain);
    m.headers.erase(h);
  }

  // The associated data of format 1 (see the top of this file).
  static std::string associated_data(std::string_view key_id, std::string_view routing_key,
                                     std::string_view message_id) {
    static constexpr std::string_view domain{"runnel-seal-1\0", 14};
    std::string a;
    a.reserve(domain.size() + 12 + key_id.size() + routing_key.size() + message_id.size());
    a.append(domain);
    for (std::string_view f : {key_id, routing_key, message_id}) {
      const auto len = static_cast<std::uint32_t>(f.size());
      for (int shift = 24; shift >= 0; shift -= 8) a.push_back(static_cast<char>((len >> shift) & 0xff));
      a.append(f);
    }
    return a;
  }

  // One AES-256-GCM operation with a 96-bit nonce (encrypt: writes out and
  // tag; decrypt: reads tag, writes out, false when the tag does not verify).
  // Public for the known-answer tests.
  //
  // Each thread keeps one cipher context (cipher_context below), and the
  // cipher is fetched from OpenSSL's provider once: creating a context and
  // fetching the cipher for every message cost about as much as sealing a
  // 1 KiB body. The context is reset after every message, which wipes the
  // key schedule, so no key outlives the operation in it.
  static bool gcm(bool encrypt, const key_bytes& key, const unsigned char* nonce, std::string_view aad,
                  const unsigned char* in, std::size_t n, unsigned char* out, unsigned char* tag) {
    EVP_CIPHER_CTX* c = cipher_context();
    struct wipe {
      EVP_CIPHER_CTX* c;
      explicit wipe(EVP_CIPHER_CTX* x) noexcept : c(x) {}
      wipe(const wipe&) = delete;
      wipe& operator=(const wipe&) = delete;
      ~wipe() { EVP_CIPHER_CTX_reset(c); }
    } const wiped{c};
    const auto init = encrypt ? EVP_EncryptInit_ex : EVP_DecryptInit_ex;
    int len = 0;
    bool ok = init(c, aes_256_gcm(), nullptr, nullptr, nullptr) == 1 &&
              EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(nonce_size), nullptr) == 1 &&
              init(c, nullptr, nullptr, key.data(), nonce) == 1;
    const auto update = encrypt ? EVP_EncryptUpdate : EVP_DecryptUpdate;
    if (ok && !aad.empty())
      ok = update(c, nullptr, &len, reinterpret_cast<const unsigned char*>(aad.data()),
                  static_cast<int>(aad.size())) == 1;
    // EVP takes int lengths: feed big bodies in chunks.
    constexpr std::size_t chunk = std::size_t{1} << 30;
    for (std::size_t off = 0; ok && off < n; off += chunk) {
      const int part = static_cast<int>(std::min(chunk, n - off));
      ok = update(c, out + off, &len, in + off, part) == 1;
    }
    if (!ok) throw seal_error("runnel::amqp::sealer: AES-256-GCM setup failed in OpenSSL");
    if (encrypt) {
      if (EVP_EncryptFinal_ex(c, out + n, &len) != 1 ||
          EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, static_cast<int>(tag_size), tag) != 1)
        throw seal_error("runnel::amqp::sealer: AES-256-GCM sealing failed in OpenSSL");
      return true;
    }
    if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, static_cast<int>(tag_size), tag) != 1)
      throw seal_error("runnel::amqp::sealer: AES-256-GCM setup failed in OpenSSL");
    return EVP_DecryptFinal_ex(c, out + n, &len) == 1;
  }

  // Cipher contexts created so far, by every thread (a test hook: one
  // thread's sealing and opening create two, however many messages).
  static std::uint64_t contexts_created() noexcept {
    return context_count().load(std::memory_order_relaxed);  // relaxed: a counter read by tests
  }

 private:
  static std::atomic<std::uint64_t>& context_count() noexcept {
    static std::atomic<std::uint64_t> n{0};
    return n;
  }

  // AES-256-GCM, fetched from the default provider once (kept for the
  // program's life); the built-in (implicitly fetched) one if that fails.
  static const EVP_CIPHER* aes_256_gcm() noexcept {
    static const EVP_CIPHER* const cipher = [] {
      const EVP_CIPHER* f = EVP_CIPHER_fetch(nullptr, "AES-256-GCM", nullptr);
      return f != nullptr ? f : EVP_aes_256_gcm();
    }();
    return cipher;
  }

  // This thread's cipher context, created on first use and freed when the
  // thread ends; gcm() resets it after every message.
  static EVP_CIPHER_CTX* cipher_context() {
    struct holder {
      EVP_CIPHER_CTX* ctx = nullptr;
      holder() = default;
      holder(const holder&) = delete;
      holder& operator=(const holder&) = delete;
      ~holder() { EVP_CIPHER_CTX_free(ctx); }
    };
    thread_local holder h;
    if (h.ctx != nullptr) return h.ctx;
    h.ctx = EVP_CIPHER_CTX_new();
    if (h.ctx == nullptr) throw seal_error("runnel::amqp::sealer: EVP_CIPHER_CTX_new failed");
    context_count().fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
    return h.ctx;
  }

  static int hex_value(char c) noexcept {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }
  static bool id_char(char c) noexcept {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
           c == '-';
  }
  static void check_id(const std::string& id) {
    if (id.empty() || id.size() > max_key_id)
      throw seal_error("runnel::amqp::sealer: a key id must have 1 to " + std::to_string(max_key_id) +
                       " characters");
    for (char c : id)
      if (!id_char(c))
        throw seal_error("runnel::amqp::sealer: a key id has a character outside [A-Za-z0-9._-]");
  }
  // An id as it may be shown: ids are not secret, but a mistyped line could
  // put key bytes where the id goes, so show only short, well-formed ids.
  static std::string safe_id(std::string_view id) {
    if (id.size() > max_key_id) return "?";
    for (char c : id)
      if (!id_char(c)) return "?";
    return std::string(id);
  }
  static void set_header(message& m, const std::string& id) {
    for (auto& h : m.headers)
      if (h.first == seal_header) {
        h.second = id;
        return;
      }
    m.headers.emplace_back(seal_header, id);
  }

  std::vector<std::pair<std::string, key_bytes>> keys_;
};

}  // namespace runnel::amqp
