// The store step over a real broker: consume -> compute -> runnel::sqlite::store,
// acked after the commit. Consumer processes (forked) are killed with SIGKILL
// mid-batch, their connections closed under them, and one crashes between
// commit and ack; the table must end with every input id exactly once, with
// its value, and the input queue empty. RUNNEL_SQLITE_AMQP_N sets the input
// size (default 3000).
#include <catch2/catch.hpp>

#include <runnel/amqp.hpp>
#include <runnel/pipeline.hpp>
#include <runnel/sqlite.hpp>
#include <runnel/thread_pool.hpp>

#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "amqp/broker.hpp"
#include "test_support.hpp"

using namespace std::chrono_literals;
namespace amqp = runnel::amqp;
namespace sq = runnel::sqlite;
using runnel_test::broker;
using runnel_test::raw;

namespace {

std::size_t n_inputs() {
  const char* v = std::getenv("RUNNEL_SQLITE_AMQP_N");
  return v != nullptr ? static_cast<std::size_t>(std::atol(v)) : 3000;
}

template <class Pred>
bool eventually(Pred pred, std::chrono::seconds limit = std::chrono::seconds(120)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(50ms);
  }
  return true;
}

struct result {
  amqp::delivery in;
  std::int64_t id = 0;
  std::int64_t value = 0;
};

std::int64_t value_of(std::int64_t id) { return id * 7 + 3; }

struct consumer_args {
  std::string url, queue, db, report;
  int throttle_us = 0;         // per message in the compute stage (keeps batches in flight)
  int crash_after_commit = 0;  // > 0: _exit inside the k-th on_commit (committed, not acked)
  int kill_in_txn = 0;         // > 0: SIGKILL itself inside the k-th bind (mid-transaction)
};

volatile std::sig_atomic_t g_stop = 0;
extern "C" void on_term(int) { g_stop = 1; }

// The consumer process: runs until SIGTERM, then stops gracefully and
// writes its store's stats to args.report. Never returns.
[[noreturn]] void consumer_main(const consumer_args& a) {
  try {
    std::signal(SIGTERM, on_term);
    int commits = 0;
    sq::store_options o;
    o.path = a.db;
    o.schema = {"CREATE TABLE IF NOT EXISTS results(id INTEGER, value INTEGER)"};
    o.insert = "INSERT INTO results(id, value) VALUES(?1, ?2)";
    o.batch = 50;
    o.max_wait = 50ms;
    sq::store_handlers<result> h;
    int binds = 0;
    h.bind = [&](sq::statement& s, const result& r) {
      if (a.kill_in_txn > 0 && ++binds == a.kill_in_txn) {
        // Earlier rows of this transaction are written, not committed. The
        // pause gives an ack sent too early the time to reach the broker.
        std::this_thread::sleep_for(300ms);
        ::kill(::getpid(), SIGKILL);
      }
      s.bind(1, r.id).bind(2, r.value);
    };
    h.key = [](const result& r) { return r.in.body; };
    h.on_commit = [&](std::span<result> b) {
      if (a.crash_after_commit > 0 && ++commits == a.crash_after_commit) {
        std::ofstream(a.report) << "crashed_batch " << b.size() << "\n";
        ::_exit(3);  // committed, never released: no ack
      }
    };
    sq::store<result> st(o, std::move(h));
    runnel::thread_pool pool({.threads = 2, .pin = false});
    amqp::client c{amqp::connection_options::from_url(a.url)};
    const int throttle = a.throttle_us;
    auto run = runnel::pipeline{pool}
                   .from(c.consume({.queue = a.queue, .prefetch = 200}))
                   .stage([throttle](amqp::delivery d) {
                     if (throttle > 0) std::this_thread::sleep_for(std::chrono::microseconds(throttle));
                     result r;
                     r.id = std::stoll(d.body);
                     r.value = value_of(r.id);
                     r.in = std::move(d);
                     return r;
                   }, {.workers = 2})
                   .to(st.input())
                   .run();
    while (g_stop == 0) std::this_thread::sleep_for(10ms);
    c.close();
    run.wait();
    st.close();
    const auto s = st.stats();
    std::ofstream(a.report) << "stored " << s.stored << " duplicates " << s.duplicates << " failed " << s.failed
                            << "\n";
    ::_exit(0);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "consumer: %s\n", e.what());
    ::_exit(2);
  }
}

