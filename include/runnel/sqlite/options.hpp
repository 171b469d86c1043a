// Options and callbacks of runnel::sqlite::store (see ../sqlite.hpp).
#pragma once

#include <chrono>
#include <cstddef>
#include <exception>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "database.hpp"

namespace runnel::sqlite {

struct store_options {
  // The database file (created when missing).
  std::string path;
  // Statements run once at open, after the connection is in WAL mode, e.g.
  // "CREATE TABLE IF NOT EXISTS results(id INTEGER, value INTEGER)".
  std::vector<std::string> schema{};
  // The write made for each message, with parameters ?1, ?2, ... filled by
  // store_handlers::bind.
  std::string insert;
  // Messages per transaction at most (>= 1).
  std::size_t batch = 256;
  // The longest a message waits for its commit after the writer took it:
  // a batch is committed when it is full or when its first message has
  // waited this long.
  std::chrono::milliseconds max_wait{20};
  // Capacity of the input channel (messages waiting for the writer; >= 1).
  std::size_t capacity = 1024;
  // With store_handlers::key: the table holding the key of every message
  // written, filled in the same transaction as its row (created when missing).
  std::string dedupe_table = "runnel_applied";
  // A failed batch is retried one message a transaction, so that only the
  // messages that fail alone go to on_failure (a constraint violation of
  // one message does not fail its batch-mates).
  bool isolate_failures = true;
  // How long a write waits for another connection's lock (SQLITE_BUSY after).
  int busy_timeout_ms = 5000;
  // synchronous = FULL (a commit survives power loss before its inputs are
  // acked); false: NORMAL (survives a process crash, not a power loss).
  bool durable = true;
};

// Why a group of messages was not stored: the error and its text.
struct write_failure {
  std::exception_ptr error;
  std::string what;
  int code = 0;  // SQLite's primary result code, 0 when the error was not SQLite's (a throwing bind)
};

template <class T>
struct store_handlers {
  // Fills the parameters of store_options::insert for one message (required).
  std::function<void(statement&, const T&)> bind;
  // The idempotence key of a message (the input's message id, or a key of
  // the user's); empty: no dedupe table (the insert must then be idempotent
  // itself, e.g. INSERT ... ON CONFLICT DO NOTHING on a unique key).
  std::function<std::string(const T&)> key{};
  // Called on the writer thread after a transaction committed, with its
  // messages (duplicates included), before they are released (destroyed
  // normally, which acks a broker delivery).
  std::function<void(std::span<T>)> on_commit{};
  // Called on the writer thread after a transaction rolled back, with the
  // messages it held; they are then destroyed as failed
  // (runnel::message_fate::failed), which sends a broker delivery to its
  // failure policy. The callback may move from them.
  std::function<void(std::span<T>, const write_failure&)> on_failure{};
};

struct store_stats {
  std::uint64_t received = 0;    // messages the writer took from its input
  std::uint64_t stored = 0;      // messages committed with a new key (or without a key)
  std::uint64_t duplicates = 0;  // messages committed whose key was already there (nothing written)
  std::uint64_t failed = 0;      // messages handed to on_failure
  std::uint64_t commits = 0;     // transactions committed
  std::uint64_t rollbacks = 0;   // transactions rolled back
};

}  // namespace runnel::sqlite
