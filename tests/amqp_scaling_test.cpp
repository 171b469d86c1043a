// runnel::scaling with --amqp against a private broker (tests/amqp/broker.sh
// starts one for this program): tiny runs count every message through the
// broker into the consumer, in order with --ordered, and leave the queue
// empty; a queue that already holds messages is refused untouched. No
// timing is asserted.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "amqp/broker.hpp"
#include "runnel/scaling.hpp"
#include "scaling_support.hpp"

namespace sc = runnel::scaling;
using runnel_test::broker;

namespace {

using scaling_support::slurp;
using scaling_support::uneven_work;

struct tally {
  std::atomic<std::uint64_t> delivered{0}, out_of_order{0}, sum{0};
};

struct counting_consumer {
  tally* t;
  std::uint64_t expected = 0;
  void operator()(std::uint64_t v) {
    // Relaxed: read after the runs are joined.
    if (v != expected) t->out_of_order.fetch_add(1, std::memory_order_relaxed);
    expected = v + 1;
    t->sum.fetch_add(v, std::memory_order_relaxed);
    t->delivered.fetch_add(1, std::memory_order_relaxed);
  }
};


// The program with a std::string message ("<seq>") or a plain integer one.
int run_job(std::vector<std::string> args, tally& t, bool string_messages) {
  args.insert(args.begin(), "amqp_scaling_test");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  const int argc = static_cast<int>(argv.size());
  if (string_messages)
    return sc::run_main(
        argc, argv.data(), "strings", [](std::uint64_t seq) { return std::to_string(seq); },
        [](const std::string& s) { return uneven_work(std::stoull(s)); }, counting_consumer{&t});
  return sc::run_main(
      argc, argv.data(), "integers", [](std::uint64_t seq) { return seq; },
      [](std::uint64_t v) { return uneven_work(v); }, counting_consumer{&t});
}


}  // namespace

TEST_CASE("a tiny --amqp run sends every message through the broker once on each core count", "[amqp][scaling]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const bool ordered = GENERATE(false, true);
  const bool strings = GENERATE(false, true);
  INFO((ordered ? "ordered" : "unordered") << (strings ? ", string messages" : ", integer messages"));
  const std::string q = runnel_test::unique_name("scaling");
  const std::string json = "/tmp/" + q + ".json";
  tally t;
  std::vector<std::string> args{"--cores", "1,2", "--oversubscribe", "--messages", "600", "--repetitions", "2",
                                "--batch", "4", "--capacity", "32", "--amqp", b->url(), "--queue", q, "--json",
                                json};
  if (ordered) args.push_back("--ordered");
  REQUIRE(run_job(args, t, strings) == 0);
  // 2 core counts x 2 repetitions, each the whole stream 0..599.
  CHECK(t.delivered == 4 * 600);
  CHECK(t.sum == 4 * (599 * 600 / 2));
  if (ordered) CHECK(t.out_of_order == 0);
  CHECK(runnel_test::queue_counts(*b, q) == std::pair<long, long>{0, 0});

  const auto j = nlohmann::json::parse(slurp(json));
  std::remove(json.c_str());
  CHECK(j["options"]["amqp_queue"] == q);
  CHECK(j.dump().find("guest:guest") == std::string::npos);  // never the URL's password
  REQUIRE(j["results"].size() == 2);
  for (const auto& r : j["results"]) {
    CHECK(r["implementation"] == "runnel+amqp");
    CHECK(r["messages"] == 600);
    CHECK(r["messages_per_second"]["min"].get<double>() > 0);
    CHECK(r["latency_ns"]["p50"].get<double>() > 0);
  }
}

TEST_CASE("a queue that already holds messages is refused and left as it was", "[amqp][scaling]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::string q = runnel_test::unique_name("busy");
  runnel_test::raw r(b->port());
  r.fresh_queue(q);
  r.publish_n(q, 5, [](std::size_t i) { return "someone's work " + std::to_string(i); });
  tally t;
  CHECK(run_job({"--cores", "1", "--messages", "10", "--repetitions", "1", "--amqp", b->url(), "--queue", q}, t,
                false) == 1);
  CHECK(t.delivered == 0);
  CHECK(runnel_test::queue_counts(*b, q) == std::pair<long, long>{5, 0});
}

TEST_CASE("with --amqp, --seconds, a bad URL or an empty queue name is a usage error", "[amqp][scaling]") {
  tally t;
  CHECK(run_job({"--seconds", "1", "--amqp", "amqp://127.0.0.1", "--queue", "q"}, t, false) == 2);
  CHECK(run_job({"--amqp", "http://127.0.0.1", "--queue", "q"}, t, false) == 2);
  CHECK(run_job({"--amqp", "amqp://127.0.0.1", "--queue", ""}, t, false) == 2);
  CHECK(t.delivered == 0);
}
