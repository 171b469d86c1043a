// The SQLite store: rows/s into a WAL database with synchronous = FULL (each
// commit reaches the disk), every row with its dedupe key, one run:
//
//   sqlite/rows:<impl>
//     runnel_store      runnel::sqlite::store, batch 256 (the default), fed
//                       from the benchmark thread through input();
//     per_message_txn   the same store with batch = 1: one transaction a
//                       message (what acking each message after its own
//                       commit costs);
//     hand_autocommit   a plain sqlite3 loop on the benchmark thread, one
//                       autocommit INSERT pair a message (the usual
//                       hand-written consumer).
//
// Every iteration writes `items` rows into a fresh database file under
// RUNNEL_BENCH_TMP (default /tmp). The closing table prints
// runnel_store / each peer. Ratios only: the disk and machine are shared.
#include <benchmark/benchmark.h>

#include <sqlite3.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "runnel/sqlite.hpp"
#include "bench_support.hpp"

namespace {

struct row {
  std::int64_t id;
  std::int64_t value;
};

// A fresh scratch directory per iteration, removed afterwards.
struct scratch {
  std::filesystem::path dir;
  scratch() {
    const char* base = std::getenv("RUNNEL_BENCH_TMP");
    std::string tmpl = std::string(base != nullptr ? base : "/tmp") + "/runnel-sqlite-bench-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) std::abort();
    dir = tmpl;
  }
  ~scratch() { std::filesystem::remove_all(dir); }
};

constexpr const char* kTable = "CREATE TABLE IF NOT EXISTS results(id INTEGER, value INTEGER)";
constexpr const char* kInsert = "INSERT INTO results(id, value) VALUES(?1, ?2)";

std::int64_t items() { return runnel_bench::smoke ? 200 : 3000; }

void BM_store(benchmark::State& state) {
  const auto batch = static_cast<std::size_t>(state.range(0));
  const std::int64_t n = items();
  for (auto _ : state) {
    state.PauseTiming();
    scratch s;
    state.ResumeTiming();
    runnel::sqlite::store_options o;
    o.path = (s.dir / "b.db").string();
    o.schema = {kTable};
    o.insert = kInsert;
    o.batch = batch;
    runnel::sqlite::store_handlers<row> h;
    h.bind = [](runnel::sqlite::statement& st, const row& r) { st.bind(1, r.id).bind(2, r.value); };
    h.key = [](const row& r) { return std::to_string(r.id); };
    runnel::sqlite::store<row> st(o, std::move(h));
    {
      auto tx = st.input();
      for (std::int64_t i = 0; i < n; ++i)
        if (!tx.send(row{i, i * 3}).ok()) state.SkipWithError("send failed");
    }
    st.close();
    if (st.stats().stored != static_cast<std::uint64_t>(n)) state.SkipWithError("rows missing");
  }
  state.SetItemsProcessed(state.iterations() * n);
}

void check(int rc, benchmark::State& state) {
  if (rc != SQLITE_OK && rc != SQLITE_DONE) state.SkipWithError(sqlite3_errstr(rc));
}

void BM_hand_autocommit(benchmark::State& state) {
  const std::int64_t n = items();
  for (auto _ : state) {
    state.PauseTiming();
    scratch s;
    state.ResumeTiming();
    sqlite3* db = nullptr;
    check(sqlite3_open((s.dir / "b.db").c_str(), &db), state);
    check(sqlite3_exec(db, "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;", nullptr, nullptr, nullptr), state);
    check(sqlite3_exec(db, kTable, nullptr, nullptr, nullptr), state);
    check(sqlite3_exec(db, "CREATE TABLE IF NOT EXISTS applied(key TEXT PRIMARY KEY) WITHOUT ROWID", nullptr, nullptr,
                       nullptr),
          state);
    sqlite3_stmt* key = nullptr;
    sqlite3_stmt* ins = nullptr;
    check(sqlite3_prepare_v2(db, "INSERT INTO applied(key) VALUES(?1) ON CONFLICT DO NOTHING", -1, &key, nullptr), state);
    check(sqlite3_prepare_v2(db, kInsert, -1, &ins, nullptr), state);
    for (std::int64_t i = 0; i < n; ++i) {
      // One transaction a message: the key and the row together.
      check(sqlite3_exec(db, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr), state);
      const std::string k = std::to_string(i);
      sqlite3_bind_text(key, 1, k.data(), static_cast<int>(k.size()), SQLITE_TRANSIENT);
      check(sqlite3_step(key), state);
      sqlite3_reset(key);
      if (sqlite3_changes(db) == 1) {
        sqlite3_bind_int64(ins, 1, i);
        sqlite3_bind_int64(ins, 2, i * 3);
        check(sqlite3_step(ins), state);
        sqlite3_reset(ins);
      }
      check(sqlite3_exec(db, "COMMIT", nullptr, nullptr, nullptr), state);
    }
    sqlite3_finalize(key);
    sqlite3_finalize(ins);
    sqlite3_close(db);
  }
  state.SetItemsProcessed(state.iterations() * n);
}

void register_all() {
  auto timed = [](benchmark::internal::Benchmark* b) {
    b->UseRealTime()->Unit(benchmark::kMillisecond)->Iterations(runnel_bench::smoke ? 1 : 3);
  };
  timed(benchmark::RegisterBenchmark("sqlite/rows:runnel_store", BM_store)->Arg(256));
  timed(benchmark::RegisterBenchmark("sqlite/rows:per_message_txn", BM_store)->Arg(1));
  timed(benchmark::RegisterBenchmark("sqlite/rows:hand_autocommit", BM_hand_autocommit));
}

}  // namespace

int main(int argc, char** argv) { return runnel_bench::run_main(argc, argv, register_all); }
