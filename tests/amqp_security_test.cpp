// The RabbitMQ bridge's security: TLS (amqps://) with certificate checks and
// mutual TLS, EXTERNAL login, and least-privilege users. One broker for the
// whole program (tests/amqp/broker.sh with RUNNEL_BROKER_TLS=1: a throwaway
// CA, a server certificate for DNS:localhost only, client certificates, a
// TLS listener that wants one), with users, permissions and topology loaded
// from a definitions file at boot (no rabbitmqctl round trips).
#include <catch2/catch.hpp>

#include <runnel/amqp.hpp>
#include <runnel/pipeline.hpp>
#include <runnel/thread_pool.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <future>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "amqp/broker.hpp"

using namespace std::chrono_literals;
namespace amqp = runnel::amqp;
using runnel_test::broker;
using runnel_test::raw;

namespace {

// Passwords of the restricted users; none may ever show in an error message.
// The definitions carry rabbit_password_hashing_sha256 hashes:
// base64(salt + sha256(salt + password)) with a fixed 4-byte salt.
constexpr const char* reader_pw = "rd-8c1f-secret";  // read ^acl\.in$ only
constexpr const char* writer_pw = "wr-5d2e-secret";  // write ^acl\.ex$ only
constexpr const char* worker_pw = "wk-7a3b-secret";  // read ^acl\.work$, write ^acl\.ex$

constexpr const char* definitions = R"({
 "vhosts": [{"name": "/"}],
 "users": [
  {"name": "guest", "password_hash": "AQIDBEMMOXwY6PKx/JKP9PAqfsb4ozuD0Ta3pxxa9gEYBMmD",
   "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["administrator"]},
  {"name": "reader", "password_hash": "BQYHCOQ1WVMCcSdKy6bv2Z1qMeDeIfVG/CIBHS4rtb5uCQCW",
   "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []},
  {"name": "writer", "password_hash": "CQoLDJzZ4r15+hxA1CTJV6m9Dj0jLQDQPpM5yPGcrpp/TpTd",
   "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []},
  {"name": "worker", "password_hash": "DQ4PEPmSjLB2yBi/ndKUuFVwM1eGD31iboL1PYsu5kISHR30",
   "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []},
  {"name": "runnel-client", "password_hash": "", "hashing_algorithm": "rabbit_password_hashing_sha256",
   "tags": []}
 ],
 "permissions": [
  {"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"},
  {"user": "reader", "vhost": "/", "configure": "^$", "write": "^$", "read": "^acl\\.in$"},
  {"user": "writer", "vhost": "/", "configure": "^$", "write": "^acl\\.ex$", "read": "^$"},
  {"user": "worker", "vhost": "/", "configure": "^$", "write": "^acl\\.ex$", "read": "^acl\\.work$"},
  {"user": "runnel-client", "vhost": "/", "configure": "^$", "write": "^amq\\.default$", "read": "^acl\\.ext$"}
 ],
 "queues": [
  {"name": "acl.in", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}},
  {"name": "acl.other", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}},
  {"name": "acl.out", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}},
  {"name": "acl.work", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}},
  {"name": "acl.ext", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}},
  {"name": "tls.in", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}},
  {"name": "tls.out", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}}
 ],
 "exchanges": [
  {"name": "acl.ex", "vhost": "/", "type": "direct", "durable": true, "auto_delete": false,
   "internal": false, "arguments": {}},
  {"name": "acl.forbidden", "vhost": "/", "type": "direct", "durable": true, "auto_delete": false,
   "internal": false, "arguments": {}}
 ],
 "bindings": [
  {"source": "acl.ex", "vhost": "/", "destination": "acl.out", "destination_type": "queue",
   "routing_key": "out", "arguments": {}}
 ]
})";

// The program's broker, started with TLS and the definitions above.
broker* tls_broker() {
  static const bool once = [] {
    char path[] = "/tmp/runnel-defs-XXXXXX";
    const int fd = ::mkstemp(path);
    if (fd < 0) return false;
    const std::string d = definitions;
    const bool ok = ::write(fd, d.data(), d.size()) == static_cast<ssize_t>(d.size());
    ::close(fd);
    ::chmod(path, 0644);
    ::setenv("RUNNEL_BROKER_TLS", "1", 1);
    ::setenv("RUNNEL_BROKER_DEFINITIONS", path, 1);
    broker::get();  // starts it (copies the definitions)
    ::unlink(path);
    return ok;
  }();
  (void)once;
  return broker::get();
}

