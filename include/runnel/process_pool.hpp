// runnel::process_pool: a function Out(In) run in N worker processes, so
// that a crash in it (a native parser, a codec, a third-party library) kills
// a worker, not the program, and loses no message.
//
//   int main() {
//     // First thing in main, before any thread exists (see Fork-safety).
//     runnel::process_pool<Request, Reply> pool(parse, {.workers = 4});
//     runnel::thread_pool threads;
//     ...
//     runnel::process_future<Reply> r = pool.call(req);  // or submit(req, callback)
//     runnel::pipeline{threads}.source(gen)
//         .stage(runnel::process_stage(pool))    // no lane waits for a reply
//         .sink(use).on_error(report).run().wait();
//   }
//
// Messages cross as bytes through a shared-memory region (a memfd mapped
// MAP_SHARED; no name in /dev/shm): trivially copyable In / Out directly,
// std::string as its characters, any other type through a codec
// (process/codec.hpp); a type with neither is a compile-time error. An
// encoded message may take at most options.slot_size bytes: a larger request
// makes submit()/call() throw process_message_too_large; a larger reply is
// reported as a process_error for that message.
//
// Results. Every submitted message gets exactly one result: the reply, or
// an error: thrown by process_future::get() (call; the exception is built on
// the thread that calls get()) or in process_result::error (submit):
//   process_error   the function threw in the worker (its what()); not retried
//   process_crash   the worker died (signal, exit) or hung on each of
//                   options.max_attempts tries; carries the signal number
// A worker that dies is restarted; the message it held is retried on another
// worker (the one restarted, if it is the only one) until max_attempts;
// messages queued behind it that it had not started are re-dispatched
// without counting an attempt. A worker holding one message longer than
// options.hang_timeout (0: never) is SIGKILLed and handled the same way.
// A worker whose processes die again and again without completing a
// message is restarted with a capped exponential delay (restart_delay);
// stats().delayed_restarts counts those restarts.
//
// Graceful stop. request_stop() (async-signal-safe: call it from the
// program's SIGTERM handler) makes submit()/call() throw
// process_pool_stopped; every message accepted before still gets its one
// result. stop() then waits for those results and ends the workers and the
// launcher. The launcher and the workers ignore SIGTERM and SIGINT (see
// process/launcher.hpp): a signal sent to the whole service or process group
// neither kills a message in flight nor the pool; the program decides.
//
// Fork-safety. The constructor forks a single-threaded launcher process, and
// the launcher forks every worker, now and at each restart (see
// process/launcher.hpp for why). So the pool must be constructed while the
// program has exactly one thread: the constructor counts /proc/self/task and
// throws std::logic_error otherwise (under ThreadSanitizer, whose runtime
// keeps a thread of its own, one more is allowed). Several pools may be constructed one
// after another (a pool starts its own supervisor thread only at the first
// submit). The function is copied into the launcher at construction; workers
// run that copy, with the program's memory as it was then. Workers reset the
// crash signals (SEGV, BUS, FPE, ILL, ABRT) and PIPE, CHLD to their
// default action, so a crash is seen as its signal, and ignore TERM and INT.
//
// Threads. submit() and call() may be called from any thread; they block
// only while options.queue_capacity messages already wait for a worker.
// One supervisor thread per pool (started at the first submit) dispatches,
// collects replies and runs the callbacks, which must be short and must not
// throw. It sleeps on a futex in the shared region when there is nothing to
// do; idle workers sleep on their own futex (process::wake_sleeper is the
// protocol). Hand-offs go in batches: the supervisor fills each worker's
// ring as far as it has room and publishes it with one store; a worker runs
// every request published and wakes the supervisor only when depth / 2
// are left (time to refill) and after the last one (it may go idle next);
// a submission wakes it only while a ring has room. process_stage(pool) is a pipeline node
// that holds no pipeline lane while its messages are in the workers.
//
// Lifetime. The destructor finishes every submitted message, then tells the
// workers to exit, and reaps the launcher, which has reaped the workers: no
// zombies, and the shared region is gone with the last process. If the
// parent dies (even by SIGKILL), the launcher gets SIGKILL
// (PR_SET_PDEATHSIG), and so do the workers when the launcher dies. Note
// that the death signal follows the *thread* that constructed the pool: keep
// that thread (normally main) alive as long as the pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/eventfd.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "process/codec.hpp"
#include "process/errors.hpp"
#include "process/launcher.hpp"
#include "process/shared_region.hpp"
#include "process/stage_node.hpp"
#include "detail/backoff.hpp"
#include "detail/futex.hpp"

namespace runnel {

struct process_pool_options {
  // Worker processes.
  std::size_t workers = 2;
  // Messages handed to one worker ahead of its replies (its ring's slots).
  // Deep enough that requests and replies cross in batches (a worker wakes
  // the parent at depth / 2 left and when it runs out): a ring of a few slots costs a
  // wake-up every few messages. Memory: 2 * depth * slot_size a worker.
  std::size_t depth = 32;
  // Largest encoded request or reply, in bytes.
  std::size_t slot_size = 4096;
  // Submitted messages waiting in the parent for a worker; submit() blocks
  // beyond this.
  std::size_t queue_capacity = 1024;
  // Workers a message may crash before it is reported as a process_crash.
  unsigned max_attempts = 2;
  // A worker holding one message this long is killed (0: never).
  std::chrono::milliseconds hang_timeout{0};
  // A worker process that dies again before completing a message is
  // restarted after a delay: restart_backoff after its second death in a
  // row, doubled at each further one, at most restart_backoff_max (see
  // process::restart_delay). The first death restarts at once.
  std::chrono::milliseconds restart_backoff{10};
  std::chrono::milliseconds restart_backoff_max{2000};
  // With messages outstanding, the supervisor checks this often that the
  // launcher is alive (a waitpid), so it never sleeps longer than this; a
  // dead launcher is found within about two periods. Replies and
  // submissions wake it whatever the period.
  std::chrono::milliseconds launcher_check_period{100};
};

// A message's result, as submit() delivers it: value, or error.
template <class Out>
struct process_result {
  std::optional<Out> value;
  std::exception_ptr error;
};

namespace process {
// Why a message has no reply, as plain data: the supervisor thread passes it
// on, and the exception is built where it is thrown (so an exception object
// is never shared between threads by call()).
struct failure {
  enum class kind { error, crash } what = kind::error;
  int signal = 0, exit_code = 0;
  unsigned attempts = 0;
  bool hung = false;
  std::string message;          // kind::error: the text
  std::exception_ptr other{};   // a reply that did not decode: its exception

