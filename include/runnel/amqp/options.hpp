// Options of the RabbitMQ bridge, and the parsing of amqp:// URLs into them
// (no broker library needed for this header).
//
//   amqp://user:password@host:port/vhost?heartbeat=10&connect_timeout=5
//   amqp://user:password@host1:port1,host2:port2/vhost   (several brokers)
//
// - user and password default to guest/guest, host to 127.0.0.1, port to
//   5672; "[::1]" style hosts are accepted. Several "host[:port]" separated
//   by commas (one user, vhost and query for all) become several endpoints,
//   tried in that order at connect and rotated through at each reconnect.
// - The vhost is the percent-decoded path after the first '/': no path means
//   "/", "amqp://h/" means the empty vhost, "%2f" is "/".
// - Query keys (any other key is an error, so a typo is never silently
//   ignored):
//     heartbeat        seconds, 0..65535 (0 = off); default 10
//     connect_timeout  seconds, 1..3600; bounds TCP connect, login and every
//                      RPC (so each connect error comes within it); default 5
//     frame_max        bytes, 4096..2147483647; default 131072
//   and, for amqps://, the TLS keys of tls.hpp (cacertfile, certfile, keyfile,
//   auth_mechanism, insecure_skip_*_verification).
// - amqps:// is TLS (port 5671 by default) with the broker's certificate and
//   host name verified; see tls.hpp.
// - Error messages never repeat the password (nor, for TLS, key material).
#pragma once

#include <charconv>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "error.hpp"
#include "tls.hpp"

namespace runnel::amqp {

class sealer;  // seal.hpp (OpenSSL); only pointed to here

struct endpoint {
  std::string host = "127.0.0.1";
  int port = 5672;
};

namespace detail {

inline int hex_digit(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Percent-decodes s; throws on a truncated or non-hex escape.
inline std::string percent_decode(std::string_view s, std::string_view part) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out.push_back(s[i]);
      continue;
    }
    const int hi = i + 2 < s.size() ? hex_digit(s[i + 1]) : -1;
    const int lo = i + 2 < s.size() ? hex_digit(s[i + 2]) : -1;
    if (hi < 0 || lo < 0)
      throw error("runnel::amqp: bad percent escape in the " + std::string(part) + " of the URL");
    out.push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  return out;
}

// A decimal integer in [lo, hi]; throws naming the key otherwise.
inline long long parse_int(std::string_view v, long long lo, long long hi, std::string_view key) {
  long long x = 0;
  const auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec != std::errc{} || p != v.data() + v.size() || x < lo || x > hi)
    throw error("runnel::amqp: URL query key '" + std::string(key) + "' wants an integer in [" +
                std::to_string(lo) + ", " + std::to_string(hi) + "], got '" + std::string(v) + "'");
  return x;
}

// One "host[:port]" (or "[v6]:port") of the URL's host list.
// default_port: 5672 for amqp://, 5671 for amqps://.
inline endpoint parse_endpoint(std::string_view authority, int default_port) {
  endpoint ep;
  ep.port = default_port;
  std::string_view port;
  bool has_port = false;
  if (!authority.empty() && authority.front() == '[') {
    const auto close = authority.find(']');
    if (close == std::string_view::npos) throw error("runnel::amqp: unterminated '[' in the URL host");
    ep.host = std::string(authority.substr(1, close - 1));
    const std::string_view after = authority.substr(close + 1);
    if (!after.empty() && after.front() != ':') throw error("runnel::amqp: junk after ']' in the URL host");
    has_port = !after.empty();
    if (has_port) port = after.substr(1);
  } else {
    const auto colon = authority.find(':');
    ep.host = percent_decode(authority.substr(0, colon), "host");
    has_port = colon != std::string_view::npos;
    if (has_port) port = authority.substr(colon + 1);
  }
  if (ep.host.empty()) throw error("runnel::amqp: empty host in the URL");
  if (has_port && port.empty()) throw error("runnel::amqp: empty port in the URL");
  // The port's text is not echoed: in a URL whose password holds an
  // unescaped '/', '?' or '#' (or that lacks its '@host'), what reads as the
  // port is part of the password.
  if (!port.empty()) {
    try {
      ep.port = static_cast<int>(parse_int(port, 1, 65535, "port"));
    } catch (const error&) {
      throw error("runnel::amqp: the URL's port must be an integer in [1, 65535] (a password with '/', '?' or "
                  "'#' must be percent-encoded)");
    }
  }
  return ep;
}

}  // namespace detail

struct connection_options {
  // Tried in turn (rotating) at connect and at every reconnect.
  std::vector<endpoint> endpoints{endpoint{}};
  std::string user = "guest";
  std::string password = "guest";
  std::string vhost = "/";
  int heartbeat_s = 10;
  int connect_timeout_s = 5;
  int frame_max = 131072;
  // Reconnect backoff: first delay, doubled each failed attempt up to the
  // cap, each delay with +-50% jitter.
  int reconnect_initial_ms = 100;
  int reconnect_max_ms = 5000;
  // Consecutive failed reconnect attempts after which the client gives up
  // and reports the last error (0 = never give up).
  int reconnect_attempts = 0;
  // TLS (amqps://): CA file, client certificate, checks; see tls.hpp.
  tls_options tls{};

  static connection_options from_url(std::string_view url) {
    connection_options o = parse_url(url);
    detail::check_tls(o.tls);
    return o;
  }

