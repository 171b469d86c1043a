// runnel::sqlite::store in-process (no broker): exact rows, batching,
// idempotence on replay, and the error path (constraint violation, full
// disk, a throwing bind), with the fate each message is destroyed under.
#include <catch2/catch.hpp>

#include <runnel/pipeline.hpp>
#include <runnel/sqlite.hpp>
#include <runnel/thread_pool.hpp>

#include <sqlite3.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace sq = runnel::sqlite;
using namespace std::chrono_literals;

namespace {

// A scratch directory removed at the end of the test case.
struct scratch {
  std::filesystem::path dir;
  scratch() {
    char tmpl[] = "/tmp/runnel-sqlite-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    dir = tmpl;
  }
  ~scratch() { std::filesystem::remove_all(dir); }
  std::string db() const { return (dir / "t.db").string(); }
};

// How each message ended: the fate it was destroyed under, by id. A
// moved-from shell records nothing (like a delivery without identity).
struct fates {
  std::mutex mu;
  std::map<std::int64_t, std::vector<runnel::message_fate>> by_id;
  std::vector<runnel::message_fate> of(std::int64_t id) {
    std::lock_guard l(mu);
    return by_id[id];
  }
};

struct row {
  std::int64_t id = 0;
  std::int64_t value = 0;
  std::shared_ptr<fates> log;  // null: not tracked, or moved from
  row() = default;
  row(std::int64_t i, std::int64_t v, std::shared_ptr<fates> l = nullptr) : id(i), value(v), log(std::move(l)) {}
  row(row&& o) noexcept : id(o.id), value(o.value), log(std::move(o.log)) {}
  row& operator=(row&& o) noexcept {
    id = o.id;
    value = o.value;
    log = std::move(o.log);
    return *this;
  }
  ~row() {
    if (!log) return;
    std::lock_guard l(log->mu);
    log->by_id[id].push_back(runnel::current_message_fate());
  }
};

sq::store_handlers<row> handlers(bool keyed) {
  sq::store_handlers<row> h;
  h.bind = [](sq::statement& s, const row& r) { s.bind(1, r.id).bind(2, r.value); };
  if (keyed) h.key = [](const row& r) { return "k" + std::to_string(r.id); };
  return h;
}

sq::store_options options(const scratch& s, std::string table_sql = "CREATE TABLE IF NOT EXISTS results(id INTEGER, value INTEGER)") {
  sq::store_options o;
  o.path = s.db();
  o.schema = {std::move(table_sql)};
  o.insert = "INSERT INTO results(id, value) VALUES(?1, ?2)";
  return o;
}

// The table as id -> values (a separate connection: only committed rows).
// Throws instead of asserting: on_commit calls it on the writer thread.
std::map<std::int64_t, std::vector<std::int64_t>> read_rows(const std::string& path) {
  std::map<std::int64_t, std::vector<std::int64_t>> out;
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
    sqlite3_close(db);
    throw std::runtime_error("read_rows: open");
  }
  sqlite3_busy_timeout(db, 5000);
  sqlite3_stmt* st = nullptr;
  if (sqlite3_prepare_v2(db, "SELECT id, value FROM results", -1, &st, nullptr) != SQLITE_OK) {
    sqlite3_close(db);
    throw std::runtime_error("read_rows: prepare");
  }
  while (sqlite3_step(st) == SQLITE_ROW) out[sqlite3_column_int64(st, 0)].push_back(sqlite3_column_int64(st, 1));
  sqlite3_finalize(st);
  sqlite3_close(db);
  return out;
}

void send_all(sq::store<row>& st, std::int64_t from, std::int64_t to, std::shared_ptr<fates> log = nullptr,
              std::int64_t mul = 3) {
  auto tx = st.input();
  for (std::int64_t i = from; i < to; ++i) REQUIRE(tx.send(row(i, i * mul + 1, log)).ok());
}

}  // namespace