  [[noreturn]] void raise() const {
    if (other) std::rethrow_exception(other);
    if (what == kind::crash) throw process_crash(signal, exit_code, attempts, hung);
    throw process_error(message);
  }
  std::exception_ptr as_exception_ptr() const {
    try {
      raise();
    } catch (...) {
      return std::current_exception();
    }
  }
};

template <class Out>
struct outcome {
  std::optional<Out> value;
  std::optional<failure> error;
};
}  // namespace process

// The result of call(): get() returns the reply or throws process_error /
// process_crash (built on the calling thread).
template <class Out>
class process_future {
 public:
  process_future() noexcept = default;
  explicit process_future(std::future<process::outcome<Out>> f) noexcept : f_(std::move(f)) {}

  Out get() {
    process::outcome<Out> o = f_.get();
    if (o.error) o.error->raise();
    return std::move(*o.value);
  }
  bool valid() const noexcept { return f_.valid(); }
  void wait() const { f_.wait(); }
  template <class Rep, class Period>
  std::future_status wait_for(std::chrono::duration<Rep, Period> d) const {
    return f_.wait_for(d);
  }

 private:
  std::future<process::outcome<Out>> f_;
};

namespace process {
// How long to wait before restarting a worker whose process died `streak`
// times in a row without completing a message in between: 0 for the first
// death (a crash on one poison message must not slow the pool), then
// `first`, 2 * first, 4 * first, ..., at most `cap`.
inline std::chrono::nanoseconds restart_delay(unsigned streak, std::chrono::nanoseconds first,
                                              std::chrono::nanoseconds cap) noexcept {
  if (streak <= 1 || first.count() <= 0) return std::chrono::nanoseconds(0);
  std::chrono::nanoseconds d = std::min(first, cap);
  for (unsigned i = 2; i < streak && d < cap; ++i) d = d > cap / 2 ? cap : 2 * d;
  return d;
}
}  // namespace process

namespace process {
// The supervisor's next watch budget (rounds) before it sleeps: doubled
// after a watch that saw news, at most `cap`; halved after one that saw
// none, at least 1.
inline unsigned next_spin_budget(unsigned budget, bool news, unsigned cap) noexcept {
  return news ? std::min(2 * budget, cap) : std::max(budget / 2, 1u);
}
}  // namespace process

struct process_pool_stats {
  std::uint64_t submitted = 0;
  std::uint64_t completed = 0;   // replies delivered
  std::uint64_t failed = 0;      // process_error delivered (function threw)
  std::uint64_t crashed = 0;     // process_crash delivered
  std::uint64_t retried = 0;     // re-dispatches after a crash of the holder
  std::uint64_t restarts = 0;    // worker processes that died and were replaced
  std::uint64_t hung_kills = 0;  // workers killed for making no progress
  std::uint64_t delayed_restarts = 0;  // restarts postponed by the backoff (of `restarts`)
};

template <class In, class Out, class InCodec = process_codec<In>, class OutCodec = process_codec<Out>>
class process_pool {
  static_assert(process_codec_for<InCodec, In>,
                "runnel::process_pool: the request type In is not trivially copyable and has no codec: "
                "specialise runnel::process_codec<In> with static void encode(const In&, std::string&) "
                "and static In decode(std::string_view), or pass such a codec as the third template argument");
  static_assert(process_codec_for<OutCodec, Out>,
                "runnel::process_pool: the reply type Out is not trivially copyable and has no codec: "
                "specialise runnel::process_codec<Out> with static void encode(const Out&, std::string&) "
                "and static Out decode(std::string_view), or pass such a codec as the fourth template argument");
  static_assert(std::is_move_constructible_v<Out>, "runnel::process_pool: Out must be move-constructible");

 public:
  using callback = std::function<void(process_result<Out>&&)>;
  using in_type = In;
  using out_type = Out;

  template <class F>
    requires std::is_invocable_r_v<Out, F&, In&&>
  explicit process_pool(F fn, process_pool_options opts = {}) : opts_(opts), fn_(std::move(fn)) {
    check(opts_);
    if (const std::size_t n = process::thread_count(); n > 1 + process::runtime_threads)
      throw std::logic_error("runnel::process_pool: constructed while the process runs " +
                             std::to_string(n - process::runtime_threads) +
                             " threads; it forks, which is only safe before any thread starts: construct "
                             "process pools first thing in main(), before thread pools and other threads");
    region_ = std::make_unique<process::shared_region>(opts_.workers, opts_.depth, opts_.slot_size);
    views_.resize(opts_.workers);
    for (auto& v : views_) v.inflight.resize(opts_.depth);
    event_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (event_fd_ < 0) throw std::system_error(errno, std::generic_category(), "runnel::process_pool: eventfd");
    const pid_t parent = ::getpid();
    launcher_ = ::fork();
    if (launcher_ < 0) {
      const int e = errno;
      ::close(event_fd_);
      throw std::system_error(e, std::generic_category(), "runnel::process_pool: fork of the launcher");
    }
    if (launcher_ == 0) process::launcher(*region_, event_fd_, &worker_main, this).run(parent);
  }

  process_pool(const process_pool&) = delete;
  process_pool& operator=(const process_pool&) = delete;

  // Finishes every submitted message, then stops the workers and the
  // launcher and reaps the launcher.
  ~process_pool() { shut_down(); }