std::string tls_dir(const broker& b) { return b.dir() + "/tls"; }

// amqps:// URL to host:TLS port with the given query (connect_timeout=3 added).
std::string tls_url(const broker& b, const std::string& host, const std::string& query,
                    const std::string& userinfo = "guest:guest@") {
  return "amqps://" + userinfo + host + ":" + b.env_value("TLS_PORT") + "/%2f?connect_timeout=3&" + query;
}

// The mutual-TLS query with our CA and client certificate.
std::string good_tls(const broker& b, const std::string& cert = "client") {
  const std::string t = tls_dir(b);
  return "cacertfile=" + t + "/ca.pem&certfile=" + t + "/" + cert + ".pem&keyfile=" + t + "/" + cert + ".key";
}

std::string plain_url(const broker& b, const std::string& user, const std::string& pw) {
  return "amqp://" + user + ":" + pw + "@127.0.0.1:" + std::to_string(b.port()) + "/%2f?connect_timeout=3";
}

// Every error message the tests saw, checked for secrets at the end.
std::vector<std::string>& seen_errors() {
  static std::vector<std::string> v;
  return v;
}

// Runs f, which must throw amqp::error; returns it (and records its text).
// Bounded: a connect that hangs fails the test instead of the run (the
// limit is generous and never a measurement).
template <class F>
amqp::error expect_error(F f) {
  auto fut = std::async(std::launch::async, [f]() -> std::string {
    try {
      f();
    } catch (const amqp::error& e) {
      return std::to_string(e.reply_code()) + "|" + e.what();
    }
    return "no error";
  });
  REQUIRE(fut.wait_for(60s) == std::future_status::ready);
  const std::string r = fut.get();
  REQUIRE(r != "no error");
  const auto bar = r.find('|');
  seen_errors().push_back(r.substr(bar + 1));
  return amqp::error(r.substr(bar + 1), std::stoi(r.substr(0, bar)));
}

amqp::error connect_error(const std::string& url) {
  return expect_error([url] { amqp::client c{amqp::connection_options::from_url(url)}; });
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

template <class Pred>
bool eventually(Pred pred, std::chrono::seconds limit = std::chrono::seconds(60)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(20ms);
  }
  return true;
}

std::string id_body(std::size_t i) { return std::to_string(i); }

}  // namespace

