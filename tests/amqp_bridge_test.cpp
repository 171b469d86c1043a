// The RabbitMQ bridge against a real broker (tests/amqp/broker.sh starts a
// private node for this program). Sizes: RUNNEL_AMQP_N messages for the
// round trips (default 100000; CI's short mode sets 20000); RUNNEL_AMQP_DOWN_S
// how long the broker stays down in the broker-gone test (default 3 s).
#include <catch2/catch.hpp>

#include <runnel/amqp.hpp>
#include <runnel/pipeline.hpp>
#include <runnel/thread_pool.hpp>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>

#include "amqp/broker.hpp"

using namespace std::chrono_literals;
namespace amqp = runnel::amqp;
using runnel_test::broker;
using runnel_test::raw;

namespace {

std::size_t n_messages() {
  const char* v = std::getenv("RUNNEL_AMQP_N");
  return v != nullptr ? static_cast<std::size_t>(std::atol(v)) : 100000;
}

std::string id_body(std::size_t i) { return std::to_string(i); }

// Polls pred until it holds or `limit` passes (a hang becomes a failure; the
// limit is generous and never a measurement).
template <class Pred>
bool eventually(Pred pred, std::chrono::seconds limit = std::chrono::seconds(90)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(20ms);
  }
  return true;
}

// Every id 0..n-1 of `got` (bodies "r:<id>") counted.
std::vector<int> count_ids(const std::vector<runnel_test::got_message>& got, std::size_t n) {
  std::vector<int> seen(n, 0);
  for (const auto& m : got) {
    REQUIRE(m.body.rfind("r:", 0) == 0);
    const std::size_t id = std::stoul(m.body.substr(2));
    REQUIRE(id < n);
    ++seen[id];
  }
  return seen;
}

// The usual start of a broker test: fresh durable queues `in` (holding the
// ids 0..n-1), `out` and `dlq`, a plain connection `r` to set up and inspect
// them, a two-worker pool and a client on the test broker.
struct bridge_case {
  broker& b;
  std::string in, out, dlq;
  raw r;
  runnel::thread_pool pool{runnel::pool_options{.threads = 2, .pin = false}};
  amqp::client c;

  bridge_case(broker& br, const std::string& tag, std::size_t n, const std::string& query = "")
      : bridge_case(br, tag, n, amqp::connection_options::from_url(br.url(query))) {}

  bridge_case(broker& br, const std::string& tag, std::size_t n, amqp::connection_options o)
      : b(br),
        in(runnel_test::unique_name(tag + "in")),
        out(runnel_test::unique_name(tag + "out")),
        dlq(runnel_test::unique_name(tag + "dlq")),
        r(br.port()),
        c(std::move(o)) {
    r.fresh_queue(in);
    r.fresh_queue(out);
    r.fresh_queue(dlq);
    r.publish_n(in, n, id_body);
  }

  // The plain round trip: consume `in`, prefix each body with "r:" on 2
  // workers, publish to `out` (acking each input once its result is confirmed).
  auto round_trip(unsigned prefetch) {
    return runnel::pipeline{pool}
        .from(c.consume({.queue = in, .prefetch = prefetch}))
        .stage([](amqp::delivery d) {
          d.body = "r:" + d.body;
          return d;
        }, {.workers = 2})
        .to(c.publish({.routing_key = out}))
        .run();
  }
};

// A loopback port that was free a moment ago: nothing listens there.
int closed_port() {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  REQUIRE(::bind(s, reinterpret_cast<sockaddr*>(&a), len) == 0);
  REQUIRE(::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len) == 0);
  ::close(s);
  return ntohs(a.sin_port);
}

// Sealed messages: a test key (used nowhere else; no output may show it).
const std::string seal_hex = "8f3a1c5e7b9d2f4a6c8e0b1d3f5a7c9e1b3d5f7a9c0e2b4d6f8a1c3e5b7d9f20";
bool shows_no_key(const std::string& s) {
  for (std::size_t i = 0; i + 8 <= seal_hex.size(); i += 4)
    if (s.find(seal_hex.substr(i, 8)) != std::string::npos) return false;
  return true;
}

}  // namespace

TEST_CASE("connection_options::from_url parses what it documents and rejects the rest", "[amqp]") {
  auto o = amqp::connection_options::from_url("amqp://u%40x:p%3Aw@example:5673/%2f?heartbeat=3&connect_timeout=2");
  CHECK(o.user == "u@x");
  CHECK(o.password == "p:w");
  CHECK(o.endpoints.size() == 1);
  CHECK(o.endpoints[0].host == "example");
  CHECK(o.endpoints[0].port == 5673);
  CHECK(o.vhost == "/");
  CHECK(o.heartbeat_s == 3);
  CHECK(o.connect_timeout_s == 2);
  CHECK(amqp::connection_options::from_url("amqp://h").vhost == "/");
  CHECK(amqp::connection_options::from_url("amqp://h/").vhost.empty());
  CHECK(amqp::connection_options::from_url("amqp://h/v1").vhost == "v1");
  CHECK(amqp::connection_options::from_url("amqp://[::1]:7/").endpoints[0].host == "::1");
  CHECK(amqp::connection_options::from_url("amqp://[::1]:7/").endpoints[0].port == 7);
  CHECK(amqp::connection_options::from_url("amqp://h").endpoints[0].port == 5672);
  const auto several = amqp::connection_options::from_url("amqp://u:p@h1:1,[::1]:2,h3/v?heartbeat=4");
  REQUIRE(several.endpoints.size() == 3);
  CHECK(several.endpoints[0].host == "h1");
  CHECK(several.endpoints[0].port == 1);
  CHECK(several.endpoints[1].host == "::1");
  CHECK(several.endpoints[1].port == 2);
  CHECK(several.endpoints[2].host == "h3");
  CHECK(several.endpoints[2].port == 5672);
  CHECK(several.user == "u");
  CHECK(several.vhost == "v");
  CHECK(several.heartbeat_s == 4);

  const char* bad[] = {"http://h/", "amqps://h/?certfile=/only-cert.pem", "amqp://h:0/", "amqp://h:99999/", "amqp://h:x/",
                       "amqp://h:/", "amqp:///", "amqp://@h/", "amqp://h/%zz", "amqp://h/%2",
                       "amqp://h/?heartbeat=-1", "amqp://h/?heartbeat=abc", "amqp://h/?bogus=1",
                       "amqp://h/?heartbeat", "amqp://[::1/", "amqp://h/?connect_timeout=0",
                       "amqp://h1,/", "amqp://,h2/", "amqp://h1:1,h2:x/"};
  for (const char* u : bad) {
    INFO(u);
    CHECK_THROWS_AS(amqp::connection_options::from_url(u), amqp::error);
  }
  CHECK_THROWS_WITH(amqp::connection_options::from_url("amqp://h/?hearbeat=1"),
                    Catch::Contains("unknown URL query key 'hearbeat'"));
  ::unsetenv("RUNNEL_AMQP_URL_TEST_UNSET");
  CHECK_THROWS_AS(amqp::connection_options::from_env("RUNNEL_AMQP_URL_TEST_UNSET"), amqp::error);
  ::setenv("RUNNEL_AMQP_URL_TEST_SET", "amqp://a:b@h:1/", 1);
  CHECK(amqp::connection_options::from_env("RUNNEL_AMQP_URL_TEST_SET").endpoints[0].port == 1);
}