  // Graceful stop, step one, and the only step a signal handler may take
  // (async-signal-safe: an atomic store and a futex wake): from now on
  // submit() and call() throw process_pool_stopped, while every message
  // accepted before keeps going, through restarts and retries, to its one
  // result. A worker waiting out a restart backoff is restarted at once.
  //
  //   runnel::process_pool<Req, Rep>* the_pool;
  //   extern "C" void on_term(int) { the_pool->request_stop(); }
  void request_stop() noexcept {
    stop_requested_.store(true, std::memory_order_seq_cst);  // seq_cst: before the wake below
    process::notify_parent(region_->header());
  }

  // Graceful stop: request_stop(), then waits until every accepted message
  // has had its result delivered, then lets the workers and the launcher
  // exit and reaps them. Nothing accepted is lost or run twice (a message is
  // run again only after a crash of its worker, as always). Not from a
  // callback. The destructor does the same (without refusing submissions).
  void stop() {
    request_stop();
    // Any submit() that locks m_ after this sees the flag (the flag was
    // stored before this unlock); one that locked before is counted in
    // unfinished_ and drained below.
    { std::lock_guard lk(m_); }
    drain();
    shut_down();
  }

  bool stop_requested() const noexcept {
    return stop_requested_.load(std::memory_order_relaxed);  // relaxed: a report, orders nothing
  }

  // Queues `in` for a worker; `done` is called once, on the supervisor
  // thread, with the reply or the error. Throws process_message_too_large
  // when the encoded request exceeds slot_size, std::runtime_error when the
  // launcher has died (the pool cannot run anything any more).
  void submit(const In& in, callback done) { enqueue(in, std::move(done), nullptr); }

  // As submit(), with the result in a future: get() returns the reply or
  // throws the error.
  process_future<Out> call(const In& in) {
    auto p = std::make_shared<std::promise<process::outcome<Out>>>();
    process_future<Out> f(p->get_future());
    enqueue(in, nullptr, std::move(p));
    return f;
  }

  // Blocks until every message submitted so far has had its result
  // delivered (its callback returned). Not from a callback (it would wait
  // for itself).
  void drain() {
    std::unique_lock lk(m_);
    idle_.wait(lk, [&] { return unfinished_ == 0; });
  }

  std::size_t size() const noexcept { return opts_.workers; }
  const process_pool_options& options() const noexcept { return opts_; }
  pid_t launcher_pid() const noexcept { return launcher_; }

  // The worker processes alive now (for diagnostics and tests).
  std::vector<pid_t> worker_pids() const {
    std::vector<pid_t> pids;
    for (std::size_t w = 0; w < opts_.workers; ++w) {
      const auto& c = region_->ctl(w);
      // acquire: pid was published before state = alive.
      if (c.state.load(std::memory_order_acquire) == static_cast<std::uint32_t>(process::worker_state::alive))
        pids.push_back(c.pid.load(std::memory_order_relaxed));
    }
    return pids;
  }

  process_pool_stats stats() const noexcept {
    // relaxed: independent statistics.
    return {submitted_.load(std::memory_order_relaxed), completed_.load(std::memory_order_relaxed),
            failed_.load(std::memory_order_relaxed),    crashed_.load(std::memory_order_relaxed),
            retried_.load(std::memory_order_relaxed),   restarts_.load(std::memory_order_relaxed),
            hung_kills_.load(std::memory_order_relaxed), delayed_restarts_.load(std::memory_order_relaxed)};
  }

 private:
  struct record {
    std::string bytes;  // encoded request, kept for a retry
    unsigned attempts = 0;  // crashes of workers holding it so far
    // Where the result goes: submit()'s callback, or call()'s promise.
    callback done;
    std::shared_ptr<std::promise<process::outcome<Out>>> promise;
  };
  // What the supervisor knows of one worker (supervisor thread only).
  struct worker_view {
    std::vector<std::optional<record>> inflight;  // by ring index % depth
    std::uint64_t tail = 0;                        // requests published
    std::uint64_t consumed = 0;                    // replies read
    std::uint64_t last_taken = 0;                  // hang watch: taken when last seen changing
    std::chrono::steady_clock::time_point since{};
    bool kill_sent = false;
    unsigned streak = 0;  // deaths in a row of this worker's processes without a reply
    bool backing_off = false;  // dead, restart postponed until respawn_at
    std::chrono::steady_clock::time_point respawn_at{};
    bool live = false;  // dispatch(): state was alive at its start
  };

  static void check(const process_pool_options& o) {
    if (o.workers == 0) throw std::invalid_argument("runnel::process_pool: workers must be at least 1");
    if (o.depth == 0) throw std::invalid_argument("runnel::process_pool: depth must be at least 1");
    if (o.slot_size == 0 || o.slot_size > (std::size_t{1} << 30))
      throw std::invalid_argument("runnel::process_pool: slot_size must be between 1 and 2^30 bytes");
    if (o.queue_capacity == 0) throw std::invalid_argument("runnel::process_pool: queue_capacity must be at least 1");
    if (o.max_attempts == 0) throw std::invalid_argument("runnel::process_pool: max_attempts must be at least 1");
    if (o.hang_timeout.count() < 0) throw std::invalid_argument("runnel::process_pool: hang_timeout must not be negative");
    if (o.launcher_check_period.count() <= 0)
      throw std::invalid_argument("runnel::process_pool: launcher_check_period must be positive");
    if (o.restart_backoff.count() < 0 || o.restart_backoff_max < o.restart_backoff)
      throw std::invalid_argument(
          "runnel::process_pool: restart_backoff must not be negative nor above restart_backoff_max");
  }

  void ring_launcher() noexcept {
    const std::uint64_t one = 1;
    [[maybe_unused]] const auto n = ::write(event_fd_, &one, sizeof one);
  }