TEST_CASE("Every message of a pipeline is committed exactly once, with its value, and released only after its commit") {
  scratch s;
  const std::int64_t n = static_cast<std::int64_t>(runnel_test::scaled(20000));
  auto log = std::make_shared<fates>();
  std::atomic<std::int64_t> seen_in_commit{0};
  std::atomic<bool> visible_before_release{true};
  auto h = handlers(false);
  const std::string path = s.db();
  // on_commit runs before the release: the rows must already be visible to
  // another connection (committed), and the messages not yet destroyed.
  h.on_commit = [&](std::span<row> b) {
    seen_in_commit += static_cast<std::int64_t>(b.size());
    const auto rows = read_rows(path);
    for (const row& r : b) {
      if (rows.count(r.id) != 1 || !log->of(r.id).empty()) visible_before_release = false;
    }
  };
  auto o = options(s);
  o.batch = 500;
  sq::store<row> st(o, std::move(h));
  runnel::pool_options po;
  po.threads = 2;
  po.pin = false;
  runnel::thread_pool pool(po);
  std::int64_t next = 0;
  auto run = runnel::pipeline{pool}
                 .source([&]() -> std::optional<std::int64_t> {
                   if (next == n) return std::nullopt;
                   return next++;
                 })
                 .stage([&](std::int64_t i) { return row(i, i * 3 + 1, log); }, {.workers = 2})
                 .to(st.input())
                 .run();
  run.wait();
  st.close();
  const auto rows = read_rows(path);
  REQUIRE(static_cast<std::int64_t>(rows.size()) == n);
  for (const auto& [id, values] : rows) {
    REQUIRE(values.size() == 1);
    REQUIRE(values[0] == id * 3 + 1);
    REQUIRE(log->of(id) == std::vector{runnel::message_fate::normal});
  }
  REQUIRE(visible_before_release);
  REQUIRE(seen_in_commit == n);
  const auto stats = st.stats();
  REQUIRE(stats.received == static_cast<std::uint64_t>(n));
  REQUIRE(stats.stored == static_cast<std::uint64_t>(n));
  REQUIRE(stats.failed == 0);
  REQUIRE(stats.rollbacks == 0);
  REQUIRE(stats.commits >= static_cast<std::uint64_t>(n / 500));
}

TEST_CASE("A full batch is committed in one transaction, and a lone message is committed after max_wait") {
  scratch s;
  std::mutex mu;
  std::vector<std::size_t> sizes;
  std::promise<void> first_commit;
  auto h = handlers(false);
  h.on_commit = [&](std::span<row> b) {
    std::lock_guard l(mu);
    sizes.push_back(b.size());
    if (sizes.size() == 1) first_commit.set_value();
  };
  SECTION("full batches") {
    auto o = options(s);
    o.batch = 64;
    o.max_wait = 600s;  // never reached: only a full batch or the close commits
    sq::store<row> st(o, std::move(h));
    send_all(st, 0, 64 * 10 + 5);
    st.close();
    REQUIRE(sizes == std::vector<std::size_t>{64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 5});
    REQUIRE(st.stats().commits == 11);
    REQUIRE(read_rows(s.db()).size() == 64 * 10 + 5);
  }
  SECTION("max_wait") {
    auto o = options(s);
    o.batch = 1000;
    o.max_wait = 20ms;
    sq::store<row> st(o, std::move(h));
    auto tx = st.input();
    for (int i = 0; i < 3; ++i) REQUIRE(tx.send(row(i, i)).ok());
    // The store stays open and its sender alive: only max_wait can commit.
    REQUIRE(first_commit.get_future().wait_for(60s) == std::future_status::ready);
    REQUIRE(read_rows(s.db()).size() == 3);
  }
}

