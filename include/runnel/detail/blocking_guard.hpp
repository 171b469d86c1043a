// Blocking channel calls on a pool worker.
//
// A thread that is the only worker of its pool runs every task of that pool.
// If it blocks in a channel's send/recv, a partner that is itself a task of
// the pool can never run, and the program hangs without a word. The pool
// marks such a thread; the channel's blocking forms check the mark and throw
// instead. On a pool of two or more workers another worker can run the
// partner, so nothing is checked there (blocking still costs a worker: the
// pipeline's nodes park instead of blocking). Threads outside any pool pay
// one thread-local read.
#pragma once

#include <stdexcept>
#include <string>

namespace runnel::detail {

// True while the calling thread is the only worker of a one-worker pool.
inline bool& on_sole_worker() noexcept {
  thread_local bool sole = false;
  return sole;
}

// Out of line and cold: the message is built only when thrown, and the
// check below stays a load and a branch in every inlined send and recv.
[[noreturn, gnu::cold, gnu::noinline]] inline void throw_blocking_on_sole_worker(const char* call) {
  throw std::logic_error(std::string("runnel::") + call +
                         ": called on the only worker of a one-worker pool, which would stop every "
                         "task of that pool (a partner task could never run); use the try_ forms, "
                         "or a pipeline node, which parks instead of blocking");
}

// Throws std::logic_error naming `call` when blocking here would stall the
// calling thread's pool for good.
inline void check_may_block(const char* call) {
  if (on_sole_worker()) [[unlikely]]
    throw_blocking_on_sole_worker(call);
}

}  // namespace runnel::detail