  void enqueue(const In& in, callback done, std::shared_ptr<std::promise<process::outcome<Out>>> promise) {
    std::string bytes;
    InCodec::encode(in, bytes);
    if (bytes.size() > opts_.slot_size)
      throw process_message_too_large("runnel::process_pool::submit: the encoded request takes " +
                                      std::to_string(bytes.size()) + " bytes, more than slot_size " +
                                      std::to_string(opts_.slot_size));
    std::call_once(started_, [this] { supervisor_ = std::thread([this] { supervise(); }); });
    {
      std::unique_lock lk(m_);
      // relaxed (both loads): a request_stop() is seen here at the latest
      // after stop()'s lock of m_; one from a signal handler alone is seen
      // at the next wake.
      if (stop_requested_.load(std::memory_order_relaxed))
        throw process_pool_stopped("runnel::process_pool::submit: the pool is stopping (request_stop)");
      space_.wait(lk, [&] {
        return pending_.size() < opts_.queue_capacity || broken_ || stop_requested_.load(std::memory_order_relaxed);
      });
      if (broken_) throw std::runtime_error("runnel::process_pool::submit: the launcher process died");
      if (stop_requested_.load(std::memory_order_relaxed))
        throw process_pool_stopped("runnel::process_pool::submit: the pool is stopping (request_stop)");
      pending_.push_back(record{std::move(bytes), 0, std::move(done), std::move(promise)});
      ++unfinished_;
    }
    submitted_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a statistic
    // A supervisor asleep with every ring full has no use for the message
    // yet: the workers wake it when they have used half a ring (supervise()).
    // seq_cst: pairs with the supervisor's store of true before its dispatch
    // (the lock of m_ on both sides orders them; seq_cst keeps it plain).
    if (wants_submissions_.load(std::memory_order_seq_cst)) process::notify_parent(region_->header());
  }

  // ---- worker process -----------------------------------------------------

  [[noreturn]] static void worker_main(void* ctx, std::size_t w) {
    auto& self = *static_cast<process_pool*>(ctx);
    const process::shared_region& r = *self.region_;
    process::region_header& h = r.header();
    process::worker_ctl& c = r.ctl(w);
    std::uint64_t next = 0;  // the parent reset the indices before asking for this process
    const std::uint64_t refill_at = self.opts_.depth / 2;
    std::string out;
    for (;;) {
      // acquire: the parent's stores before shutdown (none needed yet; cheap).
      if (h.shutdown.load(std::memory_order_acquire) != 0) ::_exit(0);
      // acquire: the request slots' bytes were written before tail.
      const std::uint64_t tail = c.tail.load(std::memory_order_acquire);
      if (tail == next) {
        idle(h, c, next);
        continue;
      }
      // Every request published so far, one after the other.
      for (; next < tail; ++next) {
        // release: irrelevant to the slot; what matters is that the store
        // precedes the call, so a crash inside it leaves taken = next + 1.
        c.taken.store(next + 1, std::memory_order_release);
        self.serve(r.request_slot(w, next), r.reply_slot(w, next), out);
        // seq_cst: publishes the reply; the news half of notify_parent's pair.
        c.done.store(next + 1, std::memory_order_seq_cst);
        // The parent is woken (if it sleeps) twice a ring's worth at most:
        // when depth / 2 requests are left (time to refill, and to take the
        // replies so far in one batch), and after the last request published
        // (the worker may go idle next: a lone message's reply, or a ring
        // full of replies, must not wait for anything else). Not at every
        // reply in between: with nothing to refill from, the parent would
        // wake for each one and take the CPU its workers need.
        if (const std::uint64_t left = tail - (next + 1); left == 0 || left == refill_at)
          process::notify_parent(h);
      }
    }
  }

  // Spins briefly (replies often come back-to-back), then sleeps on the
  // worker's futex until the parent publishes a request or shuts down.
  static void idle(process::region_header& h, process::worker_ctl& c, std::uint64_t next) noexcept {
    for (int i = 0; i < idle_spins; ++i) {
      // acquire: as in worker_main.
      if (c.tail.load(std::memory_order_acquire) != next) return;
      detail::cpu_relax();
    }
    const std::uint32_t seq = c.wake.load(std::memory_order_seq_cst);
    // seq_cst: Dekker with the parent's tail store then sleeping load.
    c.sleeping.store(1, std::memory_order_seq_cst);
    if (c.tail.load(std::memory_order_seq_cst) == next && h.shutdown.load(std::memory_order_seq_cst) == 0)
      detail::futex_wait(c.wake, seq, detail::futex_scope::shared);
    c.sleeping.store(0, std::memory_order_relaxed);  // relaxed: only a hint to the parent
  }

  // Runs the function on one request slot and writes the reply slot.
  void serve(process::slot_header* rq, process::slot_header* rp, std::string& out) noexcept {
    auto kind = process::reply_kind::value;
    out.clear();
    try {
      In in = InCodec::decode(std::string_view(reinterpret_cast<const char*>(process::shared_region::payload(rq)),
                                               rq->bytes));
      Out o = fn_(std::move(in));
      OutCodec::encode(o, out);
      if (out.size() > opts_.slot_size) {
        kind = process::reply_kind::encode_fail;
        out = "runnel::process_pool: the encoded reply takes " + std::to_string(out.size()) +
              " bytes, more than slot_size " + std::to_string(opts_.slot_size);
      }
    } catch (const std::exception& e) {
      kind = process::reply_kind::exception;
      out = e.what();
    } catch (...) {
      kind = process::reply_kind::exception;
      out = "runnel::process_pool: the function threw an exception not derived from std::exception";
    }
    if (out.size() > opts_.slot_size) out.resize(opts_.slot_size);  // a long what(): truncated
    std::memcpy(process::shared_region::payload(rp), out.data(), out.size());
    rp->bytes = static_cast<std::uint32_t>(out.size());
    rp->kind = static_cast<std::uint32_t>(kind);
  }

  // ---- supervisor (parent) ----------------------------------------------

