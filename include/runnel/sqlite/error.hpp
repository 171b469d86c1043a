// runnel::sqlite::error: a failed SQLite call, with SQLite's result codes.
#pragma once

#include <stdexcept>
#include <string>

namespace runnel::sqlite {

class error : public std::runtime_error {
 public:
  // code: the primary result code (SQLITE_CONSTRAINT, SQLITE_FULL, ...);
  // extended: the extended one (SQLITE_CONSTRAINT_PRIMARYKEY, ...), or code.
  error(const std::string& what, int code, int extended) : std::runtime_error(what), code_(code), extended_(extended) {}
  int code() const noexcept { return code_; }
  int extended_code() const noexcept { return extended_; }

 private:
  int code_;
  int extended_;
};

}  // namespace runnel::sqlite