  // Reads RUNNEL_AMQP_URL, and for amqps:// RUNNEL_AMQP_CACERTFILE,
  // RUNNEL_AMQP_CERTFILE, RUNNEL_AMQP_KEYFILE where the URL sets none;
  // throws when the URL is unset or malformed.
  static connection_options from_env(const char* var = "RUNNEL_AMQP_URL") {
    const char* v = std::getenv(var);
    if (v == nullptr || *v == '\0') throw error(std::string("runnel::amqp: ") + var + " is not set");
    connection_options o = parse_url(v);
    detail::apply_tls_env(o.tls);
    detail::check_tls(o.tls);
    return o;
  }

 private:
  static connection_options parse_url(std::string_view url) {
    connection_options o;
    o.tls.enabled = url.rfind("amqps://", 0) == 0;
    const std::string_view scheme = o.tls.enabled ? "amqps://" : "amqp://";
    if (url.rfind(scheme, 0) != 0) {
      // Name only the scheme: what follows may hold a password.
      const auto end = url.find("://");
      throw error("runnel::amqp: the URL must start with amqp:// or amqps:// (got '" +
                  (end == std::string_view::npos || end > 16 ? std::string("?") : std::string(url.substr(0, end))) +
                  "://')");
    }
    std::string_view rest = url.substr(scheme.size());
    std::string_view query;
    if (const auto q = rest.find('?'); q != std::string_view::npos) {
      query = rest.substr(q + 1);
      rest = rest.substr(0, q);
    }
    std::string_view authority = rest;
    if (const auto slash = rest.find('/'); slash != std::string_view::npos) {
      authority = rest.substr(0, slash);
      o.vhost = detail::percent_decode(rest.substr(slash + 1), "vhost");
    }
    if (const auto at = authority.rfind('@'); at != std::string_view::npos) {
      const std::string_view userinfo = authority.substr(0, at);
      authority = authority.substr(at + 1);
      const auto colon = userinfo.find(':');
      o.user = detail::percent_decode(userinfo.substr(0, colon), "user");
      o.password = colon == std::string_view::npos ? std::string{}
                                                   : detail::percent_decode(userinfo.substr(colon + 1), "password");
      if (o.user.empty()) throw error("runnel::amqp: empty user name in the URL");
    }
    o.endpoints.clear();
    for (;;) {
      const auto comma = authority.find(',');
      o.endpoints.push_back(detail::parse_endpoint(authority.substr(0, comma), o.tls.enabled ? 5671 : 5672));
      if (comma == std::string_view::npos) break;
      authority = authority.substr(comma + 1);
    }
    while (!query.empty()) {
      const auto amp = query.find('&');
      const std::string_view kv = query.substr(0, amp);
      query = amp == std::string_view::npos ? std::string_view{} : query.substr(amp + 1);
      if (kv.empty()) continue;
      const auto eq = kv.find('=');
      if (eq == std::string_view::npos)
        throw error("runnel::amqp: URL query key '" + std::string(kv) + "' has no value");
      const std::string_view k = kv.substr(0, eq), v = kv.substr(eq + 1);
      if (k == "heartbeat") o.heartbeat_s = static_cast<int>(detail::parse_int(v, 0, 65535, k));
      else if (k == "connect_timeout") o.connect_timeout_s = static_cast<int>(detail::parse_int(v, 1, 3600, k));
      else if (k == "frame_max") o.frame_max = static_cast<int>(detail::parse_int(v, 4096, 2147483647, k));
      else if (detail::parse_tls_key(o.tls, k, v)) continue;
      else
        throw error("runnel::amqp: unknown URL query key '" + std::string(k) +
                    "' (known: heartbeat, connect_timeout, frame_max, and for amqps:// cacertfile, certfile, "
                    "keyfile, auth_mechanism, insecure_skip_peer_verification, "
                    "insecure_skip_hostname_verification)");
    }
    return o;
  }
};

// What to do with a message whose processing threw (or that was fail()ed).
struct failure_policy {
  // Processing attempts before the message is dead-lettered (>= 1). The
  // attempt count travels in the message header "x-runnel-attempt", so it
  // survives redelivery and restarts.
  unsigned max_attempts = 5;
  // Where a message goes after max_attempts: published to this exchange with
  // this routing key ("" exchange + a queue name = straight to that queue),
  // with the error text in header "x-runnel-error". An empty routing key and
  // exchange means: drop it (acked, counted as dead-lettered).
  std::string dead_letter_exchange{};
  std::string dead_letter_routing_key{};
};

struct consume_options {
  std::string queue;
  // Unacked deliveries the broker may have outstanding to this consumer
  // (1..65535): this bounds the messages in the pipeline from this queue.
  unsigned prefetch = 256;
  // Declare the queue (durable, not exclusive) before consuming; off means it
  // must exist (a 404 otherwise).
  bool declare = false;
  failure_policy on_failure{};
  // Capacity of the channel into the pipeline (0: the prefetch).
  std::size_t capacity = 0;
  // Sealed messages (seal.hpp): each delivery is opened by the I/O thread
  // before it enters the channel; one that does not open is dead-lettered at
  // once (no retry) with the reason, counted in client_stats::unopened, and
  // never reaches a stage. A retried or dead-lettered failure is sealed again
  // with the sealing key, so no plaintext goes back to the broker.
  std::shared_ptr<const sealer> open{};
};

struct publish_options {
  std::string exchange{};
  // Routing key of every message published (empty: the message's own).
  std::string routing_key{};
  bool persistent = true;
  // Capacity of the channel from the pipeline (results waiting to be sent).
  std::size_t capacity = 1024;
  // Sealed messages (seal.hpp): each body is sealed by the I/O thread with
  // the sealer's first key, binding the routing key it is published with.
  std::shared_ptr<const sealer> seal{};
};

}  // namespace runnel::amqp