  void supervise() {
    auto& h = region_->header();
    for (;;) {
      if (step()) continue;
      if (finished()) return;
      if (spin_for_news()) continue;
      const std::uint32_t seq = h.parent_wake.load(std::memory_order_seq_cst);
      // seq_cst: Dekker with every notifier (news store, then sleeping load).
      h.parent_sleeping.store(1, std::memory_order_seq_cst);
      // A submission wakes the supervisor only when a ring has room for it.
      // Set before step() takes pending_ under m_: a submission that pushes
      // after that lock sees true (its own lock of m_ comes later), one
      // before is dispatched by step(). Cleared when every live ring is
      // full: only the supervisor makes room (by collecting), and each
      // worker of a full ring wakes it on the way (depth / 2 left, then
      // none), a dead one through the launcher.
      wants_submissions_.store(true, std::memory_order_seq_cst);  // seq_cst: see enqueue()
      const bool busy = step();
      // relaxed: a submitter that reads this false needs no ordering; the
      // full rings' workers wake the supervisor whatever it saw.
      if (!busy && rings_full()) wants_submissions_.store(false, std::memory_order_relaxed);
      if (!busy && !finished()) sleep(h.parent_wake, seq, sleep_limit());
      h.parent_sleeping.store(0, std::memory_order_relaxed);  // relaxed: a hint to notifiers
      if (!busy && launcher_check_due()) check_launcher();
    }
  }

  // Before the supervisor sleeps with messages outstanding, it watches for
  // a while for replies and submissions: under load they come every few
  // microseconds, and catching them awake saves the futex wake-up (a
  // system call and two context switches) that would otherwise come with
  // nearly every batch. The watch adapts like the thread pool's spin: a
  // watch that saw news doubles the next one's budget (at most
  // supervisor_spin_max rounds, ~10 us), one that saw none halves it (at
  // least one round), so that a supervisor whose news comes rarely (slow
  // messages: its workers want the CPUs) goes to sleep almost at once.
  // Returns true if there is news (step() then takes it).
  //
  // News is what a worker would wake the supervisor for (a ring with at
  // most depth / 2 requests left and replies to collect), or a submission
  // while a ring has room. A single reply is not: with slow messages one
  // comes every few microseconds, and watching for each would keep the
  // supervisor awake on a CPU its workers need.
  bool spin_for_news() noexcept {
    bool outstanding = false, room = false;
    for (const auto& v : views_) {
      outstanding |= v.tail != v.consumed;
      room |= v.tail - v.consumed < opts_.depth;
    }
    if (!outstanding) return false;
    // relaxed: a hint; step() reads the data with its own ordering.
    const std::uint64_t submitted = submitted_.load(std::memory_order_relaxed);
    for (unsigned round = 0; round < spin_budget_; ++round) {
      detail::pause_round();
      bool news = room && submitted_.load(std::memory_order_relaxed) != submitted;  // relaxed: a hint
      for (std::size_t w = 0; w < opts_.workers && !news; ++w) {
        const auto& v = views_[w];
        // relaxed: a hint; collect() loads done again with its ordering.
        const std::uint64_t done = region_->ctl(w).done.load(std::memory_order_relaxed);
        news = done != v.consumed && v.tail - done <= opts_.depth / 2;
      }
      if (news) {
        spin_budget_ = process::next_spin_budget(spin_budget_, true, supervisor_spin_max);
        return true;
      }
    }
    spin_budget_ = process::next_spin_budget(spin_budget_, false, supervisor_spin_max);
    return false;
  }

  // Every live worker's ring holds depth requests (as of the last dispatch).
  bool rings_full() const noexcept {
    for (const auto& v : views_)
      if (v.live && v.tail - v.consumed < opts_.depth) return false;
    return true;
  }

  static void sleep(std::atomic<std::uint32_t>& word, std::uint32_t seq, std::chrono::nanoseconds limit) noexcept {
    if (limit.count() < 0)
      detail::futex_wait(word, seq, detail::futex_scope::shared);
    else
      detail::futex_wait_until(word, seq, std::chrono::steady_clock::now() + limit, detail::futex_scope::shared);
  }

  // One pass over everything; true if anything moved.
  bool step() {
    bool moved = false;
    for (std::size_t w = 0; w < opts_.workers; ++w) moved |= collect(w);
    for (std::size_t w = 0; w < opts_.workers; ++w) {
      // seq_cst: the other half of the launcher's state store (notify_parent).
      if (region_->ctl(w).state.load(std::memory_order_seq_cst) ==
          static_cast<std::uint32_t>(process::worker_state::dead)) {
        bury(w);
        moved = true;
      }
    }
    moved |= respawn_due();
    watch_hangs();
    moved |= dispatch();
    return moved;
  }

  bool finished() {
    std::lock_guard lk(m_);
    if (!stopping_ || !pending_.empty()) return false;
    for (const auto& v : views_)
      if (v.tail != v.consumed) return false;
    return true;
  }

  // How long the supervisor may sleep: until a hang could be declared, or a
  // while to look at the launcher when work is outstanding; else for ever.
  // A worker in restart backoff: until its restart is due.
  std::chrono::nanoseconds sleep_limit() const {
    bool outstanding = false;
    std::chrono::nanoseconds limit = std::chrono::nanoseconds::max();
    const auto now = std::chrono::steady_clock::now();
    for (const auto& v : views_) {
      outstanding |= v.tail != v.consumed;
      if (v.backing_off) limit = std::min<std::chrono::nanoseconds>(limit, v.respawn_at - now);
    }
    if (outstanding) {
      limit = std::min<std::chrono::nanoseconds>(limit, opts_.launcher_check_period);
      if (opts_.hang_timeout.count() > 0) limit = std::min<std::chrono::nanoseconds>(limit, opts_.hang_timeout / 4);
    }
    if (limit == std::chrono::nanoseconds::max()) return std::chrono::nanoseconds(-1);
    return std::max<std::chrono::nanoseconds>(limit, std::chrono::milliseconds(1));
  }