TEST_CASE("amqps URLs: TLS keys, defaults, and what is rejected", "[amqp][tls]") {
  const auto o = amqp::connection_options::from_url(
      "amqps://u:p@h/%2f?cacertfile=/c.pem&certfile=/a.pem&keyfile=/a.key&auth_mechanism=external");
  CHECK(o.tls.enabled);
  CHECK(o.endpoints[0].port == 5671);
  CHECK(o.tls.ca_file == "/c.pem");
  CHECK(o.tls.cert_file == "/a.pem");
  CHECK(o.tls.key_file == "/a.key");
  CHECK(o.tls.external_login);
  CHECK_FALSE(o.tls.insecure_skip_peer_verification);
  CHECK_FALSE(o.tls.insecure_skip_hostname_verification);
  CHECK_FALSE(amqp::connection_options::from_url("amqp://h/").tls.enabled);
  CHECK(amqp::connection_options::from_url("amqp://h/").endpoints[0].port == 5672);
  const auto off = amqp::connection_options::from_url(
      "amqps://h/?insecure_skip_peer_verification=true&insecure_skip_hostname_verification=1");
  CHECK(off.tls.insecure_skip_peer_verification);
  CHECK(off.tls.insecure_skip_hostname_verification);

  const char* bad[] = {"amqp://h/?cacertfile=/c.pem",          // TLS key without amqps://
                       "amqps://h/?certfile=/a.pem",           // certificate without key
                       "amqps://h/?keyfile=/a.key",            // key without certificate
                       "amqps://h/?auth_mechanism=external",   // EXTERNAL without certificate
                       "amqps://h/?auth_mechanism=kerberos",
                       "amqps://h/?insecure_skip_peer_verification=yes",
                       "amqps://h/?verify=verify_none"};       // not a key of ours: never ignored
  for (const char* u : bad) {
    INFO(u);
    CHECK_THROWS_AS(amqp::connection_options::from_url(u), amqp::error);
  }
  // A malformed scheme: the message must not echo the password after it.
  const auto e = expect_error([] { amqp::connection_options::from_url("amqpx://bob:pw-9f8e-secret@h/"); });
  CHECK(contains(e.what(), "amqpx://"));
  CHECK_FALSE(contains(e.what(), "pw-9"));

  // The environment supplies file names the URL leaves out.
  ::setenv("RUNNEL_TLS_TEST_URL", "amqps://h/?cacertfile=/from-url.pem", 1);
  ::setenv("RUNNEL_AMQP_CACERTFILE", "/from-env.pem", 1);
  ::setenv("RUNNEL_AMQP_CERTFILE", "/env.pem", 1);
  ::setenv("RUNNEL_AMQP_KEYFILE", "/env.key", 1);
  const auto env = amqp::connection_options::from_env("RUNNEL_TLS_TEST_URL");
  CHECK(env.tls.ca_file == "/from-url.pem");
  CHECK(env.tls.cert_file == "/env.pem");
  CHECK(env.tls.key_file == "/env.key");
  ::unsetenv("RUNNEL_AMQP_CACERTFILE");
  ::unsetenv("RUNNEL_AMQP_CERTFILE");
  ::unsetenv("RUNNEL_AMQP_KEYFILE");
}

TEST_CASE("round trip over mutual TLS: every id exactly once, nothing left unacked", "[amqp][tls][broker]") {
  broker* b = tls_broker();
  if (b == nullptr) return;
  const std::size_t n = 500;
  raw r(b->port());
  r.fresh_queue("tls.in");
  r.fresh_queue("tls.out");
  r.publish_n("tls.in", n, id_body);

  runnel::thread_pool pool({.threads = 2, .pin = false});
  amqp::client c{amqp::connection_options::from_url(tls_url(*b, "localhost", good_tls(*b)))};
  auto run = runnel::pipeline{pool}
                 .from(c.consume({.queue = "tls.in", .prefetch = 64}))
                 .stage([](amqp::delivery d) {
                   d.body = "r:" + d.body;
                   return d;
                 }, {.workers = 2})
                 .to(c.publish({.routing_key = "tls.out"}))
                 .run();
  REQUIRE(eventually([&] { return c.stats().acked >= n; }));
  c.close();
  run.wait();
  const auto got = r.take("tls.out", n + 1, 1000);
  REQUIRE(got.size() == n);
  std::vector<int> seen(n, 0);
  for (const auto& m : got) {
    REQUIRE(m.body.rfind("r:", 0) == 0);
    ++seen.at(std::stoul(m.body.substr(2)));
  }
  CHECK(std::count(seen.begin(), seen.end(), 1) == static_cast<long>(n));
  CHECK(c.stats().acked == n);
  CHECK(r.ready("tls.in") == 0);
}

