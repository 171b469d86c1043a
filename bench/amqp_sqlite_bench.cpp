// The whole store chain, broker -> process -> SQLite -> ack, through runnel
// against the same chain written by hand, one run each, on a private broker
// this program starts (tests/amqp/broker.sh, as amqp_bench does).
//
// Each case: preload N 64-byte messages (8-digit id + padding, transient)
// into a fresh queue, then consume with prefetch P -> W rounds of a 64-bit
// LCG on the body -> store (id, value) into a fresh WAL database with
// synchronous = FULL, the id's key in a dedupe table in the same transaction
// (INSERT ... ON CONFLICT DO NOTHING, the row only when the key is new) ->
// ack the inputs after their COMMIT. Speed is N divided by the time from the
// first delivery to the last ack. Both sides use the same prefetch (512),
// the same batch (256 rows a transaction at most, committed early when the
// first row has waited 20 ms) and the same SQL; the batch is half the
// prefetch so that deliveries keep arriving while a batch commits.
//   chain/W=0       broker- and disk-bound
//   chain/W=heavy   W calibrated to ~20 us a message
// Implementations:
//   runnel_store    bridge consume -> stage (2 workers, 2-thread pool) ->
//                   runnel::sqlite::store (key = the id) -> acked by the
//                   bridge when the store releases the message after COMMIT;
//   hand_c_loop     one thread, rabbitmq-c + sqlite3: basic.consume, compute,
//                   append to the batch; at 256 rows or when a consume wait
//                   ends the 20 ms, BEGIN IMMEDIATE, the inserts, COMMIT,
//                   basic.ack(last tag, multiple).
// Each iteration checks that the table holds N rows and the queue is empty.
// cpu_us_per_msg is the process's CPU (user + system) a message.
//
//   amqp_sqlite_bench [--smoke] [Google Benchmark flags]
//   (N: RUNNEL_CHAIN_BENCH_N, default 50000; --smoke: 2000, W=0 only;
//    database directory: RUNNEL_BENCH_TMP, default /tmp)
#include <runnel/amqp.hpp>
#include <runnel/pipeline.hpp>
#include <runnel/sqlite.hpp>
#include <runnel/thread_pool.hpp>
#include <sqlite3.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "amqp/bridge_bench.hpp"
#include "bench_support.hpp"

namespace {

using clock_type = std::chrono::steady_clock;

constexpr unsigned kPrefetch = 512;
constexpr std::size_t kBatch = 256;
constexpr std::chrono::milliseconds kMaxWait{20};
constexpr const char* kTable = "CREATE TABLE IF NOT EXISTS results(id INTEGER, value INTEGER)";
constexpr const char* kInsert = "INSERT INTO results(id, value) VALUES(?1, ?2)";
constexpr const char* kDedupeTable = "CREATE TABLE IF NOT EXISTS runnel_applied(key TEXT PRIMARY KEY) WITHOUT ROWID";
constexpr const char* kDedupe = "INSERT INTO runnel_applied(key) VALUES(?1) ON CONFLICT DO NOTHING";

std::size_t n_messages() {
  if (runnel_bench::smoke) return 2000;
  const char* v = std::getenv("RUNNEL_CHAIN_BENCH_N");
  return v != nullptr ? static_cast<std::size_t>(std::atol(v)) : 50000;
}

using runnel_bench::heavy_w;
using runnel_bench::work;
runnel_test::broker& the_broker() { return runnel_bench::the_broker("amqp_sqlite_bench"); }

// A fresh queue with N preloaded inputs "%08zu" + 56 bytes of padding.
std::string preload(std::size_t n) {
  static int k = 0;
  const std::string in = "chain-in-" + std::to_string(++k);
  runnel_test::raw r(the_broker().port());
  r.persistent_ = false;
  r.fresh_queue(in);
  const std::string pad(56, 'x');
  r.publish_n(in, n, [&pad](std::size_t i) {
    char id[16];
    std::snprintf(id, sizeof id, "%08zu", i);
    return std::string(id, 8) + pad;
  });
  return in;
}

// A fresh database directory per iteration, removed afterwards.
struct scratch {
  std::filesystem::path dir;
  scratch() {
    const char* base = std::getenv("RUNNEL_BENCH_TMP");
    std::string tmpl = std::string(base != nullptr ? base : "/tmp") + "/runnel-chain-bench-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) std::abort();
    dir = tmpl;
  }
  ~scratch() { std::filesystem::remove_all(dir); }
  std::string db() const { return (dir / "chain.db").string(); }
};

double cpu_seconds() {
  rusage r{};
  ::getrusage(RUSAGE_SELF, &r);
  auto sec = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6; };
  return sec(r.ru_utime) + sec(r.ru_stime);
}