  // Restarts the backed-off workers whose delay is over (or all of them, on
  // a stop: draining is not held up by a backoff).
  bool respawn_due() {
    bool moved = false;
    // relaxed: either flag only shortens a wait; the wake that follows the
    // store makes the supervisor look again.
    const bool now_all = hurry_.load(std::memory_order_relaxed) || stop_requested_.load(std::memory_order_relaxed);
    std::chrono::steady_clock::time_point now{};
    for (std::size_t w = 0; w < opts_.workers; ++w) {
      auto& v = views_[w];
      if (!v.backing_off) continue;
      if (!now_all) {
        if (now == std::chrono::steady_clock::time_point{}) now = std::chrono::steady_clock::now();
        if (now < v.respawn_at) continue;
      }
      v.backing_off = false;
      // release: the indices reset in bury() before the launcher forks.
      region_->ctl(w).state.store(static_cast<std::uint32_t>(process::worker_state::spawn_wanted),
                                  std::memory_order_release);
      ring_launcher();
      moved = true;
    }
    return moved;
  }

  // Reads the replies worker w has published.
  bool collect(std::size_t w) {
    auto& c = region_->ctl(w);
    auto& v = views_[w];
    // seq_cst: the other half of the worker's done store (notify_parent).
    const std::uint64_t done = c.done.load(std::memory_order_seq_cst);
    if (done == v.consumed) return false;
    v.streak = 0;  // this process completed a message: its deaths are no longer in a row
    const std::uint64_t n = done - v.consumed;
    while (v.consumed < done) {
      process::slot_header* s = region_->reply_slot(w, v.consumed);
      auto& slot = v.inflight[v.consumed % opts_.depth];
      process::outcome<Out> r = read_reply(s);
      // Counted before the result is handed over: whoever has a result sees
      // it counted in stats(). relaxed: statistics; the hand-over (a future's
      // or callback's release) orders the count before the caller's read.
      (r.error ? failed_ : completed_).fetch_add(1, std::memory_order_relaxed);
      complete(*slot, std::move(r));
      slot.reset();
      ++v.consumed;
    }
    settle(n);
    return true;
  }

  static process::failure error_text(std::string text) {
    process::failure f;
    f.message = std::move(text);
    return f;
  }

  process::outcome<Out> read_reply(process::slot_header* s) {
    process::outcome<Out> r;
    const std::uint32_t n = s->bytes;
    if (n > opts_.slot_size) {  // a worker that scribbled over its slot
      r.error = error_text("runnel::process_pool: a reply slot held a corrupt length");
      return r;
    }
    const std::string_view bytes(reinterpret_cast<const char*>(process::shared_region::payload(s)), n);
    try {
      switch (static_cast<process::reply_kind>(s->kind)) {
        case process::reply_kind::value:
          r.value.emplace(OutCodec::decode(bytes));
          break;
        case process::reply_kind::exception:
        case process::reply_kind::encode_fail:
          r.error = error_text(std::string(bytes));
          break;
        default:
          r.error = error_text("runnel::process_pool: a reply slot held a corrupt kind");
      }
    } catch (...) {
      r.error.emplace();  // the reply did not decode
      r.error->other = std::current_exception();
    }
    return r;
  }

  // Hands a message its result: the callback, or the future's promise.
  static void complete(record& rec, process::outcome<Out>&& r) noexcept {
    // noexcept: a throwing callback terminates.
    if (rec.promise) {
      rec.promise->set_value(std::move(r));
      return;
    }
    process_result<Out> res;
    res.value = std::move(r.value);
    if (r.error) res.error = r.error->as_exception_ptr();
    rec.done(std::move(res));
  }

  // `n` results were delivered: the count drain() waits on (one lock for a
  // batch of replies).
  void settle(std::uint64_t n) noexcept {
    std::lock_guard lk(m_);
    unfinished_ -= n;
    if (unfinished_ == 0) idle_.notify_all();
  }

  // Every result that is not a reply leaves through here.
  void finish(record& rec, process::outcome<Out>&& r) noexcept {
    complete(rec, std::move(r));
    settle(1);
  }

  static process::outcome<Out> crash(int sig, int code, unsigned attempts, bool hung) {
    process::outcome<Out> o;
    o.error.emplace();
    o.error->what = process::failure::kind::crash;
    o.error->signal = sig;
    o.error->exit_code = code;
    o.error->attempts = attempts;
    o.error->hung = hung;
    return o;
  }

  // Worker w was reaped by the launcher: settle what it held, restart it.
  void bury(std::size_t w) {
    collect(w);  // replies it published before dying
    auto& c = region_->ctl(w);
    auto& v = views_[w];
    const int status = c.wait_status.load(std::memory_order_relaxed);  // published by the state store
    const int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 0;
    const std::uint64_t taken = c.taken.load(std::memory_order_acquire);
    std::vector<record> again;
    std::optional<record> reported;  // its result goes out last: stats() then counts this restart
    const bool hung = v.kill_sent;
    for (std::uint64_t i = v.consumed; i < v.tail; ++i) {
      auto& slot = v.inflight[i % opts_.depth];
      record rec = std::move(*slot);
      slot.reset();
      if (i + 1 == taken) {  // the message it held when it died
        if (++rec.attempts >= opts_.max_attempts) {
          crashed_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistic
          reported = std::move(rec);
          continue;
        }
        retried_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistic
      }
      again.push_back(std::move(rec));
    }
    restarts_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistic
    // No process uses w's indices now; the state store below publishes them.
    c.tail.store(0, std::memory_order_relaxed);
    c.taken.store(0, std::memory_order_relaxed);
    c.done.store(0, std::memory_order_relaxed);
    c.sleeping.store(0, std::memory_order_relaxed);
    const unsigned streak = v.streak + 1;
    v = worker_view{};
    v.inflight.resize(opts_.depth);
    v.streak = streak;
    const auto delay = process::restart_delay(streak, opts_.restart_backoff, opts_.restart_backoff_max);
    if (delay.count() > 0) {
      delayed_restarts_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistic
      v.backing_off = true;
      v.respawn_at = std::chrono::steady_clock::now() + delay;
      // relaxed: only the parent acts on backoff (the launcher ignores it);
      // respawn_due() publishes the indices with its own release store.
      c.state.store(static_cast<std::uint32_t>(process::worker_state::backoff), std::memory_order_relaxed);
    } else {
      // release: the reset indices before the launcher forks the new process.
      c.state.store(static_cast<std::uint32_t>(process::worker_state::spawn_wanted), std::memory_order_release);
      ring_launcher();
    }
    if (!again.empty()) {
      std::lock_guard lk(m_);
      pending_.insert(pending_.begin(), std::make_move_iterator(again.begin()), std::make_move_iterator(again.end()));
    }
    if (reported) finish(*reported, crash(sig, code, reported->attempts, hung));
  }