TEST_CASE("A replayed key leaves the table unchanged and is released as committed, across restarts and within a batch") {
  scratch s;
  auto log = std::make_shared<fates>();
  {
    sq::store<row> st(options(s), handlers(true));
    send_all(st, 0, 100, log);
    st.close();
    REQUIRE(st.stats().stored == 100);
    REQUIRE(st.stats().duplicates == 0);
  }
  {
    // A restarted consumer sees 50..149 again (50..99 redelivered), with
    // other values: the first write of a key wins; duplicates are released
    // normally (acked), like stored ones.
    auto o = options(s);
    o.batch = 1000;
    o.max_wait = 600s;
    sq::store<row> st(o, handlers(true));
    auto tx = st.input();
    for (std::int64_t i = 50; i < 150; ++i) REQUIRE(tx.send(row(i, -i, log)).ok());
    REQUIRE(tx.send(row(120, -7, log)).ok());  // twice in one batch
    tx.reset();
    st.close();
    REQUIRE(st.stats().stored == 50);
    REQUIRE(st.stats().duplicates == 51);
  }
  const auto rows = read_rows(s.db());
  REQUIRE(rows.size() == 150);
  for (const auto& [id, values] : rows) {
    REQUIRE(values.size() == 1);
    REQUIRE(values[0] == (id < 100 ? id * 3 + 1 : -id));
  }
  for (std::int64_t i = 0; i < 150; ++i)
    for (auto f : log->of(i)) REQUIRE(f == runnel::message_fate::normal);
}

TEST_CASE("A constraint violation rolls the transaction back and reaches on_failure with its messages, destroyed as failed") {
  scratch s;
  auto log = std::make_shared<fates>();
  std::mutex mu;
  std::vector<std::int64_t> failed_ids;
  std::vector<int> codes;
  auto h = handlers(true);
  h.on_failure = [&](std::span<row> b, const sq::write_failure& f) {
    std::lock_guard l(mu);
    for (const row& r : b) failed_ids.push_back(r.id);
    codes.push_back(f.error != nullptr ? f.code : -1);  // checked below: Catch2 asserts only on the test's thread
  };
  auto o = options(s, "CREATE TABLE IF NOT EXISTS results(id INTEGER, value INTEGER CHECK(value >= 0))");
  o.batch = 10;
  o.max_wait = 600s;
  bool isolate = GENERATE(true, false);
  o.isolate_failures = isolate;
  sq::store<row> st(o, std::move(h));
  auto tx = st.input();
  for (std::int64_t i = 0; i < 10; ++i) REQUIRE(tx.send(row(i, i == 4 ? -1 : i, log)).ok());
  tx.reset();
  st.close();
  std::set<std::int64_t> committed;
  for (const auto& [id, v] : read_rows(s.db())) committed.insert(id);
  if (isolate) {
    REQUIRE(failed_ids == std::vector<std::int64_t>{4});
    REQUIRE(committed.size() == 9);
    REQUIRE(committed.count(4) == 0);
  } else {
    REQUIRE(failed_ids.size() == 10);
    REQUIRE(committed.empty());
  }
  REQUIRE(codes.size() == 1);
  REQUIRE(codes[0] == SQLITE_CONSTRAINT);
  for (std::int64_t i = 0; i < 10; ++i) {
    const bool failed = !isolate || i == 4;
    REQUIRE(log->of(i) == std::vector{failed ? runnel::message_fate::failed : runnel::message_fate::normal});
  }
  REQUIRE(st.stats().failed == (isolate ? 1u : 10u));
  REQUIRE(st.stats().rollbacks >= 1);
  // The failed key was rolled back with its row: the corrected message is
  // stored, not taken for a duplicate.
  {
    sq::store<row> again(options(s), handlers(true));
    auto tx2 = again.input();
    REQUIRE(tx2.send(row(4, 44)).ok());
    tx2.reset();
    again.close();
    REQUIRE(again.stats().stored == 1);
  }
  REQUIRE(read_rows(s.db())[4] == std::vector<std::int64_t>{44});
}