std::int64_t count_rows(const std::string& db) {
  sqlite3* h = nullptr;
  std::int64_t v = -1;
  if (sqlite3_open_v2(db.c_str(), &h, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK) {
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v2(h, "SELECT count(*) FROM results", -1, &st, nullptr) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
      v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
  }
  sqlite3_close(h);
  return v;
}

// The table holds every row and nothing is left in the queue (no consumer
// is attached any more, so an unacked input would be ready again).
void check_done(benchmark::State& state, const std::string& db, const std::string& queue, std::size_t n) {
  const std::int64_t rows = count_rows(db);
  if (rows != static_cast<std::int64_t>(n)) {
    state.SkipWithError(("table holds " + std::to_string(rows) + " of " + std::to_string(n)).c_str());
    return;
  }
  runnel_test::raw r(the_broker().port());
  std::uint32_t left = 0;
  for (int i = 0; i < 40 && (left = r.ready(queue)) != 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  if (left != 0) state.SkipWithError(("queue still holds " + std::to_string(left)).c_str());
}

void report(benchmark::State& state, std::size_t n, double seconds, double cpu) {
  state.SetIterationTime(seconds);
  state.counters["items_per_second"] = static_cast<double>(n) / seconds;
  state.counters["cpu_us_per_msg"] = 1e6 * cpu / static_cast<double>(n);
}

struct result {
  runnel::amqp::delivery in;
  std::int64_t id = 0;
  std::int64_t value = 0;
};

void bm_runnel(benchmark::State& state, std::uint64_t w) {
  const std::size_t n = n_messages();
  for (auto _ : state) {
    const std::string in = preload(n);
    scratch s;
    runnel::sqlite::store_options o;
    o.path = s.db();
    o.schema = {kTable};
    o.insert = kInsert;
    o.batch = kBatch;
    o.max_wait = kMaxWait;
    runnel::sqlite::store_handlers<result> h;
    h.bind = [](runnel::sqlite::statement& st, const result& r) { st.bind(1, r.id).bind(2, r.value); };
    h.key = [](const result& r) { return r.in.body.substr(0, 8); };
    runnel::sqlite::store<result> db(o, std::move(h));
    runnel::thread_pool pool({.threads = 2, .pin = false});
    runnel::amqp::client c{runnel::amqp::connection_options::from_url(
        "amqp://guest:guest@127.0.0.1:" + std::to_string(the_broker().port()))};
    std::atomic<bool> started{false};  // the first delivery's time is taken once
    clock_type::time_point first{};
    const double cpu0 = cpu_seconds();
    auto run = runnel::pipeline{pool}
                   .from(c.consume({.queue = in, .prefetch = kPrefetch}))
                   .stage([&, w](runnel::amqp::delivery d) {
                     // Relaxed: a cheap pre-check; the exchange decides who writes `first`,
                     // read only after run.wait().
                     if (!started.load(std::memory_order_relaxed) && !started.exchange(true)) first = clock_type::now();
                     result r;
                     r.id = std::strtoll(d.body.substr(0, 8).c_str(), nullptr, 10);
                     r.value = static_cast<std::int64_t>(work(d.body.data(), d.body.size(), w) >> 1);
                     r.in = std::move(d);
                     return r;
                   }, {.workers = 2})
                   .to(db.input())
                   .run();
    while (c.stats().acked < n) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    const auto last = clock_type::now();
    const double cpu = cpu_seconds() - cpu0;
    c.close();
    run.wait();
    db.close();
    report(state, n, std::chrono::duration<double>(last - first).count(), cpu);
    state.counters["rows_per_commit"] =
        static_cast<double>(db.stats().stored) / static_cast<double>(std::max<std::uint64_t>(db.stats().commits, 1));
    check_done(state, o.path, in, n);
  }
}

// The hand-written peer: one thread, one connection, one database handle.
class hand_chain {
 public:
  hand_chain(const std::string& path, int port, const std::string& queue) {
    conn_ = amqp_new_connection();
    amqp_socket_t* sock = amqp_tcp_socket_new(conn_);
    if (amqp_socket_open(sock, "127.0.0.1", port) != AMQP_STATUS_OK) throw std::runtime_error("connect");
    if (amqp_login(conn_, "/", 0, 131072, 30, AMQP_SASL_METHOD_PLAIN, "guest", "guest").reply_type !=
        AMQP_RESPONSE_NORMAL)
      throw std::runtime_error("login");
    amqp_channel_open(conn_, 1);
    amqp_basic_qos(conn_, 1, 0, kPrefetch, 0);
    amqp_basic_consume(conn_, 1, amqp_cstring_bytes(queue.c_str()), amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    if (amqp_get_rpc_reply(conn_).reply_type != AMQP_RESPONSE_NORMAL) throw std::runtime_error("basic.consume");
    sql(sqlite3_open(path.c_str(), &db_));
    sql(sqlite3_exec(db_, "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL", nullptr, nullptr, nullptr));
    sql(sqlite3_exec(db_, kTable, nullptr, nullptr, nullptr));
    sql(sqlite3_exec(db_, kDedupeTable, nullptr, nullptr, nullptr));
    sql(sqlite3_prepare_v2(db_, kDedupe, -1, &dedupe_, nullptr));
    sql(sqlite3_prepare_v2(db_, kInsert, -1, &insert_, nullptr));
    batch_.reserve(kBatch);
  }
  hand_chain(const hand_chain&) = delete;
  hand_chain& operator=(const hand_chain&) = delete;
  ~hand_chain() {
    sqlite3_finalize(dedupe_);
    sqlite3_finalize(insert_);
    sqlite3_close(db_);
    amqp_channel_close(conn_, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn_, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn_);
  }

  // Consumes, computes and stores n messages; returns the time of the first delivery.
  clock_type::time_point run(std::size_t n, std::uint64_t w) {
    clock_type::time_point first{}, batch_deadline{};
    std::size_t acked = 0;
    while (acked < n) {
      // Wait at most until the open batch is due (or long when it is empty).
      const auto now = clock_type::now();
      const auto left = batch_.empty() ? std::chrono::microseconds(1000000)
                                       : std::chrono::duration_cast<std::chrono::microseconds>(batch_deadline - now);
      if (!batch_.empty() && left.count() <= 0) {
        acked += flush();
        continue;
      }
      timeval tv{static_cast<time_t>(left.count() / 1000000), static_cast<suseconds_t>(left.count() % 1000000)};
      amqp_envelope_t env;
      amqp_maybe_release_buffers(conn_);
      const amqp_rpc_reply_t r = amqp_consume_message(conn_, &env, &tv, 0);
      if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_TIMEOUT) {
        if (!batch_.empty()) acked += flush();
        continue;
      }
      if (r.reply_type != AMQP_RESPONSE_NORMAL) throw std::runtime_error("consume failed");
      if (first == clock_type::time_point{}) first = clock_type::now();
      const char* body = static_cast<const char*>(env.message.body.bytes);
      const std::size_t len = env.message.body.len;
      row rw;
      rw.key.assign(body, len < 8 ? len : 8);
      rw.id = std::strtoll(rw.key.c_str(), nullptr, 10);
      rw.value = static_cast<std::int64_t>(work(body, len, w) >> 1);
      if (batch_.empty()) batch_deadline = clock_type::now() + kMaxWait;
      batch_.push_back(std::move(rw));
      last_tag_ = env.delivery_tag;
      amqp_destroy_envelope(&env);
      if (batch_.size() == kBatch) acked += flush();
    }
    return first;
  }
  std::size_t commits() const { return commits_; }

 private:
  struct row {
    std::string key;
    std::int64_t id = 0;
    std::int64_t value = 0;
  };

  // One transaction for the batch, then one ack for all of it.
  std::size_t flush() {
    sql(sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr));
    for (const row& r : batch_) {
      sqlite3_bind_text(dedupe_, 1, r.key.data(), static_cast<int>(r.key.size()), SQLITE_STATIC);
      sql(sqlite3_step(dedupe_));
      sqlite3_reset(dedupe_);
      if (sqlite3_changes(db_) == 0) continue;  // already stored
      sqlite3_bind_int64(insert_, 1, r.id);
      sqlite3_bind_int64(insert_, 2, r.value);
      sql(sqlite3_step(insert_));
      sqlite3_reset(insert_);
    }
    sql(sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr));
    if (amqp_basic_ack(conn_, 1, last_tag_, 1) != AMQP_STATUS_OK) throw std::runtime_error("basic.ack");
    const std::size_t k = batch_.size();
    batch_.clear();
    ++commits_;
    return k;
  }

  void sql(int rc) const {
    if (rc != SQLITE_OK && rc != SQLITE_DONE) throw std::runtime_error(sqlite3_errmsg(db_));
  }

  amqp_connection_state_t conn_ = nullptr;
  sqlite3* db_ = nullptr;
  sqlite3_stmt* dedupe_ = nullptr;
  sqlite3_stmt* insert_ = nullptr;
  std::vector<row> batch_;
  std::uint64_t last_tag_ = 0;
  std::size_t commits_ = 0;
};

