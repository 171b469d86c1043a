// detail::overflow_queue on its own (the thread pool's overflow list): order,
// the "not yet" state of a producer held between its exchange and its link,
// unpop(), and producers racing a consumer with exact counts and
// per-producer order, oversubscribed.
#include <runnel/pool/overflow_queue.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "test_support.hpp"

namespace {

struct node {
  std::atomic<node*> next{nullptr};
  std::size_t producer = 0;
  std::size_t seq = 0;
};

using queue = runnel::detail::overflow_queue<node>;

// Pops everything currently reachable (no producer is active).
std::vector<node*> drain(queue& q) {
  std::vector<node*> out;
  while (node* n = q.pop()) out.push_back(n);
  return out;
}

}  // namespace

TEST_CASE("an overflow queue hands nodes back in push order and is empty after", "[overflow]") {
  queue q;
  REQUIRE_FALSE(q.nonempty());
  REQUIRE(q.pop() == nullptr);
  std::vector<node> nodes(5);
  for (std::size_t round = 0; round < 3; ++round) {  // the stub is re-queued each round
    for (auto& n : nodes) q.push(&n);
    REQUIRE(q.nonempty());
    const std::vector<node*> got = drain(q);
    REQUIRE(got.size() == nodes.size());
    for (std::size_t i = 0; i < nodes.size(); ++i) REQUIRE(got[i] == &nodes[i]);
    REQUIRE_FALSE(q.nonempty());
    REQUIRE(q.pop() == nullptr);
  }
}

TEST_CASE("unpop puts the last popped node back at the head", "[overflow]") {
  queue q;
  std::vector<node> nodes(3);
  for (auto& n : nodes) q.push(&n);
  node* a = q.pop();
  REQUIRE(a == &nodes[0]);
  q.unpop(a);
  REQUIRE(q.pop() == &nodes[0]);
  REQUIRE(q.pop() == &nodes[1]);
  node* c = q.pop();  // the last node: the stub now sits behind it
  REQUIRE(c == &nodes[2]);
  REQUIRE_FALSE(q.nonempty());
  q.unpop(c);  // in front of a stub that is also the tail
  REQUIRE(q.nonempty());
  REQUIRE(q.pop() == &nodes[2]);
  REQUIRE_FALSE(q.nonempty());
  REQUIRE(q.pop() == nullptr);
}

TEST_CASE("a producer held between its exchange and its link makes the consumer wait, not skip", "[overflow]") {
  queue q;
  node a, b, c;
  SECTION("behind a linked node") {
    q.push(&a);
    node* prev = q.exchange_tail(&b);  // b's producer stops here
    REQUIRE(prev == &a);
    REQUIRE(q.nonempty());
    // a is linked but is the last linked node: taking it needs the tail,
    // which is b's. "Not yet", for a as well as for b.
    REQUIRE(q.pop() == nullptr);
    REQUIRE(q.pop() == nullptr);
    q.push(&c);  // queues behind b
    REQUIRE(q.pop() == nullptr);
    q.link(prev, &b);
    REQUIRE(q.pop() == &a);
    REQUIRE(q.pop() == &b);
    REQUIRE(q.pop() == &c);
  }
  SECTION("on an empty queue") {
    node* prev = q.exchange_tail(&a);
    REQUIRE(q.nonempty());  // counted as work while it is linked
    REQUIRE(q.pop() == nullptr);
    q.link(prev, &a);
    REQUIRE(q.pop() == &a);
  }
  SECTION("behind the stub the consumer has just re-queued") {
    q.push(&a);
    q.push(&b);
    REQUIRE(q.pop() == &a);
    REQUIRE(q.pop() == &b);  // re-queues the stub behind b
    node* prev = q.exchange_tail(&c);
    REQUIRE(q.nonempty());
    REQUIRE(q.pop() == nullptr);
    q.link(prev, &c);
    REQUIRE(q.pop() == &c);
  }
  REQUIRE_FALSE(q.nonempty());
  REQUIRE(q.pop() == nullptr);
}