// The test process has no threads of its own when it forks (the broker is
// another process), so the child may start its own.
pid_t spawn(const consumer_args& a) {
  const pid_t p = ::fork();
  REQUIRE(p >= 0);
  if (p == 0) consumer_main(a);
  return p;
}

int wait_exit(pid_t p) {
  int st = 0;
  ::waitpid(p, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

// Single-value query on a read-only connection; -1 when the file is not there yet.
std::int64_t query(const std::string& db, const char* sql) {
  sqlite3* h = nullptr;
  if (sqlite3_open_v2(db.c_str(), &h, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
    sqlite3_close(h);
    return -1;
  }
  sqlite3_busy_timeout(h, 5000);
  sqlite3_stmt* st = nullptr;
  std::int64_t v = -1;
  if (sqlite3_prepare_v2(h, sql, -1, &st, nullptr) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
    v = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  sqlite3_close(h);
  return v;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::string s, w;
  while (f >> w) s += (s.empty() ? "" : " ") + w;
  return s;
}

// Every id 0..n-1 exactly once with its value, nothing else, one key each.
void check_table(const std::string& db, std::size_t n) {
  const auto ni = static_cast<std::int64_t>(n);
  CHECK(query(db, "SELECT count(*) FROM results") == ni);
  CHECK(query(db, "SELECT count(DISTINCT id) FROM results") == ni);
  CHECK(query(db, "SELECT min(id) FROM results") == 0);
  CHECK(query(db, "SELECT max(id) FROM results") == ni - 1);
  CHECK(query(db, "SELECT count(*) FROM results WHERE value != id * 7 + 3") == 0);
  CHECK(query(db, "SELECT count(*) FROM runnel_applied") == ni);
}

// Runs a last consumer until the table holds n rows, stops it with SIGTERM.
std::string finish(consumer_args a, std::size_t n, std::chrono::seconds limit = std::chrono::seconds(120)) {
  a.throttle_us = 0;
  a.crash_after_commit = 0;
  a.kill_in_txn = 0;
  const pid_t p = spawn(a);
  const bool all =
      eventually([&] { return query(a.db, "SELECT count(*) FROM results") >= static_cast<std::int64_t>(n); }, limit);
  ::kill(p, SIGTERM);
  CHECK(wait_exit(p) == 0);
  REQUIRE(all);
  return slurp(a.report);
}

struct scratch_dir {
  std::filesystem::path dir;
  scratch_dir() {
    char tmpl[] = "/tmp/runnel-amqp-sqlite-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    dir = tmpl;
  }
  ~scratch_dir() { std::filesystem::remove_all(dir); }
};

}  // namespace

TEST_CASE("consumers killed with SIGKILL mid-batch and connections closed under them: every id stored exactly once, queue empty",
          "[amqp][broker][sqlite]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = n_inputs();
  scratch_dir d;
  consumer_args a{b->url(), runnel_test::unique_name("sqin"), (d.dir / "out.db").string(),
                  (d.dir / "report").string(), 20000, 0};
  {
    raw r(b->port());
    r.fresh_queue(a.queue);
    r.publish_n(a.queue, n, [](std::size_t i) { return std::to_string(i); });
  }
  std::mt19937 rng(std::random_device{}());
  std::int64_t before = 0;
  for (int round = 0; round < 4; ++round) {
    const pid_t p = spawn(a);
    // Let it get going (connected, batches committing), then cut it down at
    // a random moment; in round 1 its connection is closed first.
    eventually([&] { return query(a.db, "SELECT count(*) FROM results") > before; }, 30s);
    std::this_thread::sleep_for(std::chrono::milliseconds(100 + rng() % 250));
    if (round == 1) {
      b->ctl("close_all_connections sqlite-test");
      std::this_thread::sleep_for(std::chrono::milliseconds(150 + rng() % 200));
    }
    ::kill(p, SIGKILL);
    CHECK(wait_exit(p) == 128 + SIGKILL);
    before = query(a.db, "SELECT count(*) FROM results");
    std::printf("sqlite kill test: round %d killed at %lld rows\n", round, static_cast<long long>(before));
  }
  // The kills really hit a stream in progress.
  REQUIRE(before > 0);
  REQUIRE(before < static_cast<std::int64_t>(n));
  const std::string report = finish(a, n);
  INFO(report);
  check_table(a.db, n);
  // No consumer is left, so anything unacked would be ready again.
  CHECK(raw(b->port()).ready(a.queue) == 0);
}

TEST_CASE("a crash between commit and ack: the redelivered messages are deduplicated", "[amqp][broker][sqlite]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = 1000;
  scratch_dir d;
  consumer_args a{b->url(), runnel_test::unique_name("sqcrash"), (d.dir / "out.db").string(),
                  (d.dir / "report").string(), 200, 3};
  {
    raw r(b->port());
    r.fresh_queue(a.queue);
    r.publish_n(a.queue, n, [](std::size_t i) { return std::to_string(i); });
  }
  const pid_t p = spawn(a);
  CHECK(wait_exit(p) == 3);  // died inside its third on_commit
  long crashed = 0;
  REQUIRE(std::sscanf(slurp(a.report).c_str(), "crashed_batch %ld", &crashed) == 1);
  REQUIRE(crashed > 0);
  const std::int64_t committed = query(a.db, "SELECT count(*) FROM results");
  REQUIRE(committed >= crashed);
  const std::string report = finish(a, n);
  INFO(report);
  long stored = -1, dups = -1, failed = -1;
  REQUIRE(std::sscanf(report.c_str(), "stored %ld duplicates %ld failed %ld", &stored, &dups, &failed) == 3);
  // The crashed batch was committed but never acked: all of it came back
  // and was recognised (earlier batches' acks may have been lost too).
  CHECK(dups >= crashed);
  CHECK(stored == static_cast<long>(n) - committed);
  CHECK(failed == 0);
  check_table(a.db, n);
  // No consumer is left, so anything unacked would be ready again.
  CHECK(raw(b->port()).ready(a.queue) == 0);
}

TEST_CASE("a consumer killed with SIGKILL inside a transaction: none of that batch was acked, every id stored once",
          "[amqp][broker][sqlite]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const std::size_t n = 1000;
  const int kill_at = 120;  // the 120th row written: inside the third batch at the latest
  scratch_dir d;
  consumer_args a{b->url(), runnel_test::unique_name("sqtxn"), (d.dir / "out.db").string(),
                  (d.dir / "report").string(), 0, 0, kill_at};
  {
    raw r(b->port());
    r.fresh_queue(a.queue);
    r.publish_n(a.queue, n, [](std::size_t i) { return std::to_string(i); });
  }
  const pid_t p = spawn(a);
  CHECK(wait_exit(p) == 128 + SIGKILL);
  // The transaction holding the 120th row never committed.
  const std::int64_t committed = query(a.db, "SELECT count(*) FROM results");
  REQUIRE(committed >= 0);
  REQUIRE(committed < kill_at);
  const std::string report = finish(a, n, std::chrono::seconds(30));
  INFO(report);
  check_table(a.db, n);
  // No consumer is left, so anything unacked would be ready again.
  CHECK(raw(b->port()).ready(a.queue) == 0);
}

// Runs in the test process (after the forking cases: its threads are joined
// before it returns).
TEST_CASE("a write that fails (constraint violation, full disk) sends its inputs to the failure policy: "
          "each input ends stored or dead-lettered, never both, never acked unstored",
          "[amqp][broker][sqlite]") {
  broker* b = broker::get();
  if (b == nullptr) return;
  const bool full_disk = GENERATE(false, true);
  INFO((full_disk ? "full disk (max_page_count)" : "CHECK constraint violation"));
  const std::size_t n = 400;
  scratch_dir d;
  const std::string db = (d.dir / "out.db").string();
  const std::string in = runnel_test::unique_name("sqbad"), dead = runnel_test::unique_name("sqdead");
  {
    raw r(b->port());
    r.fresh_queue(in);
    r.fresh_queue(dead);
    r.publish_n(in, n, [](std::size_t i) { return std::to_string(i); });
  }
  // Constraint case: every id with id % 50 == 7 computes a negative value,
  // which the table's CHECK refuses. Full-disk case: 2 KiB a row into 64
  // pages of 4 KiB, so the table fills part of the way through.
  auto bad = [full_disk](std::int64_t id) { return !full_disk && id % 50 == 7; };
  sq::store_options o;
  o.path = db;
  if (full_disk) {
    o.schema = {"PRAGMA page_size = 4096", "CREATE TABLE IF NOT EXISTS results(id INTEGER, value INTEGER, pad BLOB)",
                "PRAGMA max_page_count = 64"};
  } else {
    o.schema = {"CREATE TABLE IF NOT EXISTS results(id INTEGER, value INTEGER CHECK(value >= 0), pad BLOB)"};
  }
  o.insert = "INSERT INTO results(id, value, pad) VALUES(?1, ?2, ?3)";
  o.batch = 50;
  o.max_wait = 50ms;
  sq::store_handlers<result> h;
  h.bind = [full_disk](sq::statement& s, const result& r) {
    const std::string pad(full_disk ? 2048 : 0, 'p');
    s.bind(1, r.id).bind(2, r.value).bind_blob(3, pad.data(), pad.size());
  };
  h.key = [](const result& r) { return r.in.body; };
  // Full disk: on_failure puts the SQLite error into x-runnel-error.
  // Constraint: no on_failure; the store destroys the messages as failed,
  // which alone must send them to the failure policy.
  if (full_disk) {
    h.on_failure = [](std::span<result> rs, const sq::write_failure& f) {
      for (result& r : rs) r.in.fail(f.what);
    };
  }
  sq::store<result> st(o, std::move(h));
  {
    runnel::thread_pool pool({.threads = 2, .pin = false});
    amqp::client c{amqp::connection_options::from_url(b->url())};
    amqp::consume_options co{.queue = in, .prefetch = 200};
    co.on_failure.max_attempts = 2;
    co.on_failure.dead_letter_routing_key = dead;
    auto run = runnel::pipeline{pool}
                   .from(c.consume(co))
                   .stage([&bad](amqp::delivery dl) {
                     result r;
                     r.id = std::stoll(dl.body);
                     r.value = bad(r.id) ? -1 : value_of(r.id);
                     r.in = std::move(dl);
                     return r;
                   }, {.workers = 2})
                   .to(st.input())
                   .run();
    // Every input either has its row or sits in the dead-letter queue.
    raw watch(b->port());
    const bool settled = eventually(
        [&] { return query(db, "SELECT count(*) FROM results") + watch.ready(dead) >= static_cast<std::int64_t>(n); },
        30s);
    c.close();
    run.wait();
    CHECK(settled);
    CHECK(c.stats().dead_lettered == watch.ready(dead));
  }
  st.close();
  std::set<std::int64_t> stored, dead_ids;
  {
    sqlite3* h2 = nullptr;
    REQUIRE(sqlite3_open_v2(db.c_str(), &h2, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
    sqlite3_stmt* q = nullptr;
    REQUIRE(sqlite3_prepare_v2(h2, "SELECT id, value FROM results", -1, &q, nullptr) == SQLITE_OK);
    std::size_t rows = 0, wrong = 0;
    while (sqlite3_step(q) == SQLITE_ROW) {
      ++rows;
      const std::int64_t id = sqlite3_column_int64(q, 0);
      if (sqlite3_column_int64(q, 1) != value_of(id)) ++wrong;
      stored.insert(id);
    }
    sqlite3_finalize(q);
    sqlite3_close(h2);
    CHECK(rows == stored.size());  // no id twice
    CHECK(wrong == 0);
  }
  const auto dl = raw(b->port()).take(dead, n, 1000);
  std::size_t without_reason = 0;
  for (const auto& m : dl) {
    dead_ids.insert(std::stoll(m.body));
    const auto e = m.headers.find("x-runnel-error");
    if (e == m.headers.end() || (full_disk && e->second.find("full") == std::string::npos)) ++without_reason;
  }
  CHECK(dl.size() == dead_ids.size());  // no id dead-lettered twice
  CHECK(without_reason == 0);
  for (const std::int64_t id : stored) CHECK(dead_ids.count(id) == 0);
  CHECK(stored.size() + dead_ids.size() == n);
  CHECK(!stored.empty());
  CHECK(!dead_ids.empty());
  if (!full_disk) {
    for (const std::int64_t id : dead_ids) CHECK(bad(id));
    CHECK(dead_ids.size() == n / 50);
  }
  // Both attempts of every dead-lettered input failed; with a full disk a
  // retried input may also fit the second time (a lone row after a batch).
  if (full_disk) {
    CHECK(st.stats().failed >= 2 * dead_ids.size());
  } else {
    CHECK(st.stats().failed == 2 * dead_ids.size());
  }
  CHECK(st.stats().stored == stored.size());
  CHECK(query(db, "SELECT count(*) FROM runnel_applied") == static_cast<std::int64_t>(stored.size()));
  // No consumer is left, so anything unacked would be ready again.
  CHECK(raw(b->port()).ready(in) == 0);
}