TEST_CASE("a password with an unescaped '/' or a URL without '@host' is not echoed as a bad port", "[amqp]") {
  // Found by fuzz/fuzz_url: the text after the first ':' read as the port.
  for (const char* url : {"amqp://u:pa55/word@host", "amqps://u:pa55?word@host", "amqp://u:pa55word"}) {
    INFO(url);
    std::string what;
    try {
      (void)amqp::connection_options::from_url(url);
    } catch (const amqp::error& e) {
      what = e.what();
    }
    CHECK(what.find("port must be an integer") != std::string::npos);
    CHECK(what.find("pa55") == std::string::npos);
  }
}

TEST_CASE("bad connections and bad consumes give a clear amqp::error", "[amqp][broker]") {
  broker* b = broker::get();
  if (b == nullptr) return;

  SECTION("nothing listening") {
    const int port = closed_port();
    auto o = amqp::connection_options::from_url("amqp://guest:guest@127.0.0.1:" + std::to_string(port) +
                                                 "/?connect_timeout=2");
    CHECK_THROWS_WITH(amqp::client{o}, Catch::Contains("cannot connect to 127.0.0.1:" + std::to_string(port)));
  }
  SECTION("wrong password: names the user, not the password") {
    auto o = amqp::connection_options::from_url("amqp://guest:s3cr3t-wrong@127.0.0.1:" +
                                                 std::to_string(b->port()) + "/%2f?connect_timeout=3");
    try {
      amqp::client c{o};
      FAIL("connected with a wrong password");
    } catch (const amqp::error& e) {
      const std::string what = e.what();
      CHECK(what.find("'guest'") != std::string::npos);
      CHECK(what.find("s3cr3t") == std::string::npos);
      CHECK(e.reply_code() == 403);
    }
  }
  SECTION("vhost that does not exist") {
    auto o = amqp::connection_options::from_url("amqp://guest:guest@127.0.0.1:" + std::to_string(b->port()) +
                                                 "/no-such-vhost?connect_timeout=3");
    CHECK_THROWS_AS(amqp::client{o}, amqp::error);
  }
  SECTION("queue not found is 404, and the client keeps working") {
    amqp::client c{amqp::connection_options::from_url(b->url())};
    try {
      (void)c.consume({.queue = runnel_test::unique_name("missing")});
      FAIL("consumed from a missing queue");
    } catch (const amqp::error& e) {
      CHECK(e.reply_code() == 404);
      CHECK(std::string(e.what()).find("missing") != std::string::npos);
    }
    const std::string q = runnel_test::unique_name("after404");
    raw r(b->port());
    r.fresh_queue(q);
    CHECK_NOTHROW((void)c.consume({.queue = q}));
    c.close();
  }
  SECTION("prefetch out of range") {
    amqp::client c{amqp::connection_options::from_url(b->url())};
    CHECK_THROWS_WITH(c.consume({.queue = "x", .prefetch = 0}), Catch::Contains("prefetch"));
    CHECK_THROWS_WITH(c.consume({.queue = "x", .prefetch = 70000}), Catch::Contains("prefetch"));
    c.close();
  }
}

TEST_CASE("round trip: every input id appears exactly once in the output, nothing left unacked",
          "[amqp][broker]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = n_messages();

  bridge_case t(*b, "rt", n);
  auto run = t.round_trip(256);
  // Wait until every input is acked, then stop gracefully.
  REQUIRE(eventually([&] { return t.c.stats().acked >= n; }));
  t.c.close();
  run.wait();

  const auto got = t.r.take(t.out, n + 1, 2000);
  CHECK(got.size() == n);
  const auto seen = count_ids(got, n);
  std::size_t once = 0;
  for (int k : seen) once += k == 1;
  CHECK(once == n);
  const auto s = t.c.stats();
  CHECK(s.delivered == n);
  CHECK(s.acked == n);
  CHECK(s.published == n);
  CHECK(s.confirmed == n);
  CHECK(s.unacked == 0);
  CHECK(s.unacked_peak <= 256);
  CHECK(s.stale == 0);
  CHECK(runnel_test::queue_counts(*b, t.in) == std::pair<long, long>{0, 0});
}

TEST_CASE("a sink acks after it returns and a filtering stage acks what it drops", "[amqp][broker]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = 2000;
  bridge_case t(*b, "sink", n);
  std::atomic<std::size_t> sunk{0};
  auto run = runnel::pipeline{t.pool}
                 .from(t.c.consume({.queue = t.in, .prefetch = 64}))
                 .stage([](amqp::delivery d) -> std::optional<amqp::delivery> {
                   if (std::stoul(d.body) % 2 == 0) return std::nullopt;
                   return d;
                 }, {.workers = 2})
                 .sink([&](amqp::delivery) { sunk.fetch_add(1); })
                 .run();
  REQUIRE(eventually([&] { return t.c.stats().acked >= n; }));
  t.c.close();
  run.wait();
  CHECK(sunk.load() == n / 2);
  CHECK(t.c.stats().acked == n);
  CHECK(runnel_test::queue_counts(*b, t.in) == std::pair<long, long>{0, 0});
}

TEST_CASE("acks are held back while others are in flight, but go out within a few ms however long one takes",
          "[amqp][broker]") {
  // 20 messages, far fewer than a batch or a quarter of the prefetch: while
  // message 0 stays in its stage, the other 19 are done and their acks held
  // back, until the ack linger (2 ms) sends them; message 0 is then acked
  // singly when its stage returns. ack_frames counts what went out.
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = 20;
  bridge_case t(*b, "linger", n);
  std::atomic<bool> release{false};
  auto run = runnel::pipeline{t.pool}
                 .from(t.c.consume({.queue = t.in, .prefetch = 256}))
                 .sink([&](amqp::delivery d) {
                   if (d.body == "0")
                     while (!release.load()) std::this_thread::sleep_for(1ms);
                 }, {.workers = 2, .batch = 1})  // batch 1: the lane held by 0 holds no other
                 .run();
  // Bounded well above the linger; without one the acks would wait for
  // message 0 (forever here).
  CHECK(eventually([&] { return t.c.stats().acked == n - 1; }, std::chrono::seconds(10)));
  CHECK(t.c.stats().acked == n - 1);
  CHECK(runnel_test::queue_counts(*b, t.in) == std::pair<long, long>{0, 1});
  release.store(true);
  CHECK(eventually([&] { return t.c.stats().acked == n; }, std::chrono::seconds(10)));
  t.c.close();
  run.wait();
  CHECK(t.c.stats().ack_frames >= 1);
  CHECK(t.c.stats().ack_frames <= n);
  CHECK(runnel_test::queue_counts(*b, t.in) == std::pair<long, long>{0, 0});
}

