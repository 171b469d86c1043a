// The errors a process pool reports through a call's result.
#pragma once

#include <csignal>
#include <cstring>
#include <stdexcept>
#include <string>

namespace runnel {

// A message whose worker process died (signal or exit) or hung, on every one
// of its attempts. signal is the terminating signal (SIGKILL for a hung
// worker, which the pool killed), or 0 when the worker exited, with
// exit_code set.
class process_crash : public std::runtime_error {
 public:
  process_crash(int sig, int exit_code, unsigned attempts, bool hung)
      : std::runtime_error(describe(sig, exit_code, attempts, hung)),
        signal(sig), exit_code(exit_code), attempts(attempts), hung(hung) {}

  int signal;
  int exit_code;
  unsigned attempts;  // workers the message was tried on
  bool hung;          // the last attempt was killed for making no progress

 private:
  static std::string describe(int sig, int code, unsigned attempts, bool hung) {
    std::string s = "runnel::process_pool: the worker process ";
    if (hung) s += "made no progress and was killed (";
    if (sig != 0)
      s += "died of signal " + std::to_string(sig) + " (" + ::strsignal(sig) + ")";
    else
      s += "exited with status " + std::to_string(code);
    if (hung) s += ")";
    s += " on each of " + std::to_string(attempts) + " attempt" + (attempts == 1 ? "" : "s");
    return s;
  }
};

// The user function threw in the worker (the process survived); what() is
// the exception's what(), or a note for a non-std exception. Not retried.
class process_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An encoded request or reply longer than process_pool_options::slot_size.
class process_message_too_large : public std::length_error {
 public:
  using std::length_error::length_error;
};

// submit() or call() after request_stop() or stop(): the pool takes no new
// message (every message it accepted before still gets its result).
class process_pool_stopped : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace runnel