void bm_hand(benchmark::State& state, std::uint64_t w) {
  const std::size_t n = n_messages();
  for (auto _ : state) {
    const std::string in = preload(n);
    scratch s;
    try {
      const double cpu0 = cpu_seconds();
      clock_type::time_point first, last;
      std::size_t commits = 0;
      {
        hand_chain h(s.db(), the_broker().port(), in);
        first = h.run(n, w);
        last = clock_type::now();
        commits = h.commits();
      }
      report(state, n, std::chrono::duration<double>(last - first).count(), cpu_seconds() - cpu0);
      state.counters["rows_per_commit"] = static_cast<double>(n) / static_cast<double>(std::max<std::size_t>(commits, 1));
    } catch (const std::exception& e) {
      state.SkipWithError(e.what());
      continue;
    }
    check_done(state, s.db(), in, n);
  }
}

void register_all() {
  std::printf("N = %zu messages of 64 bytes, prefetch %u, batch %zu, heavy W = %llu LCG rounds (~20 us)\n",
              n_messages(), kPrefetch, kBatch, static_cast<unsigned long long>(heavy_w()));
  auto reg = [](const std::string& name, auto fn) {
    benchmark::RegisterBenchmark(name.c_str(), fn)->Iterations(1)->UseManualTime()->Unit(benchmark::kMillisecond);
  };
  reg("chain/W=0:runnel_store", [](benchmark::State& s) { bm_runnel(s, 0); });
  reg("chain/W=0:hand_c_loop", [](benchmark::State& s) { bm_hand(s, 0); });
  if (!runnel_bench::smoke) {
    reg("chain/W=heavy:runnel_store", [](benchmark::State& s) { bm_runnel(s, heavy_w()); });
    reg("chain/W=heavy:hand_c_loop", [](benchmark::State& s) { bm_hand(s, heavy_w()); });
  }
}

}  // namespace

int main(int argc, char** argv) {
  return runnel_bench::run_main(argc, argv, register_all);
}