TEST_CASE("lone messages, each after an idle spell: every one is consumed, published and acked at once",
          "[amqp][broker]") {
  // Each input goes in alone once the client has gone idle (its I/O thread
  // asleep in poll()): its delivery must wake the I/O thread through the
  // socket, its result through the publish channel's waker (which writes the
  // eventfd only to a sleeping I/O thread), its confirm through the socket
  // again, and its ack then goes out with nothing else in flight. A wake-up
  // lost on any of those paths leaves the message until the I/O thread's
  // next timed look (up to a second with the default heartbeat), so 40 of
  // them pass the generous bound below only if none was lost.
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = 40;
  bridge_case t(*b, "lone", 0);
  auto run = t.round_trip(16);
  const auto end = std::chrono::steady_clock::now() + 10s;
  std::size_t in_time = 0;  // inputs acked before the next went in, within the bound
  for (std::size_t i = 0; i < n; ++i) {
    std::this_thread::sleep_for(20ms);  // the idle spell: the I/O thread goes to sleep
    t.r.publish_n(t.in, 1, [i](std::size_t) { return std::to_string(i); });
    while (t.c.stats().acked < i + 1 && std::chrono::steady_clock::now() < end) std::this_thread::sleep_for(1ms);
    if (t.c.stats().acked == i + 1) ++in_time;
  }
  CHECK(in_time == n);
  REQUIRE(eventually([&] { return t.c.stats().acked >= n; }));
  t.c.close();
  run.wait();
  const auto s = t.c.stats();
  CHECK(s.delivered == n);
  CHECK(s.published == n);
  CHECK(s.confirmed == n);
  const auto got = t.r.take(t.out, n + 1, 1500);
  CHECK(got.size() == n);
  const auto seen = count_ids(got, n);
  CHECK(std::count(seen.begin(), seen.end(), 1) == static_cast<long>(n));
  CHECK(runnel_test::queue_counts(*b, t.in) == std::pair<long, long>{0, 0});
}

// Every 50th message (body % 50 == 7) throws in `stage`: it must be retried
// up to max_attempts, then dead-lettered with the error text and attempt
// count, while every other message is delivered; the error handler sees
// each failure.
template <class Stage>
void check_poison_dead_lettered(const char* tag, Stage stage) {
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = 1000;
  bridge_case t(*b, tag, n);
  std::atomic<std::size_t> failures{0};
  amqp::consume_options co{.queue = t.in, .prefetch = 100};
  co.on_failure.max_attempts = 3;
  co.on_failure.dead_letter_routing_key = t.dlq;
  auto run = runnel::pipeline{t.pool}
                 .from(t.c.consume(co))
                 .stage(std::move(stage), {.workers = 2})
                 .to(t.c.publish({.routing_key = t.out}))
                 .on_error([&](const runnel::stage_failure&) { failures.fetch_add(1); })
                 .run();
  const std::size_t poison = n / 50;
  // A bound short enough that a stage whose failures are acked at once and
  // never dead-lettered fails in reasonable time; a correct one takes far less.
  CHECK(eventually([&] { return t.c.stats().dead_lettered >= poison && t.c.stats().acked >= n + 2 * poison; },
                   std::chrono::seconds(20)));
  t.c.close();
  run.wait();
  CHECK(failures.load() == 3 * poison);  // the error handler still sees every failure
  const auto dead = t.r.take(t.dlq, poison + 1, 1500);
  CHECK(dead.size() == poison);
  std::set<std::size_t> dead_ids;
  for (const auto& m : dead) {
    dead_ids.insert(std::stoul(m.body));
    CHECK(m.headers.count("x-runnel-error") == 1);
    CHECK(m.headers.count("x-runnel-attempt") == 1);
    if (m.headers.count("x-runnel-attempt") == 1) CHECK(m.headers.at("x-runnel-attempt") == "3");
  }
  for (std::size_t i = 7; i < n; i += 50) CHECK(dead_ids.count(i) == 1);
  CHECK(t.r.take(t.out, n, 1500).size() == n - poison);
  CHECK(t.c.stats().retried == 2 * poison);
  CHECK(runnel_test::queue_counts(*b, t.in) == std::pair<long, long>{0, 0});
}

TEST_CASE("poison messages are dead-lettered after max_attempts with the error text and others delivered",
          "[amqp][broker]") {
  check_poison_dead_lettered("p", [](amqp::delivery d) {
    if (std::stoul(d.body) % 50 == 7) throw std::runtime_error("poison " + d.body);
    d.body = "r:" + d.body;
    return d;
  });
}

TEST_CASE("heartbeats keep flowing while every worker sleeps longer than 3 heartbeat intervals",
          "[amqp][broker]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  // Heartbeat 1 s: the broker drops a silent connection after 2 missed ones.
  bridge_case t(*b, "hb", 4, "heartbeat=1");
  auto run = runnel::pipeline{t.pool}
                 .from(t.c.consume({.queue = t.in, .prefetch = 4}))
                 .stage([](amqp::delivery d) {
                   std::this_thread::sleep_for(4s);  // > 3 heartbeat intervals, on both workers
                   d.body = "r:" + d.body;
                   return d;
                 }, {.workers = 2})
                 .to(t.c.publish({.routing_key = t.out}))
                 .run();
  REQUIRE(eventually([&] { return t.c.stats().acked >= 4; }));
  t.c.close();
  run.wait();
  CHECK(t.c.stats().reconnects == 0);
  CHECK(t.c.stats().stale == 0);
  CHECK(t.r.take(t.out, 5, 1500).size() == 4);
}

TEST_CASE("close_all_connections three times mid-run: the run finishes, every id at least once",
          "[amqp][broker]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = n_messages() / 5;
  bridge_case t(*b, "r", n);
  // The second half waits at a gate until the faults are done, so each fault
  // hits a run with deliveries t.in flight.
  std::atomic<bool> gate{false};
  auto run = runnel::pipeline{t.pool}
                 .from(t.c.consume({.queue = t.in, .prefetch = 128}))
                 .stage([&gate, n](amqp::delivery d) {
                   if (std::stoul(d.body) >= n / 2)
                     while (!gate.load()) std::this_thread::sleep_for(1ms);
                   d.body = "r:" + d.body + (d.redelivered ? ":R" : "");
                   return d;
                 }, {.workers = 2})
                 .to(t.c.publish({.routing_key = t.out}))
                 .run();
  REQUIRE(eventually([&] { return t.c.stats().acked >= n / 4; }));
  for (int k = 0; k < 3; ++k) {
    const auto before = t.c.stats().reconnects;
    b->ctl("close_all_connections test-fault");  // closes the test's raw connection too
    REQUIRE(eventually([&] { return t.c.stats().reconnects > before; }));
  }
  CHECK(t.c.stats().acked < n);  // the gate held: the faults came mid-run
  gate = true;
  // Drained: nothing ready, nothing unacked at the broker.
  const bool drained = eventually([&] {
    raw probe(b->port());
    return probe.ready(t.in) == 0 && t.c.stats().unacked == 0 && t.c.stats().acked > 0 &&
           runnel_test::queue_counts(*b, t.in) == std::pair<long, long>{0, 0};
  });
  {
    const auto s = t.c.stats();
    const auto qc = runnel_test::queue_counts(*b, t.in);
    INFO("delivered " << s.delivered << " acked " << s.acked << " published " << s.published << " confirmed "
                      << s.confirmed << " stale " << s.stale << " unacked " << s.unacked << " reconnects "
                      << s.reconnects << "; broker ready " << qc.first << " unacked " << qc.second);
    REQUIRE(drained);
  }
  t.c.close();
  run.wait();
  raw r2(b->port());
  const auto got = r2.take(t.out, 10 * n, 2000);
  std::vector<int> seen(n, 0);
  std::size_t dups = 0;
  for (const auto& m : got) {
    std::string body = m.body.substr(2);
    const bool redel = body.size() > 2 && body.compare(body.size() - 2, 2, ":R") == 0;
    if (redel) body.resize(body.size() - 2);
    const std::size_t id = std::stoul(body);
    REQUIRE(id < n);
    if (++seen[id] > 1) {
      ++dups;
      CHECK(redel);  // a duplicate comes from a redelivery
    }
  }
  std::size_t missing = 0;
  for (int k : seen) missing += k == 0;
  CHECK(missing == 0);
  CHECK(t.c.stats().reconnects >= 3);
  INFO("duplicates: " << dups);
  CHECK(dups <= 3 * 2 * 128 + 3 * 1024);  // bounded by what was t.in flight at the faults
}