  // Asks the launcher to kill a worker that has held one message too long.
  void watch_hangs() {
    if (opts_.hang_timeout.count() == 0) return;
    const auto now = std::chrono::steady_clock::now();
    for (std::size_t w = 0; w < opts_.workers; ++w) {
      auto& c = region_->ctl(w);
      auto& v = views_[w];
      // relaxed: progress counters only watched; no data is read through them.
      const std::uint64_t taken = c.taken.load(std::memory_order_relaxed);
      if (taken != v.last_taken) {
        v.last_taken = taken;
        v.since = now;
        continue;
      }
      if (taken <= c.done.load(std::memory_order_relaxed) || v.kill_sent) continue;  // not holding
      if (c.state.load(std::memory_order_acquire) != static_cast<std::uint32_t>(process::worker_state::alive)) continue;
      if (now - v.since < opts_.hang_timeout) continue;
      v.kill_sent = true;
      hung_kills_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistic
      c.kill_wanted.store(1, std::memory_order_release);    // release: read by the launcher's exchange
      ring_launcher();
    }
  }

  // Moves waiting messages into the rings of the least loaded live workers:
  // as many as the rings have room for, taken under one lock, and one tail
  // store (and at most one wake-up) per worker for the batch.
  bool dispatch() {
    std::size_t room = 0;
    for (std::size_t w = 0; w < opts_.workers; ++w) {
      auto& v = views_[w];
      // acquire: a worker restarted by the launcher (its indices were reset before).
      v.live = region_->ctl(w).state.load(std::memory_order_acquire) ==
               static_cast<std::uint32_t>(process::worker_state::alive);
      if (v.live) room += opts_.depth - (v.tail - v.consumed);
    }
    if (room == 0) return false;
    {
      std::lock_guard lk(m_);
      if (pending_.empty()) return false;
      const std::size_t n = std::min(room, pending_.size());
      for (std::size_t i = 0; i < n; ++i) {
        batch_.push_back(std::move(pending_.front()));
        pending_.pop_front();
      }
      // Submitters blocked on a full queue are woken once it is half empty,
      // not at every message taken: one wake-up lets them queue a batch.
      if (pending_.size() <= opts_.queue_capacity / 2) space_.notify_all();
    }
    std::uint64_t touched = 0;  // bit w % 64: worker w got requests (a hint; publish checks tails)
    for (record& rec : batch_) {
      std::size_t best = 0;
      std::uint64_t best_load = opts_.depth;
      for (std::size_t w = 0; w < opts_.workers; ++w) {
        const auto& v = views_[w];
        const std::uint64_t load = v.tail - v.consumed;
        if (v.live && load < best_load) best_load = load, best = w;
      }
      put(best, std::move(rec));
      touched |= std::uint64_t{1} << (best % 64);
    }
    batch_.clear();
    for (std::size_t w = 0; w < opts_.workers; ++w)
      if ((touched >> (w % 64)) & 1) publish(w);
    return true;
  }

  // Writes rec into worker w's next request slot; publish() makes it visible.
  void put(std::size_t w, record&& rec) {
    auto& v = views_[w];
    process::slot_header* s = region_->request_slot(w, v.tail);
    std::memcpy(process::shared_region::payload(s), rec.bytes.data(), rec.bytes.size());
    s->bytes = static_cast<std::uint32_t>(rec.bytes.size());
    s->kind = 0;
    v.inflight[v.tail % opts_.depth] = std::move(rec);
    ++v.tail;
  }

  // Publishes the requests put() wrote for worker w (one store for a batch)
  // and wakes the worker if it sleeps.
  void publish(std::size_t w) {
    auto& c = region_->ctl(w);
    // seq_cst: publishes the slots (release) and is the news half of the
    // Dekker pair with the worker's sleeping store then tail load.
    c.tail.store(views_[w].tail, std::memory_order_seq_cst);
    process::wake_sleeper(c.sleeping, c.wake, 1);
  }

  // Finishes every submitted message, then stops the workers and the
  // launcher and reaps the launcher. Once only (stop(), then the destructor).
  void shut_down() {
    {
      std::lock_guard lk(m_);
      if (shut_down_) return;
      shut_down_ = true;
      stopping_ = true;
    }
    hurry_.store(true, std::memory_order_seq_cst);  // seq_cst: before the wake below
    process::notify_parent(region_->header());
    if (supervisor_.joinable()) supervisor_.join();
    auto& h = region_->header();
    h.shutdown.store(1, std::memory_order_seq_cst);  // seq_cst: before the wakes below (workers re-check it)
    for (std::size_t w = 0; w < opts_.workers; ++w) {
      auto& c = region_->ctl(w);
      c.wake.fetch_add(1, std::memory_order_seq_cst);
      detail::futex_wake(c.wake, INT_MAX, detail::futex_scope::shared);
    }
    ring_launcher();
    int status = 0;
    if (!launcher_reaped_)
      while (::waitpid(launcher_, &status, 0) < 0 && errno == EINTR) {
      }
    launcher_reaped_ = true;
    ::close(event_fd_);
  }

