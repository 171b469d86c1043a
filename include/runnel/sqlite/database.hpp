// Thin RAII over the SQLite C API for the store's writer thread: one
// connection, prepared statements, errors as runnel::sqlite::error. Used by
// one thread at a time (the store opens it on the constructing thread and
// then hands it to its writer thread for good).
#pragma once

#include <sqlite3.h>

#include <concepts>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include "error.hpp"

namespace runnel::sqlite {

namespace detail {
[[noreturn]] inline void fail(sqlite3* db, int rc, const std::string& what) {
  const int ext = db != nullptr ? sqlite3_extended_errcode(db) : rc;
  const char* msg = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  throw error("runnel::sqlite: " + what + ": " + msg, rc & 0xff, ext);
}
}  // namespace detail

// A prepared statement. bind() indices start at 1 (SQLite's ?1, ?2, ...).
class statement {
 public:
  statement() = default;
  statement(sqlite3* db, std::string_view sql) : db_(db) {
    const int rc = sqlite3_prepare_v3(db, sql.data(), static_cast<int>(sql.size()), SQLITE_PREPARE_PERSISTENT,
                                      &st_, nullptr);
    if (rc != SQLITE_OK) detail::fail(db, rc, "prepare '" + std::string(sql) + "'");
    if (st_ == nullptr) throw error("runnel::sqlite: no statement in '" + std::string(sql) + "'", SQLITE_MISUSE, SQLITE_MISUSE);
  }
  statement(statement&& o) noexcept : db_(o.db_), st_(std::exchange(o.st_, nullptr)) {}
  statement& operator=(statement&& o) noexcept {
    std::swap(db_, o.db_);
    std::swap(st_, o.st_);
    return *this;
  }
  statement(const statement&) = delete;
  statement& operator=(const statement&) = delete;
  ~statement() { sqlite3_finalize(st_); }

  template <std::integral I>
  statement& bind(int i, I v) { return check(sqlite3_bind_int64(st_, i, static_cast<sqlite3_int64>(v)), i); }
  statement& bind(int i, double v) { return check(sqlite3_bind_double(st_, i, v), i); }
  // Text is copied (SQLITE_TRANSIENT): the argument may die after the call.
  statement& bind(int i, std::string_view v) {
    return check(sqlite3_bind_text64(st_, i, v.data(), v.size(), SQLITE_TRANSIENT, SQLITE_UTF8), i);
  }
  statement& bind(int i, const char* v) { return bind(i, std::string_view(v)); }
  statement& bind(int i, const std::string& v) { return bind(i, std::string_view(v)); }
  statement& bind_blob(int i, const void* p, std::size_t n) {
    return check(sqlite3_bind_blob64(st_, i, p, n, SQLITE_TRANSIENT), i);
  }
  statement& bind_null(int i) { return check(sqlite3_bind_null(st_, i), i); }

  // Runs the statement to completion (rows are ignored) and resets it for
  // the next use; throws error (after the reset) when SQLite fails.
  void run() {
    int rc;
    while ((rc = sqlite3_step(st_)) == SQLITE_ROW) {
    }
    const int reset_rc = sqlite3_reset(st_);
    sqlite3_clear_bindings(st_);
    if (rc != SQLITE_DONE) detail::fail(db_, reset_rc != SQLITE_OK ? reset_rc : rc, "step '" + std::string(sqlite3_sql(st_)) + "'");
  }
  // Forgets a half-made binding (after a throwing bind function).
  void reset() noexcept {
    sqlite3_reset(st_);
    sqlite3_clear_bindings(st_);
  }
  // Rows changed by the last run() on this connection.
  std::int64_t changes() const noexcept { return sqlite3_changes64(db_); }

 private:
  statement& check(int rc, int i) {
    if (rc != SQLITE_OK) detail::fail(db_, rc, "bind parameter " + std::to_string(i));
    return *this;
  }
  sqlite3* db_ = nullptr;
  sqlite3_stmt* st_ = nullptr;
};

// One connection.
class database {
 public:
  explicit database(const std::string& path) {
    const int rc = sqlite3_open_v2(path.c_str(), &db_,
                                   SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
    if (rc != SQLITE_OK) {
      const std::string msg = db_ != nullptr ? sqlite3_errmsg(db_) : sqlite3_errstr(rc);
      sqlite3_close_v2(db_);
      throw error("runnel::sqlite: open '" + path + "': " + msg, rc & 0xff, rc);
    }
    sqlite3_extended_result_codes(db_, 1);
  }
  database(const database&) = delete;
  database& operator=(const database&) = delete;
  ~database() { sqlite3_close_v2(db_); }

  // Runs one or more statements separated by ';'.
  void exec(const std::string& sql) {
    char* msg = nullptr;
    const int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &msg);
    if (rc != SQLITE_OK) {
      const std::string text = msg != nullptr ? msg : sqlite3_errstr(rc);
      sqlite3_free(msg);
      throw error("runnel::sqlite: '" + sql + "': " + text, rc & 0xff, sqlite3_extended_errcode(db_));
    }
  }
  statement prepare(std::string_view sql) { return statement(db_, sql); }
  // True when no transaction is open (SQLite may roll one back by itself,
  // e.g. after SQLITE_FULL).
  bool autocommit() const noexcept { return sqlite3_get_autocommit(db_) != 0; }
  sqlite3* handle() const noexcept { return db_; }

 private:
  sqlite3* db_ = nullptr;
};

}  // namespace runnel::sqlite