TEST_CASE("TLS refusals are clear errors: wrong CA, host name mismatch, wrong protocol, bad certificates",
          "[amqp][tls][broker]") {
  broker* b = tls_broker();
  if (b == nullptr) return;
  const std::string t = tls_dir(*b);

  SECTION("a CA that did not sign the broker's certificate") {
    const auto e = connect_error(tls_url(*b, "localhost",
                                         "cacertfile=" + t + "/other-ca.pem&certfile=" + t +
                                             "/client.pem&keyfile=" + t + "/client.key"));
    CHECK(contains(e.what(), "certificate is not trusted"));
  }
  SECTION("no CA option: the system store, which does not hold our test CA") {
    const auto e = connect_error(
        tls_url(*b, "localhost", "certfile=" + t + "/client.pem&keyfile=" + t + "/client.key"));
    CHECK(contains(e.what(), "certificate is not trusted"));
  }
  SECTION("no CA option with the test CA as the system store (SSL_CERT_FILE): connects") {
    ::setenv("SSL_CERT_FILE", (t + "/ca.pem").c_str(), 1);
    CHECK_NOTHROW(amqp::client{amqp::connection_options::from_url(
        tls_url(*b, "localhost", "certfile=" + t + "/client.pem&keyfile=" + t + "/client.key"))});
    ::unsetenv("SSL_CERT_FILE");
  }
  SECTION("a certificate for localhost, reached as 127.0.0.1") {
    const auto e = connect_error(tls_url(*b, "127.0.0.1", good_tls(*b)));
    CHECK(contains(e.what(), "not issued for host '127.0.0.1'"));
    // ... accepted only when the check is switched off by its loud name.
    CHECK_NOTHROW(amqp::client{amqp::connection_options::from_url(
        tls_url(*b, "127.0.0.1", good_tls(*b) + "&insecure_skip_hostname_verification=true"))});
  }
  SECTION("plain AMQP to the TLS port") {
    const auto e = connect_error("amqp://guest:guest@127.0.0.1:" + b->env_value("TLS_PORT") +
                                 "/%2f?connect_timeout=3");
    CHECK(contains(e.what(), "before the AMQP handshake"));
    CHECK(contains(e.what(), "amqps://"));
    CHECK(e.reply_code() != 403);  // not blamed on the password
  }
  SECTION("TLS to the plain port") {
    const auto e = connect_error("amqps://guest:guest@localhost:" + std::to_string(b->port()) +
                                 "/%2f?connect_timeout=3&" + good_tls(*b));
    CHECK(contains(e.what(), "TLS handshake failed"));
  }
  SECTION("an expired client certificate") {
    const auto e = connect_error(tls_url(*b, "localhost", good_tls(*b, "expired")));
    CHECK(contains(e.what(), "refuse our client certificate"));
    CHECK(e.reply_code() != 403);
  }
  SECTION("no client certificate where the broker wants one") {
    const auto e = connect_error(tls_url(*b, "localhost", "cacertfile=" + t + "/ca.pem"));
    CHECK(contains(e.what(), "refuse our client certificate"));
  }
  SECTION("a key that does not belong to the certificate: names the files, not the key") {
    const auto e = connect_error(tls_url(
        *b, "localhost", "cacertfile=" + t + "/ca.pem&certfile=" + t + "/client.pem&keyfile=" + t + "/server.key"));
    CHECK(contains(e.what(), "cannot load the client certificate '" + t + "/client.pem'"));
    CHECK(contains(e.what(), t + "/server.key"));
  }
  SECTION("a CA file that does not exist") {
    const auto e = connect_error(tls_url(*b, "localhost", "cacertfile=" + t + "/nope.pem"));
    CHECK(contains(e.what(), "cannot load the CA file '" + t + "/nope.pem'"));
  }
}

TEST_CASE("EXTERNAL login: the identity comes from the client certificate", "[amqp][tls][broker]") {
  broker* b = tls_broker();
  if (b == nullptr) return;
  raw r(b->port());
  r.fresh_queue("acl.ext");
  {
    // No user or password in the URL: the broker maps CN=runnel-client to
    // user runnel-client, which may write to the default exchange only.
    amqp::client c{amqp::connection_options::from_url(
        tls_url(*b, "localhost", good_tls(*b) + "&auth_mechanism=external", ""))};
    auto tx = c.publish({.routing_key = "acl.ext"});
    for (int i = 0; i < 10; ++i) {
      amqp::outgoing m;
      m.body = "ext" + std::to_string(i);
      REQUIRE(tx.send(std::move(m)).ok());
    }
    c.close();
    CHECK(c.stats().confirmed == 10);
  }
  CHECK(r.take("acl.ext", 11, 1000).size() == 10);
  // The same login with an expired certificate is refused.
  const auto e = connect_error(tls_url(*b, "localhost", good_tls(*b, "expired") + "&auth_mechanism=external", ""));
  CHECK(contains(e.what(), "(EXTERNAL)"));
  CHECK(contains(e.what(), "refuse our client certificate"));
}

