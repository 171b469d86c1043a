// runnel::sqlite::store: the store step of a pipeline. Messages are written
// to SQLite in batched transactions by one writer thread, and released only
// after their transaction committed, so a broker input is acked only once
// its result is stored (effectively-once on top of the bridge's
// at-least-once when a key is given).
//
//   struct result { runnel::amqp::delivery in; std::int64_t id, value; };
//   runnel::sqlite::store<result> db{
//       {.path = "out.db",
//        .schema = {"CREATE TABLE IF NOT EXISTS results(id INTEGER, value INTEGER)"},
//        .insert = "INSERT INTO results(id, value) VALUES(?1, ?2)"},
//       {.bind = [](runnel::sqlite::statement& s, const result& r) { s.bind(1, r.id).bind(2, r.value); },
//        .key = [](const result& r) { return r.in.message_id; }}};
//   auto run = runnel::pipeline{pool}
//       .from(client.consume({.queue = "in"}))
//       .stage([](runnel::amqp::delivery d) { return compute(std::move(d)); }, {.workers = pool.size()})
//       .to(db.input())
//       .run();
//
// Threads. The constructor opens the database (WAL mode) and starts the
// writer thread, the only thread that touches the connection. The pipeline
// hands it messages through a bounded channel (input()): a full channel
// parks the pipeline's last node like any full channel, so no pool worker
// ever waits on the database or its lock; memory is bounded by `capacity`.
//
// A batch. The writer takes a message, then more until `batch` messages or
// until the first has waited `max_wait`; it runs BEGIN IMMEDIATE, for each
// message the dedupe insert of its key (when a key function is given) and,
// unless the key was already there, the user's insert; then COMMIT.
//   - committed: on_commit(batch), then the messages are destroyed normally
//     (a broker delivery inside is acked: the ack point is the commit);
//   - failed (a constraint violation, SQLITE_FULL, a throwing bind, ...):
//     ROLLBACK; with isolate_failures the batch is retried one message a
//     transaction; each message that still fails goes to
//     on_failure(messages, failure) and is then destroyed as
//     runnel::message_fate::failed (a broker delivery goes to its failure
//     policy). Nothing is released normally that was not committed.
// A crash anywhere before the release means redelivery by the broker; the
// key stored in the same transaction as the row makes the replay a no-op
// (counted in stats().duplicates) that is acked again.
//
// Stop: close() (or the destructor) drops the store's own sender, waits
// until every other sender (the pipeline's .to()) is gone and the channel is
// drained and committed, then joins the writer and closes the database. An
// exception thrown by on_commit/on_failure is rethrown from close().
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "channel.hpp"
#include "pipeline/message_fate.hpp"
#include "sqlite/database.hpp"
#include "sqlite/error.hpp"
#include "sqlite/options.hpp"

namespace runnel::sqlite {

template <class T>
class store {
 public:
  // Opens the database, runs the schema and starts the writer; throws
  // std::invalid_argument on bad options and error when SQLite fails.
  store(store_options opts, store_handlers<T> h) : opts_(std::move(opts)), h_(std::move(h)) {
    if (opts_.batch == 0) throw std::invalid_argument("runnel::sqlite::store: batch must be at least 1");
    if (opts_.capacity == 0) throw std::invalid_argument("runnel::sqlite::store: capacity must be at least 1");
    if (opts_.insert.empty()) throw std::invalid_argument("runnel::sqlite::store: insert (the SQL of a write) is empty");
    if (!h_.bind) throw std::invalid_argument("runnel::sqlite::store: store_handlers::bind is required");
    if (opts_.max_wait.count() < 0) throw std::invalid_argument("runnel::sqlite::store: max_wait is negative");
    db_.emplace(opts_.path);
    db_->exec("PRAGMA busy_timeout = " + std::to_string(opts_.busy_timeout_ms));
    db_->exec("PRAGMA journal_mode = WAL");
    db_->exec(opts_.durable ? "PRAGMA synchronous = FULL" : "PRAGMA synchronous = NORMAL");
    for (const std::string& sql : opts_.schema) db_->exec(sql);
    if (h_.key) {
      db_->exec("CREATE TABLE IF NOT EXISTS \"" + opts_.dedupe_table + "\"(key TEXT PRIMARY KEY) WITHOUT ROWID");
      dedupe_ = db_->prepare("INSERT INTO \"" + opts_.dedupe_table + "\"(key) VALUES(?1) ON CONFLICT DO NOTHING");
    }
    insert_ = db_->prepare(opts_.insert);
    auto [tx, rx] = make_channel<T>(opts_.capacity);
    tx_ = std::move(tx);
    writer_ = std::thread([this, rx = std::move(rx)]() mutable { run(rx); });
  }
  store(const store&) = delete;
  store& operator=(const store&) = delete;
  ~store() {
    try {
      close();
    } catch (...) {
      // A destructor cannot report; call close() to see the error.
    }
  }

  // A sender into the writer's bounded input (for pipeline_flow::to, or
  // sent to by hand from threads outside the pool). Each call returns
  // another handle to the same channel; throws std::logic_error after close().
  sender<T> input() const {
    std::lock_guard lock(mu_);
    if (!tx_.valid()) throw std::logic_error("runnel::sqlite::store::input: the store is closed");
    return tx_;
  }

  // Drops the store's sender, waits until the other senders are gone and
  // everything sent is committed or failed, joins the writer. Idempotent;
  // rethrows the first exception of a callback.
  void close() {
    {
      std::lock_guard lock(mu_);
      tx_.reset();
    }
    if (writer_.joinable()) writer_.join();
    db_.reset();  // finalizes nothing: statements first
    if (callback_error_) std::rethrow_exception(std::exchange(callback_error_, nullptr));
  }