TEST_CASE("graceful stop mid-run: acked + still queued = published, nothing unacked", "[amqp][broker]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = 5000;
  bridge_case t(*b, "g", n);
  auto run = runnel::pipeline{t.pool}
                 .from(t.c.consume({.queue = t.in, .prefetch = 200}))
                 .stage([](amqp::delivery d) {
                   std::this_thread::sleep_for(200us);
                   d.body = "r:" + d.body;
                   return d;
                 }, {.workers = 2})
                 .to(t.c.publish({.routing_key = t.out}))
                 .run();
  REQUIRE(eventually([&] { return t.c.stats().acked >= n / 10; }));
  t.c.close();
  run.wait();
  const auto s = t.c.stats();
  CHECK(s.unacked == 0);
  const auto qc = runnel_test::queue_counts(*b, t.in);
  CHECK(qc.second == 0);
  CHECK(static_cast<std::size_t>(qc.first) + s.acked == n);
  const auto got = t.r.take(t.out, n, 1500);
  CHECK(got.size() == s.acked);  // nothing processed twice, nothing acked without its result
  const auto seen = count_ids(got, n);
  for (int k : seen) CHECK(k <= 1);
}

TEST_CASE("a consumer process killed with SIGKILL mid-run, then restarted: nothing lost", "[amqp][broker]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = 4000;
  const std::string in = runnel_test::unique_name("kin"), out = runnel_test::unique_name("kout");
  {
    raw r(b->port());
    r.fresh_queue(in);
    r.fresh_queue(out);
    r.publish_n(in, n, id_body);
  }
  auto consume_all = [&](bool forever) {
    runnel::thread_pool pool({.threads = 2, .pin = false});
    amqp::client c{amqp::connection_options::from_url(b->url())};
    auto run = runnel::pipeline{pool}
                   .from(c.consume({.queue = in, .prefetch = 100}))
                   .stage([](amqp::delivery d) {
                     std::this_thread::sleep_for(200us);
                     d.body = "r:" + d.body;
                     return d;
                   }, {.workers = 2})
                   .to(c.publish({.routing_key = out}))
                   .run();
    if (forever) {
      for (;;) std::this_thread::sleep_for(50ms);
    }
    REQUIRE(eventually([&] {
      raw probe(b->port());
      return probe.ready(in) == 0 && c.stats().unacked == 0 && runnel_test::queue_counts(*b, in).second == 0;
    }));
    c.close();
    run.wait();
  };
  // The child has no threads of this program's when it forks (the fixture's
  // broker is another process), so it may start its own.
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    try {
      consume_all(true);
    } catch (...) {
    }
    ::_exit(0);
  }
  const bool progressed = eventually([&] {
    raw probe(b->port());
    return probe.ready(out) >= n / 4;
  });
  ::kill(child, SIGKILL);
  REQUIRE(progressed);
  int st = 0;
  ::waitpid(child, &st, 0);
  CHECK(WIFSIGNALED(st));
  consume_all(false);  // the restarted consumer
  raw r(b->port());
  const auto got = r.take(out, 10 * n, 1500);
  std::vector<int> seen(n, 0);
  for (const auto& m : got) ++seen[std::stoul(m.body.substr(2))];
  std::size_t missing = 0, dups = 0;
  for (int k : seen) {
    missing += k == 0;
    dups += k > 1 ? k - 1 : 0;
  }
  CHECK(missing == 0);
  CHECK(dups <= 2 * 100 + 1024);  // only what the killed process had in flight
  CHECK(runnel_test::queue_counts(*b, in) == std::pair<long, long>{0, 0});
}

TEST_CASE("bounded memory: a backlog with a slow stage keeps unacked within prefetch and RSS flat",
          "[amqp][broker]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  // RUNNEL_AMQP_LONG=1: the 1M-message backlog (slow to preload here).
  const std::size_t n = std::getenv("RUNNEL_AMQP_LONG") != nullptr ? 1000000 : 30000;
  const std::string in = runnel_test::unique_name("min");
  raw r(b->port());
  r.fresh_queue(in);
  r.persistent_ = false;
  r.publish_n(in, n, [](std::size_t i) { return std::to_string(i) + std::string(1000, 'x'); });
  auto rss_kb = [] {
    long pages = 0, resident = 0;
    if (FILE* f = std::fopen("/proc/self/statm", "r")) {
      if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
      std::fclose(f);
    }
    return resident * (::sysconf(_SC_PAGESIZE) / 1024);
  };
  runnel::thread_pool pool({.threads = 2, .pin = false});
  amqp::client c{amqp::connection_options::from_url(b->url())};
  auto run = runnel::pipeline{pool}
                 .from(c.consume({.queue = in, .prefetch = 50}))
                 .sink([](amqp::delivery) { std::this_thread::sleep_for(1ms); }, {.workers = 2})
                 .run();
  std::this_thread::sleep_for(500ms);
  const long rss0 = rss_kb();
  std::uint64_t peak = 0;
  for (int i = 0; i < 30; ++i) {
    std::this_thread::sleep_for(100ms);
    peak = std::max<std::uint64_t>(peak, c.stats().unacked);
  }
  const long rss1 = rss_kb();
  const auto qc = runnel_test::queue_counts(*b, in);
  c.close();
  run.wait();
  CHECK(peak <= 50);
  CHECK(c.stats().unacked_peak <= 50);
  CHECK(qc.second <= 50);  // the broker agrees
  CHECK(qc.first > 0);     // still a backlog: memory was measured under it
  INFO("rss " << rss0 << " kB -> " << rss1 << " kB");
  CHECK(rss1 - rss0 < 16 * 1024);  // flat: not a function of the backlog
}