namespace {

// Producers push `per_producer` numbered nodes each while `consumers`
// threads take turns (under a mutex, as the pool's workers do) popping,
// sometimes putting a node back with unpop() as the pool's refill does when
// its ring is full. Checks every node is taken exactly once and each
// producer's nodes in order; returns how often a pop said "not yet" while
// the queue was nonempty.
std::size_t race(std::size_t producers, std::size_t consumers, std::size_t per_producer) {
  queue q;
  const std::size_t total = producers * per_producer;
  // Producer p owns [p * per_producer, (p + 1) * per_producer) and fills in
  // each node's payload just before pushing it, so the consumer's reads
  // race with those writes unless the link publishes them.
  std::vector<node> nodes(total);
  std::atomic<std::size_t> producers_done{0};
  std::mutex consumer_mutex;
  std::vector<std::size_t> next_seq(producers, 0);  // guarded by consumer_mutex
  std::size_t taken = 0;                            // guarded by consumer_mutex
  std::size_t out_of_order = 0, unknown = 0;        // guarded by consumer_mutex
  std::size_t not_yet = 0;                          // guarded by consumer_mutex
  std::vector<std::uint8_t> seen(total, 0);         // guarded by consumer_mutex
  runnel_test::run_threads(producers + consumers, [&](std::size_t t) {
    if (t < producers) {
      for (std::size_t i = 0; i < per_producer; ++i) {
        node& n = nodes[t * per_producer + i];
        n.producer = t;
        n.seq = i;
        q.push(&n);
        if (i % 64 == 0) std::this_thread::yield();  // let consumers in mid-stream
      }
      producers_done.fetch_add(1);
      return;
    }
    std::size_t round = 0;
    for (;;) {
      // Read before the pop: when every producer had finished and the pop
      // then finds nothing, nothing more will come (a lost node must fail
      // the counts below, not hang the test).
      const bool all_pushed = producers_done.load() == producers;
      std::lock_guard lock(consumer_mutex);
      if (taken == total) return;
      node* n = q.pop();
      if (n == nullptr) {
        if (q.nonempty()) ++not_yet;
        else if (all_pushed) return;
        continue;
      }
      if (++round % 7 == 0) {  // put it back and take it again
        q.unpop(n);
        n = q.pop();
        if (n == nullptr) {
          ++unknown;  // unpop lost the node
          continue;
        }
      }
      if (n->producer >= producers || n->seq >= per_producer) {
        ++unknown;
        continue;
      }
      if (n->seq != next_seq[n->producer]) ++out_of_order;
      next_seq[n->producer] = n->seq + 1;
      ++seen[n->producer * per_producer + n->seq];
      ++taken;
    }
  });
  CHECK(taken == total);
  CHECK(unknown == 0);
  CHECK(out_of_order == 0);
  std::size_t not_once = 0;
  for (const std::uint8_t s : seen) not_once += s != 1;
  CHECK(not_once == 0);
  CHECK_FALSE(q.nonempty());
  CHECK(q.pop() == nullptr);
  return not_yet;
}

}  // namespace

TEST_CASE("producers racing a consumer: every node once, each producer's in order", "[overflow]") {
  const std::size_t per_producer = runnel_test::scaled(200'000);
  const std::size_t not_yet = race(4, 1, per_producer);
  // Informational: how often the consumer met a producer mid-link.
  WARN("consumer saw 'not yet' " << not_yet << " times");
}

TEST_CASE("oversubscribed: more producers and consumers than cores", "[overflow]") {
  const std::size_t cores = std::thread::hardware_concurrency() == 0 ? 2 : std::thread::hardware_concurrency();
  const std::size_t per_producer = runnel_test::scaled(40'000);
  const std::size_t not_yet = race(2 * cores + 1, 3, per_producer);
  WARN("consumers saw 'not yet' " << not_yet << " times");
}