TEST_CASE("least privilege: a consumer needs only read on its queue", "[amqp][acl][broker]") {
  broker* b = tls_broker();
  if (b == nullptr) return;
  const std::size_t n = 50;
  raw r(b->port());
  r.fresh_queue("acl.in");
  r.publish_n("acl.in", n, id_body);
  const auto opts = amqp::connection_options::from_url(plain_url(*b, "reader", reader_pw));

  runnel::thread_pool pool({.threads = 2, .pin = false});
  amqp::client c{opts};
  std::atomic<std::size_t> sunk{0};
  auto run = runnel::pipeline{pool}
                 .from(c.consume({.queue = "acl.in", .prefetch = 16}))
                 .sink([&](amqp::delivery) { sunk.fetch_add(1); })
                 .run();
  REQUIRE(eventually([&] { return c.stats().acked >= n; }));

  // Forbidden on the same client: each a 403 naming the resource, and the
  // consumer above keeps going (the request's channel is replaced).
  auto e = expect_error([&] { (void)c.consume({.queue = "acl.in", .declare = true}); });
  CHECK(e.reply_code() == 403);
  CHECK(contains(e.what(), "queue 'acl.in'"));
  e = expect_error([&] { (void)c.consume({.queue = "acl.other"}); });
  CHECK(e.reply_code() == 403);
  CHECK(contains(e.what(), "queue 'acl.other'"));
  e = expect_error([&] { c.declare_queue("acl.new"); });
  CHECK(e.reply_code() == 403);
  CHECK(contains(e.what(), "queue 'acl.new'"));
  r.publish_n("acl.in", n, id_body);
  REQUIRE(eventually([&] { return c.stats().acked >= 2 * n; }));
  c.close();
  run.wait();
  CHECK(sunk.load() == 2 * n);
  CHECK(r.ready("acl.in") == 0);
}

TEST_CASE("least privilege: a publisher needs only write on its exchange", "[amqp][acl][broker]") {
  broker* b = tls_broker();
  if (b == nullptr) return;
  const std::size_t n = 50;
  raw r(b->port());
  r.fresh_queue("acl.out");
  const auto opts = amqp::connection_options::from_url(plain_url(*b, "writer", writer_pw));
  {
    amqp::client c{opts};
    auto tx = c.publish({.exchange = "acl.ex", .routing_key = "out"});
    for (std::size_t i = 0; i < n; ++i) {
      amqp::outgoing m;
      m.body = id_body(i);
      REQUIRE(tx.send(std::move(m)).ok());
    }
    // Consuming is refused (no read); the client keeps working. (Asked
    // after the confirms: a refused request replaces the channel, and
    // unconfirmed publishes are sent again on the new one.)
    REQUIRE(eventually([&] { return c.stats().confirmed >= n; }));
    const auto e = expect_error([&] { (void)c.consume({.queue = "acl.out"}); });
    CHECK(e.reply_code() == 403);
    CHECK(contains(e.what(), "queue 'acl.out'"));
    c.close();
    CHECK(c.stats().confirmed == n);
  }
  CHECK(r.take("acl.out", n + 1, 1000).size() == n);

  // Publishing to another exchange ends the client with a 403 naming it.
  amqp::client c{opts};
  auto tx = c.publish({.routing_key = "acl.out"});  // the default exchange: not ours
  amqp::outgoing m;
  m.body = "x";
  REQUIRE(tx.send(std::move(m)).ok());
  const auto e = expect_error([&] { c.close(); });
  CHECK(e.reply_code() == 403);
  CHECK(contains(e.what(), "exchange 'amq.default'"));
  CHECK(r.ready("acl.out") == 0);
}