TEST_CASE("cancel mid-run: every input is acked after processing or back in the queue", "[amqp][broker]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = 3000;
  bridge_case t(*b, "c", n);
  std::atomic<std::size_t> processed{0};
  // A slow sink behind a fast stage: the channel between them is full when
  // cancel() comes, so the pipeline discards many deliveries it holds.
  auto run = runnel::pipeline{t.pool}
                 .from(t.c.consume({.queue = t.in, .prefetch = 300}))
                 .stage([](amqp::delivery d) {
                   d.body = "r:" + d.body;
                   return d;
                 }, {.workers = 2, .capacity = 256})
                 .sink([&](amqp::delivery) {
                   std::this_thread::sleep_for(200us);
                   processed.fetch_add(1);
                 })
                 .run();
  REQUIRE(eventually([&] { return processed.load() >= n / 10; }));
  run.cancel();
  run.wait();
  const auto rs = run.stats();
  CHECK(rs.discarded > 0);
  // Acks and requeues are queued to the I/O thread; let them reach the broker.
  REQUIRE(eventually([&] { return t.c.stats().acked >= processed.load(); }, std::chrono::seconds(30)));
  // The client lives on, but its abandoned consumer is cancelled at the
  // broker (otherwise the broker keeps redelivering what the client requeues):
  // no consumer left on the queue and nothing unacked there.
  const bool released = eventually([&] {
    return runnel_test::queue_consumers(*b, t.in) == 0 && runnel_test::queue_counts(*b, t.in).second == 0;
  }, std::chrono::seconds(20));
  CHECK(released);
  CHECK(t.c.stats().unacked == 0);
  t.c.close();
  const auto s = t.c.stats();
  INFO("processed " << processed.load() << " acked " << s.acked << " nacked " << s.nacked << " discarded "
                    << rs.discarded);
  CHECK(s.acked == processed.load());  // nothing acked that was not processed
  CHECK(s.nacked >= rs.discarded);     // what the pipeline discarded went back
  const auto qc = runnel_test::queue_counts(*b, t.in);
  CHECK(qc.second == 0);
  CHECK(static_cast<std::size_t>(qc.first) + s.acked == n);  // nothing lost
}

TEST_CASE("a stage taking the delivery by reference that throws: retried, then dead-lettered",
          "[amqp][broker]") {
  check_poison_dead_lettered("ref", [](amqp::delivery& d) -> amqp::delivery {
    if (std::stoul(d.body) % 50 == 7) throw std::runtime_error("poison " + d.body);
    d.body = "r:" + d.body;
    return std::move(d);
  });
}

TEST_CASE("several broker addresses: a dead one first is skipped, and a broker restart still reconnects",
          "[amqp][broker]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  constexpr std::size_t n = 2000;
  auto o = amqp::connection_options::from_url("amqp://guest:guest@127.0.0.1:" + std::to_string(closed_port()) +
                                              ",127.0.0.1:" + std::to_string(b->port()) + "/%2f");
  REQUIRE(o.endpoints.size() == 2);
  o.reconnect_max_ms = 400;  // keep the restart short
  bridge_case t(*b, "me", n, o);
  auto& c = t.c;
  const std::string& in = t.in;
  std::atomic<bool> gate{false};
  auto run = runnel::pipeline{t.pool}
                 .from(c.consume({.queue = in, .prefetch = 100}))
                 .stage([&gate](amqp::delivery d) {
                   if (std::stoul(d.body) >= n / 2)
                     while (!gate.load()) std::this_thread::sleep_for(1ms);
                   d.body = "r:" + d.body;
                   return d;
                 }, {.workers = 2})
                 .to(c.publish({.routing_key = t.out}))
                 .run();
  REQUIRE(eventually([&] { return c.stats().acked >= n / 4; }));
  // The broker goes away and comes back: the client tries both addresses in
  // turn until the second answers again.
  b->ctl("stop_app");
  b->ctl("start_app");
  gate = true;
  REQUIRE(eventually([&] { return c.stats().reconnects >= 1; }));
  const bool drained = eventually([&] {
    return c.stats().unacked == 0 && runnel_test::queue_counts(*b, in) == std::pair<long, long>{0, 0};
  });
  INFO("acked " << c.stats().acked << " reconnects " << c.stats().reconnects);
  REQUIRE(drained);
  c.close();
  run.wait();
  raw r(b->port());  // the fixture's connection closed with the broker
  const auto got = r.take(t.out, 10 * n, 1500);
  std::vector<int> seen(n, 0);
  for (const auto& m : got) ++seen[std::stoul(m.body.substr(2))];
  std::size_t missing = 0;
  for (int k : seen) missing += k == 0;
  CHECK(missing == 0);
}

TEST_CASE("a broker resource alarm blocks the connection: nothing is published until it ends, then all is",
          "[amqp][broker]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = 1000;
  bridge_case t(*b, "blk", n);
  // Restores the alarm threshold whatever happens (the other tests share the
  // broker).
  struct alarm_guard {
    broker& b;
    ~alarm_guard() { b.ctl("set_vm_memory_high_watermark 0.4"); }
  } guard{*b};
  b->ctl("set_vm_memory_high_watermark 0");  // every byte is too much: the alarm is on
  // The broker blocks a connection at its first publish under the alarm:
  // the test sends that one itself. The stage holds every delivery until the
  // client has seen connection.blocked; then all their results are ready.
  std::atomic<std::size_t> processed{0};
  auto& c = t.c;
  auto run = runnel::pipeline{t.pool}
                 .from(t.c.consume({.queue = t.in, .prefetch = 100}))
                 .stage([&processed, &c](amqp::delivery d) {
                   const auto give_up = std::chrono::steady_clock::now() + 60s;  // no hang if never blocked
                   while (c.stats().blocks == 0 && std::chrono::steady_clock::now() < give_up)
                     std::this_thread::sleep_for(1ms);
                   d.body = "r:" + d.body;
                   processed.fetch_add(1);
                   return d;
                 }, {.workers = 2})
                 .to(t.c.publish({.routing_key = t.out}))
                 .run();
  auto tx = t.c.publish({.routing_key = t.out});
  amqp::outgoing first;
  first.body = "first";
  REQUIRE(tx.send(std::move(first)).ok());
  REQUIRE(eventually([&] { return t.c.stats().blocked; }, std::chrono::seconds(30)));
  CHECK(t.c.stats().blocks == 1);
  // Consuming is not blocked: the whole prefetch arrives and is processed,
  // but no result is published while blocked (the write would stall the
  // I/O thread once the broker stops reading).
  REQUIRE(eventually([&] { return processed.load() >= 100; }, std::chrono::seconds(30)));
  std::this_thread::sleep_for(200ms);  // room for a wrong publish to happen (not a measurement)
  CHECK(t.c.stats().published == 1);
  CHECK(t.c.stats().unacked == 100);
  b->ctl("set_vm_memory_high_watermark 0.4");
  REQUIRE(eventually([&] { return t.c.stats().acked >= n; }));
  CHECK_FALSE(t.c.stats().blocked);
  t.c.close();
  run.wait();
  CHECK(t.c.stats().published == n + 1);
  CHECK(t.r.take(t.out, n + 2, 1500).size() == n + 1);
}