  // The launcher is looked at (a waitpid system call) after a sleep at most
  // once a launcher_check_period (an option), not after every wake-up: under load the
  // supervisor wakes every few dozen messages. The sleep is bounded by the
  // same period while messages are outstanding (sleep_limit), so a dead
  // launcher is still found within about two periods.
  bool launcher_check_due() {
    const auto now = std::chrono::steady_clock::now();
    if (now - last_launcher_check_ < opts_.launcher_check_period) return false;
    last_launcher_check_ = now;
    return true;
  }

  // If the launcher has died (killed from outside), nothing can run any more:
  // every message held or waiting is reported, and submit() refuses.
  void check_launcher() {
    if (broken_) return;
    int status = 0;
    if (::waitpid(launcher_, &status, WNOHANG) != launcher_) return;
    launcher_reaped_ = true;
    std::vector<record> lost;
    for (auto& v : views_) {
      for (std::uint64_t i = v.consumed; i < v.tail; ++i) lost.push_back(std::move(*v.inflight[i % opts_.depth]));
      v = worker_view{};
      v.inflight.resize(opts_.depth);
    }
    {
      std::lock_guard lk(m_);
      broken_ = true;
      for (auto& r : pending_) lost.push_back(std::move(r));
      pending_.clear();
    }
    space_.notify_all();
    for (auto& rec : lost) {
      crashed_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistic
      finish(rec, crash(WIFSIGNALED(status) ? WTERMSIG(status) : 0, WIFEXITED(status) ? WEXITSTATUS(status) : 0,
                     rec.attempts + 1, false));
    }
  }

  // Pause iterations an idle worker checks its ring before sleeping, to
  // catch back-to-back requests awake: about 5 us where a pause takes
  // ~20 ns (measured on these virtual CPUs; a pause's length varies by CPU).
  static constexpr int idle_spins = 256;
  // Rounds of detail::pause_round() (32 pauses) the supervisor watches at most before it sleeps
  // (spin_for_news): about 10 microseconds (512 pauses of ~20 ns here).
  static constexpr unsigned supervisor_spin_max = 16;

  process_pool_options opts_;
  std::function<Out(In&&)> fn_;
  std::unique_ptr<process::shared_region> region_;
  int event_fd_ = -1;
  pid_t launcher_ = -1;
  bool launcher_reaped_ = false;

  std::mutex m_;
  std::condition_variable space_;
  std::condition_variable idle_;  // unfinished_ reached 0
  std::deque<record> pending_;  // guarded by m_
  bool stopping_ = false;       // guarded by m_
  bool shut_down_ = false;      // guarded by m_
  std::uint64_t unfinished_ = 0;  // guarded by m_: submitted, result not yet delivered
  bool broken_ = false;         // guarded by m_ (written by the supervisor)
  std::once_flag started_;
  std::thread supervisor_;
  std::vector<worker_view> views_;  // supervisor thread only (after construction)
  std::vector<record> batch_;       // supervisor thread only: dispatch()'s messages in transit
  unsigned spin_budget_ = 1;        // supervisor thread only: spin_for_news()'s rounds
  std::chrono::steady_clock::time_point last_launcher_check_{};  // supervisor thread only

  std::atomic<std::uint64_t> submitted_{0}, completed_{0}, failed_{0}, crashed_{0}, retried_{0}, restarts_{0},
      hung_kills_{0}, delayed_restarts_{0};
  // Set by request_stop() (possibly in a signal handler): submit() refuses.
  std::atomic<bool> stop_requested_{false};
  // Set by shut_down(): the supervisor restarts backed-off workers at once.
  std::atomic<bool> hurry_{false};
  // False while the supervisor sleeps with every worker's ring full: a
  // submission need not wake it (supervise()). Written by the supervisor.
  std::atomic<bool> wants_submissions_{true};
};

// What process_stage(pool) returns: given to pipeline_flow::stage(), it
// builds a detail::process_stage_node (process/stage_node.hpp).
template <class Pool>
struct process_stage_t {
  template <class T>
  using node_type = detail::process_stage_node<T, Pool>;

  Pool* pool;
  std::size_t max_inflight;  // 0: the default (inflight_limit)

  // Messages the node keeps submitted at once: max_inflight, or twice what
  // the workers' rings hold (so a ring is refilled while it drains); never
  // more than the pool's queue_capacity, so that the node alone never makes
  // submit() block.
  std::size_t inflight_limit() const noexcept {
    const auto& o = pool->options();
    const std::size_t want = max_inflight != 0 ? max_inflight : 2 * o.workers * o.depth;
    return std::max<std::size_t>(1, std::min({want, o.queue_capacity, std::size_t{1} << 31}));
  }
};

// A pipeline stage that runs `pool`'s function in its worker processes:
//   .stage(runnel::process_stage(pool))            // T must be the pool's In
// The node submits messages and passes the replies on as they come back:
// no pool thread waits for a reply (see process/stage_node.hpp). At most
// `max_inflight` messages (default: 2 * workers * depth, at most
// queue_capacity) are submitted and not yet passed on, which bounds its
// memory. A crash is reported as process_crash (a throw in the worker as
// process_error; a refused submit as its exception) to the pipeline's error
// handler, with the whole message (the node keeps it until its result).
// Replies leave in the order they arrive, not in input order (ordered =
// true is refused); stage_options::workers does not apply (the pool's
// processes are the workers); capacity, batch and name do. Messages cross
// as the pool's codec says (the node copies each into the pool's queue).
// The pool must outlive the run; other users may share it, but if they fill
// its queue, the node's submit() waits like theirs.
template <class In, class Out, class IC, class OC>
process_stage_t<process_pool<In, Out, IC, OC>> process_stage(process_pool<In, Out, IC, OC>& pool,
                                                             std::size_t max_inflight = 0) {
  return {&pool, max_inflight};
}

}  // namespace runnel