  // Readable from any thread while running; exact after close().
  store_stats stats() const noexcept {
    store_stats s;
    // Relaxed: monitoring counters, each final once the writer is joined
    // (join orders them before close() returns).
    s.received = received_.load(std::memory_order_relaxed);
    s.stored = stored_.load(std::memory_order_relaxed);
    s.duplicates = duplicates_.load(std::memory_order_relaxed);
    s.failed = failed_.load(std::memory_order_relaxed);
    s.commits = commits_.load(std::memory_order_relaxed);
    s.rollbacks = rollbacks_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  using clock = std::chrono::steady_clock;

  void run(receiver<T>& rx) {
    std::vector<T> batch;
    batch.reserve(opts_.batch);
    for (;;) {
      std::optional<T> first = rx.recv();
      if (!first) break;  // closed and drained
      batch.push_back(std::move(*first));
      const auto deadline = clock::now() + opts_.max_wait;
      while (batch.size() < opts_.batch) {
        const auto now = clock::now();
        if (now >= deadline) break;
        auto r = rx.recv_for(deadline - now);
        if (!r.ok()) break;  // timeout (commit now) or closed (the outer recv ends)
        batch.push_back(std::move(*r));
      }
      bump(received_, batch.size());
      write(batch);
      batch.clear();
    }
    // The statements die before the connection (close() resets db_ after the join).
    insert_ = statement{};
    dedupe_ = statement{};
  }

  // Writes a batch in one transaction; on failure, optionally retries it
  // one message a transaction; settles every message.
  void write(std::vector<T>& batch) {
    const std::span<T> all(batch);
    try {
      transact(all);
      committed(all);
      return;
    } catch (...) {
      if (!opts_.isolate_failures || batch.size() == 1) {
        failed(all, describe(std::current_exception()));
        return;
      }
    }
    for (T& m : batch) {
      const std::span<T> one(&m, 1);
      try {
        transact(one);
      } catch (...) {
        failed(one, describe(std::current_exception()));
        continue;
      }
      committed(one);
    }
  }

  // BEGIN IMMEDIATE, the writes, COMMIT; on any exception ROLLBACK and
  // rethrow. Counts stored/duplicates only once committed.
  void transact(std::span<T> items) {
    database& db = *db_;
    db.exec("BEGIN IMMEDIATE");
    std::uint64_t dups = 0;
    try {
      for (T& m : items) {
        if (h_.key) {
          dedupe_.bind(1, h_.key(std::as_const(m)));
          dedupe_.run();
          if (dedupe_.changes() == 0) {  // key already stored: the row is there
            ++dups;
            continue;
          }
        }
        try {
          h_.bind(insert_, std::as_const(m));
        } catch (...) {
          insert_.reset();
          throw;
        }
        insert_.run();
      }
      db.exec("COMMIT");
    } catch (...) {
      dedupe_reset();
      if (!db.autocommit()) {
        try {
          db.exec("ROLLBACK");
        } catch (...) {
          // SQLite rolls back by itself when ROLLBACK cannot run; the
          // original error is the one to report.
        }
      }
      bump(rollbacks_, 1);
      throw;
    }
    bump(commits_, 1);
    bump(duplicates_, dups);
    bump(stored_, items.size() - dups);
  }

  void dedupe_reset() noexcept {
    if (h_.key) dedupe_.reset();
  }

  // After the commit: tell the user, then destroy normally (acks).
  void committed(std::span<T> items) {
    if (h_.on_commit) guard([&] { h_.on_commit(items); });
    for (T& m : items) [[maybe_unused]] T released(std::move(m));
  }

  // After the rollback: tell the user, then destroy as failed.
  void failed(std::span<T> items, const write_failure& f) {
    bump(failed_, items.size());
    if (h_.on_failure) guard([&] { h_.on_failure(items, f); });
    const message_fate_scope fate(message_fate::failed);
    for (T& m : items) [[maybe_unused]] T released(std::move(m));
  }

  static write_failure describe(std::exception_ptr e) {
    write_failure f;
    f.error = e;
    try {
      std::rethrow_exception(e);
    } catch (const error& x) {
      f.what = x.what();
      f.code = x.code();
    } catch (const std::exception& x) {
      f.what = x.what();
    } catch (...) {
      f.what = "a non-standard exception";
    }
    return f;
  }

  // A callback that throws does not stop the writer: the first such
  // exception is kept for close().
  template <class F>
  void guard(F&& f) noexcept {
    try {
      f();
    } catch (...) {
      if (!callback_error_) callback_error_ = std::current_exception();
    }
  }

  static void bump(std::atomic<std::uint64_t>& c, std::uint64_t n) noexcept {
    // Relaxed: only the writer thread adds; readers want a recent value.
    c.store(c.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  }

  store_options opts_;
  store_handlers<T> h_;
  std::optional<database> db_;
  statement dedupe_;  // writer thread only, after the constructor
  statement insert_;  // writer thread only, after the constructor
  mutable std::mutex mu_;  // guards tx_ against input() racing close()
  sender<T> tx_;
  std::exception_ptr callback_error_;  // writer thread; read by close() after the join
  std::thread writer_;
  // Counters: written by the writer thread only, read by stats().
  std::atomic<std::uint64_t> received_{0}, stored_{0}, duplicates_{0}, failed_{0}, commits_{0}, rollbacks_{0};
};

}  // namespace runnel::sqlite