TEST_CASE("through the broker: sealed in, opened, sealed out; tampered ones dead-lettered and counted",
          "[amqp][broker][seal]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = 300, every = 30;  // every 30th is tampered with
  auto s = std::make_shared<const amqp::sealer>(amqp::sealer::parse("k1:" + seal_hex));
  bridge_case t(*b, "seal", 0);
  const std::string &in = t.in, &out = t.out, &dlq = t.dlq;
  raw& r = t.r;
  amqp::client& c = t.c;
  {
    // Sealed by hand (so some can be altered) and published as they are.
    auto tx = c.publish({.routing_key = in});
    for (std::size_t i = 0; i < n; ++i) {
      amqp::outgoing o;
      o.body = std::to_string(i);
      o.message_id = "id-" + std::to_string(i);
      s->seal(o, in);
      if (i % every == 3) o.body[o.body.size() / 2] ^= 0x10;
      REQUIRE(tx.send(std::move(o)));
    }
  }
  const std::size_t bad = n / every;
  const std::size_t flaky = n / every;  // i % every == 7 fail their first attempt
  std::atomic<std::size_t> seen{0}, garbage{0};
  amqp::consume_options co{.queue = in, .prefetch = 64};
  co.on_failure.dead_letter_routing_key = dlq;
  co.open = s;
  auto run = runnel::pipeline{t.pool}
                 .from(c.consume(co))
                 .stage([&](amqp::delivery d) {
                   // Only opened bodies get here: the ids, in clear.
                   const std::size_t i = std::stoul(d.body);
                   if (i % every == 3 || d.message_id != "id-" + d.body) garbage.fetch_add(1);
                   seen.fetch_add(1);
                   // Retried: it must go back sealed (else it would not open again).
                   if (i % every == 7 && d.attempt == 1) throw std::runtime_error("first attempt of " + d.body);
                   d.body = "r:" + d.body;
                   return d;
                 }, {.workers = 2})
                 .to(c.publish({.routing_key = out, .seal = s}))
                 .on_error([](const runnel::stage_failure&) {})
                 .run();
  REQUIRE(eventually([&] { return c.stats().acked >= n + flaky; }));
  c.close();
  run.wait();
  const auto st = c.stats();
  CHECK(seen.load() == n - bad + flaky);
  CHECK(garbage.load() == 0);
  CHECK(st.acked == n + flaky);
  CHECK(st.unopened == bad);
  CHECK(st.dead_lettered == bad);
  CHECK(st.retried == flaky);

  const auto dead = r.take(dlq, bad + 1, 1500);
  REQUIRE(dead.size() == bad);
  for (const auto& m : dead) {
    REQUIRE(m.headers.count("x-runnel-error") == 1);
    CHECK(m.headers.at("x-runnel-error").find("authentication failed (key id 'k1')") != std::string::npos);
    CHECK(m.headers.at(amqp::seal_header) == "k1");
    CHECK(shows_no_key(m.headers.at("x-runnel-error")));
  }
  // The results went out sealed for `out`, and open.
  const auto got = r.take(out, n, 1500);
  REQUIRE(got.size() == n - bad);
  std::size_t opened = 0;
  for (const auto& g : got) {
    amqp::message m;
    m.body = g.body;
    m.routing_key = out;
    for (const auto& h : g.headers) m.headers.emplace_back(h.first, h.second);
    m.message_id = g.message_id;
    CHECK(g.body.rfind("r:", 0) != 0);  // not in clear on the broker
    s->open(m);
    CHECK(m.body == "r:" + g.message_id.substr(3));
    ++opened;
  }
  CHECK(opened == n - bad);
  CHECK(runnel_test::queue_counts(*b, in) == std::pair<long, long>{0, 0});
}

// ---- bad inputs and a misbehaving broker ------------------------------------

namespace {

// How long the broker stays down in the broker-gone test: RUNNEL_AMQP_DOWN_S
// seconds (default 3; the documented long mode is 60).
int down_seconds() {
  const char* v = std::getenv("RUNNEL_AMQP_DOWN_S");
  return v != nullptr ? std::atoi(v) : 3;
}

// Sanitizer builds skip the broker-gone test unless RUNNEL_AMQP_DOWN_S is set:
// it spends ~15 s in rabbitmqctl stop_app / start_app, and the reconnect path
// it takes is the one close_all_connections already runs under them.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
constexpr bool sanitized = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
constexpr bool sanitized = true;
#else
constexpr bool sanitized = false;
#endif
#else
constexpr bool sanitized = false;
#endif

// A password that must never show in an error.
const std::string secret = "Zq81-secret-pw";

// What constructing a client with `o` throws, run on another thread so that
// a hang is a failure (after a generous limit) rather than a stuck test.
// "" if it connected.
struct refusal {
  bool finished = false;
  std::string what;
  int code = 0;
};
refusal refused(amqp::connection_options o) {
  auto f = std::async(std::launch::async, [o = std::move(o)]() mutable {
    refusal r;
    r.finished = true;
    try {
      amqp::client c{std::move(o)};
      c.close();
    } catch (const amqp::error& e) {
      r.what = e.what();
      r.code = e.reply_code();
    }
    return r;
  });
  if (f.wait_for(60s) != std::future_status::ready) {
    FAIL_CHECK("the client's start hung for 60 s");
    f.wait();  // the thread must end before the test goes on
    return {};
  }
  return f.get();
}

// A loopback socket that listens and never accepts: the kernel completes the
// TCP handshake, then nobody speaks.
struct silent_listener {
  int fd = -1, port = 0;
  silent_listener() {
    fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), len) == 0);
    REQUIRE(::listen(fd, 4) == 0);
    REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0);
    port = ntohs(a.sin_port);
  }
  ~silent_listener() { ::close(fd); }
  silent_listener(const silent_listener&) = delete;
  silent_listener& operator=(const silent_listener&) = delete;
};

amqp::connection_options opts(int port, const std::string& user, const std::string& vhost_path) {
  return amqp::connection_options::from_url("amqp://" + user + ":" + secret + "@127.0.0.1:" + std::to_string(port) +
                                            vhost_path + "?connect_timeout=2");
}

// One processed copy of a message: its id and its redelivered flag.
// Opens a stage's gate when the test leaves, by a failed REQUIRE too (the
// pipeline's handle would otherwise wait for a stage parked at it).
struct gate_opener {
  std::atomic<bool>& gate;
  ~gate_opener() { gate = true; }
};

struct seen_log {
  std::mutex m;
  std::vector<std::pair<std::size_t, bool>> copies;
  void add(std::size_t id, bool redelivered) {
    std::lock_guard lock(m);
    copies.emplace_back(id, redelivered);
  }
  std::size_t distinct() {
    std::lock_guard lock(m);
    std::vector<bool> ids;
    std::size_t k = 0;
    for (const auto& c : copies) {
      if (c.first >= ids.size()) ids.resize(c.first + 1);
      if (!ids[c.first]) ++k;
      ids[c.first] = true;
    }
    return k;
  }
  std::vector<std::pair<std::size_t, bool>> get() {
    std::lock_guard lock(m);
    return copies;
  }
};

}  // namespace

