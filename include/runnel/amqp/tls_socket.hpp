// The one place the bridge makes its socket: plain TCP, or TLS set up from
// tls_options (rabbitmq-c's OpenSSL socket), and the words for a failed TLS
// connect.
//
// rabbitmq-c 0.11 does not default to TLS 1.2+ and does not load the system
// CA store; both are done here. It checks the chain and the host name when
// asked (both on unless an insecure_* option says otherwise).
#pragma once

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <string>

#include "error.hpp"
#include "tls.hpp"

namespace runnel::amqp::detail {

// The reason of the newest error OpenSSL queued on this thread ("certificate
// verify failed", "sslv3 alert certificate expired", ...), or "" when none;
// empties the queue. Reason strings name no key material.
inline std::string take_tls_reason() {
  unsigned long last = 0;
  while (const unsigned long e = ERR_get_error()) last = e;
  if (last == 0) return {};
  const char* r = ERR_reason_error_string(last);
  return r != nullptr ? r : "error " + std::to_string(ERR_GET_REASON(last));
}

// A new socket on conn (owned by it) for the options; throws error naming
// the file that could not be used (never its contents).
inline amqp_socket_t* new_socket(amqp_connection_state_t conn, const tls_options& t) {
  if (!t.enabled) {
    amqp_socket_t* s = amqp_tcp_socket_new(conn);
    if (s == nullptr) throw error("runnel::amqp: cannot create a socket");
    return s;
  }
  check_tls(t);
  ERR_clear_error();
  amqp_socket_t* s = amqp_ssl_socket_new(conn);
  if (s == nullptr) throw error("runnel::amqp: cannot create a TLS socket: " + take_tls_reason());
  if (amqp_ssl_socket_set_ssl_versions(s, AMQP_TLSv1_2, AMQP_TLSvLATEST) != AMQP_STATUS_OK)
    throw error("runnel::amqp: cannot set TLS 1.2 as the lowest TLS version");
  if (!t.ca_file.empty()) {
    if (amqp_ssl_socket_set_cacert(s, t.ca_file.c_str()) != AMQP_STATUS_OK)
      throw error("runnel::amqp: cannot load the CA file '" + t.ca_file + "': " + take_tls_reason());
  } else if (SSL_CTX_set_default_verify_paths(static_cast<SSL_CTX*>(amqp_ssl_socket_get_context(s))) != 1) {
    throw error("runnel::amqp: cannot load the system CA store: " + take_tls_reason());
  }
  if (!t.cert_file.empty() && amqp_ssl_socket_set_key(s, t.cert_file.c_str(), t.key_file.c_str()) != AMQP_STATUS_OK)
    throw error("runnel::amqp: cannot load the client certificate '" + t.cert_file + "' with key file '" +
                t.key_file + "': " + take_tls_reason());
  amqp_ssl_socket_set_verify_peer(s, t.insecure_skip_peer_verification ? 0 : 1);
  amqp_ssl_socket_set_verify_hostname(s, t.insecure_skip_hostname_verification ? 0 : 1);
  return s;
}

// Why a connect over TLS failed, for the message after "cannot connect to
// host:port: ".
inline std::string tls_connect_failure(int status, const std::string& host) {
  const std::string reason = take_tls_reason();
  const std::string why = reason.empty() ? std::string{} : " (" + reason + ")";
  switch (status) {
    case AMQP_STATUS_SSL_PEER_VERIFY_FAILED:
      return "TLS: the broker's certificate is not trusted" + why + "; wrong cacertfile?";
    case AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED:
      return "TLS: the broker's certificate is not issued for host '" + host + "'" + why;
    case AMQP_STATUS_SSL_CONNECTION_FAILED:
    case AMQP_STATUS_SSL_ERROR:
      return "TLS handshake failed" + why + "; is this a TLS port (amqps://), does the broker accept our "
             "certificate?";
    default:
      return amqp_error_string2(status) + why;
  }
}

// Why the peer hung up before the AMQP handshake began (after "login ...
// failed: ").
inline std::string login_hangup_reason(const tls_options& t) {
  if (!t.enabled) return "the peer closed the connection before the AMQP handshake; is this a TLS port (amqps://)?";
  const std::string reason = take_tls_reason();
  return "the broker ended the TLS session before the AMQP handshake" +
         (reason.empty() ? std::string{} : " (" + reason + ")") +
         "; did it refuse our client certificate (none, expired, or not from a CA it trusts)?";
}

}  // namespace runnel::amqp::detail