TEST_CASE("A full disk (max_page_count) rolls back and reports; exactly the committed messages are in the table") {
  scratch s;
  auto log = std::make_shared<fates>();
  std::mutex mu;
  std::set<std::int64_t> ok_ids, failed_ids;
  std::set<int> codes;
  sq::store_handlers<row> h;
  // 2 KiB a row into a database limited to 64 pages of 4 KiB.
  h.bind = [](sq::statement& st, const row& r) {
    const std::string blob(2048, static_cast<char>('a' + r.id % 26));
    st.bind(1, r.id).bind_blob(2, blob.data(), blob.size());
  };
  h.key = [](const row& r) { return std::to_string(r.id); };
  h.on_commit = [&](std::span<row> b) {
    std::lock_guard l(mu);
    for (const row& r : b) ok_ids.insert(r.id);
  };
  h.on_failure = [&](std::span<row> b, const sq::write_failure& f) {
    std::lock_guard l(mu);
    for (const row& r : b) failed_ids.insert(r.id);
    codes.insert(f.code);
  };
  sq::store_options o;
  o.path = s.db();
  o.schema = {"PRAGMA page_size = 4096", "CREATE TABLE IF NOT EXISTS results(id INTEGER, value BLOB)",
              "PRAGMA max_page_count = 64"};
  o.insert = "INSERT INTO results(id, value) VALUES(?1, ?2)";
  o.batch = 8;
  o.max_wait = 600s;
  o.isolate_failures = GENERATE(true, false);
  const std::int64_t n = 400;  // ~800 KiB: far beyond 256 KiB
  {
    sq::store<row> st(o, std::move(h));
    send_all(st, 0, n, log);
    st.close();
    REQUIRE(st.stats().failed == failed_ids.size());
    REQUIRE(st.stats().stored == ok_ids.size());
  }
  REQUIRE(!ok_ids.empty());
  REQUIRE(!failed_ids.empty());
  REQUIRE(codes == std::set<int>{SQLITE_FULL});
  REQUIRE(ok_ids.size() + failed_ids.size() == static_cast<std::size_t>(n));
  std::set<std::int64_t> in_table;
  for (const auto& [id, v] : read_rows(s.db())) {
    REQUIRE(v.size() == 1);
    in_table.insert(id);
  }
  REQUIRE(in_table == ok_ids);
  for (std::int64_t i = 0; i < n; ++i)
    REQUIRE(log->of(i) == std::vector{failed_ids.count(i) ? runnel::message_fate::failed : runnel::message_fate::normal});
}

TEST_CASE("A bind function that throws sends its message to on_failure with the exception's text") {
  scratch s;
  std::vector<std::string> whats;
  std::vector<std::int64_t> failed_ids;
  auto h = handlers(true);
  h.bind = [](sq::statement& st, const row& r) {
    st.bind(1, r.id);
    if (r.id == 2) throw std::runtime_error("cannot encode 2");
    st.bind(2, r.value);
  };
  h.on_failure = [&](std::span<row> b, const sq::write_failure& f) {
    for (const row& r : b) failed_ids.push_back(r.id);
    whats.push_back(f.what + " code " + std::to_string(f.code));
  };
  auto o = options(s);
  o.max_wait = 600s;
  sq::store<row> st(o, std::move(h));
  send_all(st, 0, 5);
  st.close();
  REQUIRE(failed_ids == std::vector<std::int64_t>{2});
  REQUIRE(whats == std::vector<std::string>{"cannot encode 2 code 0"});
  REQUIRE(read_rows(s.db()).size() == 4);
}

TEST_CASE("A callback's exception is rethrown by close(), and bad options and paths are clear errors") {
  scratch s;
  {
    auto h = handlers(false);
    h.on_commit = [](std::span<row>) { throw std::runtime_error("commit hook"); };
    sq::store<row> st(options(s), std::move(h));
    send_all(st, 0, 3);
    REQUIRE_THROWS_WITH(st.close(), "commit hook");
    REQUIRE(read_rows(s.db()).size() == 3);
    REQUIRE_THROWS_AS(st.input(), std::logic_error);
  }
  auto o = options(s);
  o.batch = 0;
  REQUIRE_THROWS_AS(sq::store<row>(o, handlers(false)), std::invalid_argument);
  o = options(s);
  o.capacity = 0;
  REQUIRE_THROWS_AS(sq::store<row>(o, handlers(false)), std::invalid_argument);
  o = options(s);
  REQUIRE_THROWS_AS(sq::store<row>(o, sq::store_handlers<row>{}), std::invalid_argument);
  o.path = (s.dir / "no" / "such" / "dir.db").string();
  REQUIRE_THROWS_AS(sq::store<row>(o, handlers(false)), sq::error);
  o = options(s);
  o.insert = "INSERT INTO nowhere VALUES(?1)";
  REQUIRE_THROWS_WITH(sq::store<row>(o, handlers(false)), Catch::Contains("no such table: nowhere"));
}