TEST_CASE("a broker that refuses at start: a clear error at once, naming what was wrong, never the password",
          "[amqp][broker][faults]") {
  broker* b = broker::get();
  if (b == nullptr) return;

  SECTION("wrong credentials") {
    const refusal r = refused(opts(b->port(), "guest", "/%2f"));
    REQUIRE(r.finished);
    INFO(r.what);
    CHECK(r.what.find("login to 127.0.0.1:" + std::to_string(b->port())) != std::string::npos);
    CHECK(r.what.find("'guest'") != std::string::npos);
    CHECK(r.code == 403);
    CHECK(r.what.find(secret) == std::string::npos);
    CHECK(r.what.find("Zq81") == std::string::npos);
  }
  SECTION("a user that does not exist") {
    const refusal r = refused(opts(b->port(), "nobody-here", "/%2f"));
    REQUIRE(r.finished);
    INFO(r.what);
    CHECK(r.what.find("'nobody-here'") != std::string::npos);
    CHECK(r.code == 403);
    CHECK(r.what.find("Zq81") == std::string::npos);
  }
  SECTION("a vhost that does not exist: named in the error") {
    auto o = opts(b->port(), "guest", "/no-such-vhost");
    o.password = "guest";
    const refusal r = refused(o);
    REQUIRE(r.finished);
    INFO(r.what);
    CHECK(r.what.find("vhost 'no-such-vhost'") != std::string::npos);
    CHECK(r.what.find("failed") != std::string::npos);
    CHECK(r.what.find(secret) == std::string::npos);
  }
  SECTION("nothing listening on the port") {
    const int port = closed_port();
    const refusal r = refused(opts(port, "guest", "/%2f"));
    REQUIRE(r.finished);
    INFO(r.what);
    CHECK(r.what.find("cannot connect to 127.0.0.1:" + std::to_string(port)) != std::string::npos);
    CHECK(r.what.find("Zq81") == std::string::npos);
  }
  SECTION("a port that accepts and never speaks: a timeout, not a hang") {
    silent_listener l;
    const refusal r = refused(opts(l.port, "guest", "/%2f"));
    REQUIRE(r.finished);
    INFO(r.what);
    CHECK(r.what.find("127.0.0.1:" + std::to_string(l.port)) != std::string::npos);
    CHECK(r.what.find("Zq81") == std::string::npos);
  }
  SECTION("every address refuses: the first endpoint's error, after trying each once") {
    const int p1 = closed_port(), p2 = closed_port();
    auto o = amqp::connection_options::from_url("amqp://guest:" + secret + "@127.0.0.1:" + std::to_string(p1) +
                                                 ",127.0.0.1:" + std::to_string(p2) + "/%2f?connect_timeout=2");
    const refusal r = refused(o);
    REQUIRE(r.finished);
    INFO(r.what);
    CHECK(r.what.find("cannot connect to 127.0.0.1:") != std::string::npos);
    CHECK(r.what.find("Zq81") == std::string::npos);
  }
  SECTION("a queue that does not exist, without declare: 404 naming it, and the client goes on") {
    amqp::client c{amqp::connection_options::from_url(b->url())};
    const std::string missing = runnel_test::unique_name("no-such-queue");
    try {
      (void)c.consume({.queue = missing, .declare = false});
      FAIL("consumed from a missing queue");
    } catch (const amqp::error& e) {
      CHECK(e.reply_code() == 404);
      CHECK(std::string(e.what()).find("'" + missing + "'") != std::string::npos);
    }
    const std::string q = runnel_test::unique_name("after-404");
    raw r(b->port());
    r.fresh_queue(q);
    r.publish_n(q, 10, [](std::size_t i) { return std::to_string(i); });
    runnel::thread_pool pool{runnel::pool_options{.threads = 2, .pin = false}};
    std::atomic<int> got{0};
    auto run = runnel::pipeline{pool}.from(c.consume({.queue = q})).sink([&](amqp::delivery) { ++got; }).run();
    CHECK(eventually([&] { return c.stats().acked == 10; }));
    c.close();
    run.wait();
    CHECK(got.load() == 10);
    CHECK(c.stats().reconnects == 0);
  }
}

TEST_CASE("the broker gone for a while, then back: the consumer reconnects and nothing is lost",
          "[amqp][broker][faults]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  if (sanitized && std::getenv("RUNNEL_AMQP_DOWN_S") == nullptr) {
    WARN("skipped in a sanitizer build (set RUNNEL_AMQP_DOWN_S to run it)");
    return;
  }
  const std::size_t n = 2000;
  const unsigned prefetch = 100;
  const std::string q = runnel_test::unique_name("down");
  {
    raw r(b->port());
    r.fresh_queue(q);
    r.publish_n(q, n, [](std::size_t i) { return std::to_string(i); });
  }
  runnel::thread_pool pool{runnel::pool_options{.threads = 2, .pin = false}};
  auto o = amqp::connection_options::from_url(b->url("heartbeat=2"));
  o.reconnect_max_ms = 1000;  // back soon after the broker is
  amqp::client c{o};
  seen_log seen;
  // The second half waits at a gate until the broker is down, so deliveries
  // are in the sink, in the channel and unacked at the broker when it goes.
  std::atomic<bool> gate{false};
  auto run = runnel::pipeline{pool}
                 .from(c.consume({.queue = q, .prefetch = prefetch}))
                 .sink([&](amqp::delivery d) {
                   const std::size_t id = std::stoul(d.body);
                   if (id >= n / 2)
                     while (!gate.load()) std::this_thread::sleep_for(1ms);
                   seen.add(id, d.redelivered);
                 }, {.workers = 2})
                 .run();
  const gate_opener opener{gate};
  REQUIRE(eventually([&] { return c.stats().unacked >= prefetch && c.stats().acked >= n / 4; }));
  // stop_app closes the listener and every connection; the node stays, so
  // start_app brings the same broker back on the same port.
  b->ctl("stop_app");
  gate = true;
  const auto before = c.stats();
  std::this_thread::sleep_for(std::chrono::seconds(down_seconds()));
  CHECK(c.stats().reconnects == before.reconnects);  // nothing to reconnect to: it keeps trying
  b->ctl("start_app");
  REQUIRE(eventually([&] { return c.stats().reconnects > before.reconnects; }, std::chrono::seconds(45)));
  const bool drained = eventually([&] {
    raw probe(b->port());
    return probe.ready(q) == 0 && c.stats().unacked == 0 && seen.distinct() == n;
  });
  {
    const auto s = c.stats();
    INFO("delivered " << s.delivered << " redelivered " << s.redelivered << " acked " << s.acked << " stale "
                      << s.stale << " reconnects " << s.reconnects);
    REQUIRE(drained);
  }
  c.close();
  run.wait();

  const auto copies = seen.get();
  std::vector<int> count(n, 0), fresh(n, 0);
  std::size_t redelivered = 0;
  for (const auto& [id, redel] : copies) {
    REQUIRE(id < n);
    ++count[id];
    if (redel) ++redelivered;
    else ++fresh[id];
  }
  std::size_t missing = 0, dups = 0, fresh_twice = 0;
  for (std::size_t i = 0; i < n; ++i) {
    missing += count[i] == 0;
    dups += count[i] > 1 ? static_cast<std::size_t>(count[i] - 1) : 0;
    fresh_twice += fresh[i] > 1;
  }
  CHECK(runnel_test::queue_counts(*b, q) == std::pair<long, long>{0, 0});
  const auto s = c.stats();
  INFO("copies " << copies.size() << " duplicates " << dups << " redelivered " << redelivered << " reconnects "
                 << s.reconnects);
  CHECK(missing == 0);      // nothing lost
  CHECK(fresh_twice == 0);  // every repeat of an id came marked redelivered
  CHECK(dups <= prefetch);  // only what the broker had out when it went
  CHECK(redelivered >= dups);
  CHECK(s.redelivered >= redelivered);
  CHECK(copies.size() == n + dups);
  CHECK(s.unacked == 0);
}