TEST_CASE("a result the broker refuses (403) acks no input: all come back", "[amqp][acl][broker]") {
  broker* b = tls_broker();
  if (b == nullptr) return;
  const std::size_t n = 40;
  raw r(b->port());
  r.fresh_queue("acl.work");
  r.publish_n("acl.work", n, id_body);
  runnel::thread_pool pool({.threads = 2, .pin = false});
  amqp::client c{amqp::connection_options::from_url(plain_url(*b, "worker", worker_pw))};
  std::atomic<std::size_t> processed{0};
  auto run = runnel::pipeline{pool}
                 .from(c.consume({.queue = "acl.work", .prefetch = 8}))
                 .stage([&](amqp::delivery d) {
                   processed.fetch_add(1);
                   return d;
                 }, {.workers = 2})
                 .to(c.publish({.exchange = "acl.forbidden", .routing_key = "x"}))
                 .run();
  REQUIRE(eventually([&] { return processed.load() > 0; }));
  const auto e = expect_error([&] { c.close(); });
  run.wait();
  CHECK(e.reply_code() == 403);
  CHECK(contains(e.what(), "exchange 'acl.forbidden'"));
  CHECK(c.stats().acked == 0);
  // The connection is gone: the broker puts every input back.
  CHECK(eventually([&] { return r.ready("acl.work") == n; }));
}

TEST_CASE("a 403 that arrives while close() cancels the consumer is reported and not lost", "[amqp][acl][broker]") {
  // close() cancels the consumer with an RPC; when the broker's channel.close
  // for a refused publish is the reply to it, it must still end the client
  // with the 403 (it used to be dropped: close() waited 30 s for confirms
  // and returned without an error). The delays sweep close() across the
  // moment the stage's first result is published.
  broker* b = tls_broker();
  if (b == nullptr) return;
  raw r(b->port());
  int refused = 0;
  const int rounds = 20;
  for (int round = 0; round < rounds; ++round) {
    r.fresh_queue("acl.work");
    r.publish_n("acl.work", 4, id_body);
    runnel::thread_pool pool({.threads = 2, .pin = false});
    amqp::client c{amqp::connection_options::from_url(plain_url(*b, "worker", worker_pw))};
    std::atomic<int> processed{0};
    auto run = runnel::pipeline{pool}
                   .from(c.consume({.queue = "acl.work", .prefetch = 1}))
                   .stage([&](amqp::delivery d) {
                     processed.fetch_add(1);
                     std::this_thread::sleep_for(100ms);
                     return d;
                   }, {.workers = 1})
                   .to(c.publish({.exchange = "acl.forbidden", .routing_key = "x"}))
                   .run();
    // Polled finely: the sweep needs to know when the stage began.
    const auto limit = std::chrono::steady_clock::now() + 60s;
    while (processed.load() == 0 && std::chrono::steady_clock::now() < limit)
      std::this_thread::sleep_for(100us);
    REQUIRE(processed.load() > 0);
    std::this_thread::sleep_for(std::chrono::microseconds(99000 + round * 100));
    const auto e = expect_error([&] { c.close(); });
    run.wait();
    refused += e.reply_code() == 403 && contains(e.what(), "exchange 'acl.forbidden'");
    CHECK(c.stats().acked == 0);
  }
  CHECK(refused == rounds);
}

TEST_CASE("no error message shows a password or key material", "[amqp][tls][acl]") {
  broker* b = tls_broker();
  // The messages of every error the tests above saw (when they ran), and a
  // wrong password for each restricted user.
  if (b != nullptr) {
    for (const char* u : {"reader", "writer", "worker"}) {
      const auto e = connect_error(plain_url(*b, u, std::string(u) + "-wrong-pw-4411"));
      CHECK(e.reply_code() == 403);
      CHECK(contains(e.what(), std::string("'") + u + "'"));
    }
  }
  std::vector<std::string> secrets = {reader_pw, writer_pw, worker_pw, "wrong-pw-4411", "pw-9",
                                      "PRIVATE KEY"};
  if (b != nullptr) {
    for (const char* k : {"client.key", "server.key", "expired.key", "ca.key"}) {
      std::ifstream f(tls_dir(*b) + "/" + k);
      std::string line;
      while (std::getline(f, line))
        if (line.rfind("-----", 0) != 0 && line.size() >= 16) secrets.push_back(line.substr(0, 16));
    }
  }
  CHECK_FALSE(seen_errors().empty());
  for (const auto& what : seen_errors())
    for (const auto& s : secrets) {
      INFO(what);
      CHECK_FALSE(contains(what, s));
    }
}
