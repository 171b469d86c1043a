// TLS options of the RabbitMQ bridge (amqps://) and their URL query keys and
// environment variables (no broker library needed for this header; the
// socket is made in tls_socket.hpp).
//
// Safe by default: amqps:// verifies the broker's certificate chain (against
// ca_file, or the system CA store when none is given) and that the
// certificate names the host connected to, and never negotiates below TLS
// 1.2. Turning a check off takes an option whose name says what it costs.
//
// URL query keys (amqps:// only; the names RabbitMQ's own URI spec uses):
//   cacertfile    PEM file of the CA certificates to trust (default: system store)
//   certfile      PEM client certificate (mutual TLS); needs keyfile
//   keyfile       PEM private key of certfile; needs certfile
//   auth_mechanism  plain (default) or external: log in with the identity of
//                 the client certificate (broker plugin rabbitmq_auth_mechanism_ssl)
//   insecure_skip_peer_verification=true      trust any certificate
//   insecure_skip_hostname_verification=true  trust a certificate for another host
// Environment (read by connection_options::from_env; a URL key wins):
//   RUNNEL_AMQP_CACERTFILE, RUNNEL_AMQP_CERTFILE, RUNNEL_AMQP_KEYFILE
// Only file names travel in options and error messages, never key material.
#pragma once

#include <cstdlib>
#include <string>
#include <string_view>

#include "error.hpp"

namespace runnel::amqp {

struct tls_options {
  // Set by amqps://; every other field is ignored (and rejected in a URL)
  // without it.
  bool enabled = false;
  // PEM file of trusted CA certificates; empty: the system CA store.
  std::string ca_file{};
  // Client certificate and its private key, PEM (mutual TLS): both or neither.
  std::string cert_file{};
  std::string key_file{};
  // Log in with SASL EXTERNAL: the broker takes the identity from the client
  // certificate (needs cert_file; no password is sent).
  bool external_login = false;
  // Accept a broker certificate that does not chain to a trusted CA:
  // anybody on the path can then read and change the traffic.
  bool insecure_skip_peer_verification = false;
  // Accept a trusted certificate issued for another host name: any holder of
  // a certificate from the same CA can then impersonate the broker.
  bool insecure_skip_hostname_verification = false;
};

namespace detail {

inline bool parse_bool(std::string_view v, std::string_view key) {
  if (v == "true" || v == "1") return true;
  if (v == "false" || v == "0") return false;
  throw error("runnel::amqp: URL query key '" + std::string(key) + "' wants true or false, got '" +
              std::string(v) + "'");
}

// Applies a TLS query key; false when k is not one (the caller reports it).
inline bool parse_tls_key(tls_options& t, std::string_view k, std::string_view v) {
  if (k == "cacertfile") t.ca_file = std::string(v);
  else if (k == "certfile") t.cert_file = std::string(v);
  else if (k == "keyfile") t.key_file = std::string(v);
  else if (k == "auth_mechanism") {
    if (v == "external" || v == "EXTERNAL") t.external_login = true;
    else if (v == "plain" || v == "PLAIN") t.external_login = false;
    else throw error("runnel::amqp: URL query key 'auth_mechanism' wants plain or external, got '" +
                     std::string(v) + "'");
  } else if (k == "insecure_skip_peer_verification") t.insecure_skip_peer_verification = parse_bool(v, k);
  else if (k == "insecure_skip_hostname_verification") t.insecure_skip_hostname_verification = parse_bool(v, k);
  else return false;
  if (!t.enabled) throw error("runnel::amqp: URL query key '" + std::string(k) + "' needs amqps://");
  return true;
}

// Fills what the URL left unset from RUNNEL_AMQP_{CACERTFILE,CERTFILE,KEYFILE}.
inline void apply_tls_env(tls_options& t) {
  if (!t.enabled) return;
  const auto fill = [](std::string& field, const char* var) {
    if (const char* v = std::getenv(var); field.empty() && v != nullptr) field = v;
  };
  fill(t.ca_file, "RUNNEL_AMQP_CACERTFILE");
  fill(t.cert_file, "RUNNEL_AMQP_CERTFILE");
  fill(t.key_file, "RUNNEL_AMQP_KEYFILE");
}

// Throws on a combination that cannot work.
inline void check_tls(const tls_options& t) {
  if (!t.enabled) return;
  if (t.cert_file.empty() != t.key_file.empty())
    throw error("runnel::amqp: a client certificate needs both certfile and keyfile");
  if (t.external_login && t.cert_file.empty())
    throw error("runnel::amqp: EXTERNAL login needs a client certificate (certfile and keyfile)");
}

}  // namespace detail
}  // namespace runnel::amqp