// A broker that stops answering in the middle of a request (its VM frozen
// with SIGSTOP: the connection stays open, nothing replies, so the queue
// declaration and basic.consume time out after connect_timeout) is a lost
// connection, not a refusal: consume() must not throw. The consumer is kept
// and started on the next connection, as every consumer is after a
// reconnect. (The fault harness met this as a consumer process exiting with
// "consuming from queue 'faults': request timed out" while a quorum queue
// elected a new leader after a node kill.)
TEST_CASE("a consume cut by the broker freezing mid-request is kept and starts on the next connection",
          "[amqp][broker][faults]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const long vm = b->vm_pid();
  REQUIRE(vm > 0);
  const std::size_t n = 500;
  const std::string q = runnel_test::unique_name("frozen");
  {
    raw r(b->port());
    r.fresh_queue(q);
    r.publish_n(q, n, [](std::size_t i) { return std::to_string(i); });
  }
  auto o = amqp::connection_options::from_url(b->url("connect_timeout=1"));
  o.reconnect_max_ms = 500;
  amqp::client c{o};
  std::optional<runnel::receiver<amqp::delivery>> rx;
  {
    struct thaw {  // the broker runs again however this block ends
      pid_t pid;
      ~thaw() { ::kill(pid, SIGCONT); }
    };
    REQUIRE(::kill(static_cast<pid_t>(vm), SIGSTOP) == 0);
    const thaw t{static_cast<pid_t>(vm)};
    REQUIRE_NOTHROW(rx.emplace(c.consume({.queue = q, .prefetch = 50})));
  }
  runnel::thread_pool pool{runnel::pool_options{.threads = 2, .pin = false}};
  seen_log seen;
  auto run = runnel::pipeline{pool}
                 .from(std::move(*rx))
                 .sink([&](amqp::delivery d) { seen.add(std::stoul(d.body), d.redelivered); }, {.workers = 2})
                 .run();
  const bool all = eventually([&] { return seen.distinct() == n && c.stats().unacked == 0; });
  const auto s = c.stats();
  INFO("delivered " << s.delivered << " acked " << s.acked << " reconnects " << s.reconnects);
  CHECK(all);
  CHECK(s.reconnects >= 1);  // the frozen connection was given up and a new one consumed
  c.close();
  run.wait();
  CHECK(seen.get().size() == n);  // the consumer started once: no delivery came twice
  CHECK(runnel_test::queue_counts(*b, q) == std::pair<long, long>{0, 0});
}

// Counts this process's open file descriptors: a client that is never
// destroyed keeps its eventfd, so the count shows a leaked client.
static std::size_t open_fds() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

TEST_CASE("a client stopped by a fatal error while deliveries wait unread in its channel is freed",
          "[amqp][broker][faults]") {
  // The deliveries in the ring each hold the client's core; the core held
  // the ring: a cycle that kept both alive once the I/O thread had ended.
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::string q = runnel_test::unique_name("fatal-unread");
  raw r(b->port());
  r.fresh_queue(q);
  r.publish_n(q, 100, [](std::size_t i) { return std::to_string(i); });
  const std::size_t before = open_fds();
  {
    amqp::client c{amqp::connection_options::from_url(b->url())};
    auto rx = c.consume({.queue = q, .prefetch = 20});
    // Nothing receives: the deliveries stay in the channel's ring.
    REQUIRE(eventually([&] { return c.stats().delivered >= 20; }));
    b->ctl("delete_queue " + q);  // basic.cancel: a fatal stop
    CHECK_THROWS_AS(c.close(), amqp::error);
    // rx goes first, then the client, with deliveries still in the ring.
  }
  CHECK(open_fds() == before);
}

TEST_CASE("a queue deleted under a running consumer: the client stops with a clear error, no hang, no spin",
          "[amqp][broker][faults]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = 500;
  const std::string q = runnel_test::unique_name("deleted"), out = runnel_test::unique_name("deleted-out");
  raw r(b->port());
  r.fresh_queue(q);
  r.fresh_queue(out);
  r.publish_n(q, n, [](std::size_t i) { return std::to_string(i); });
  runnel::thread_pool pool{runnel::pool_options{.threads = 2, .pin = false}};
  amqp::client c{amqp::connection_options::from_url(b->url())};
  std::atomic<bool> gate{false};
  std::atomic<std::size_t> processed{0};
  auto run = runnel::pipeline{pool}
                 .from(c.consume({.queue = q, .prefetch = 50}))
                 .stage([&](amqp::delivery d) {
                   if (std::stoul(d.body) >= n / 5)
                     while (!gate.load()) std::this_thread::sleep_for(1ms);
                   processed.fetch_add(1);
                   return d;
                 }, {.workers = 2})
                 .to(c.publish({.routing_key = out}))
                 .run();
  const gate_opener opener{gate};
  // (Results of processed ids may wait in a parked worker's lane, so the
  // test waits for processing, not for acks.)
  REQUIRE(eventually([&] { return processed.load() >= n / 5 && c.stats().delivered > n / 5; }));
  b->ctl("delete_queue " + q);  // the broker sends basic.cancel to our consumer
  gate = true;
  // The pipeline's input ends: run.wait() returns (a hang would fail here).
  auto waited = std::async(std::launch::async, [&] { run.wait(); });
  const bool ended = waited.wait_for(60s) == std::future_status::ready;
  std::string what;
  int code = 0;
  try {
    c.close();  // if the input did not end, this graceful stop ends it, so a failure does not hang
  } catch (const amqp::error& e) {
    what = e.what();
    code = e.reply_code();
  }
  waited.wait();
  CHECK(ended);
  INFO(what);
  CHECK(what.find("cancelled the consumer of queue '" + q + "'") != std::string::npos);
  CHECK(code == 404);
  const auto s = c.stats();
  CHECK(s.reconnects == 0);  // it stopped; it did not loop reconnecting to a queue that is gone
  CHECK(s.delivered <= n);
  CHECK(runnel_test::queue_counts(*b, q) == std::pair<long, long>{-1, -1});  // gone
  CHECK_THROWS_AS(c.consume({.queue = out}), amqp::error);                    // the client is closed
}
