// The machinery behind runnel::pipeline: the shared run state, and the nodes
// (source, stage, sink) whose lanes run as pool tasks.
//
// Lanes. A node with `workers = N` has N lanes. A lane is a resumable task:
// one activation drains a few batches from its input channel, runs the user
// function on each message, pushes the results, and then either re-posts
// itself with post_fair (to let other stages run) or parks: on its input
// channel when that is empty, on its output channel when that is full. A
// parked lane is a registered waker, not a task; the next send / receive /
// close on that channel removes the waker and posts the lane again. So no
// worker ever blocks on a channel, and any number of stages run on any number
// of workers (even one).
//
// Exactly one activation of a lane exists at any time: a lane is either
// running, queued in the pool, or registered as a waker in exactly one list,
// and whoever removes it from that list (the notifier, cancel(), or the lane
// itself after its re-check) is the only one who may schedule it.
//
// Fusion. A stage lane that has just pushed a batch into the channel of a
// serial downstream node (one lane, internal channel) runs that node's lane
// in its own task instead of letting the channel's wake-up post it, when the
// downstream lane is parked on that channel: it takes the lane back with
// unpark() before sending (so it owns the lane's one activation, exactly as a
// notifier would), sends, and calls the lane's run(). The downstream lane
// still takes its messages from the channel, so order, counts and
// backpressure are those of an ordinary activation; what is saved is the
// pool post, a possible wake-up of a sleeping worker, and the messages'
// cache lines crossing to another core. A downstream lane that is busy
// elsewhere is left alone (the channel wakes it as usual). The source fuses the node
// after it, serial or parallel, adaptively (fusion_schedule, below): on a
// one-worker pool always; elsewhere only while the downstream work a message
// measures cheaper than moving the message to another core, since the source
// is serial and usually the ceiling of the whole run.
//
// Ordered parallel stages. Lanes take batches from the input under the
// window mutex, which gives each message a sequence number in input order.
// Results go to a reorder window of W slots indexed by sequence number; a
// lane that would take a message more than W ahead of the oldest unemitted
// one parks on the window instead (bounded memory). Whoever fills the oldest
// slot while nobody holds the "emitter" token takes it and pushes the
// contiguous ready run to the output in order; a full output parks the
// emitter (token held) on the output channel. Filtered, failed and discarded
// messages leave empty slots that the emitter skips.
//
// Accounting. Each node counts in / out / filtered / failed / discarded; per
// node, in == out + filtered + failed + discarded once the run has finished,
// and one node's out is the next node's in. Cancel closes the internal
// channels (so upstream pushes fail and their values are counted as
// discarded) and lets every lane drain and count what it holds.
//
// Fates. Every message counted as discarded or failed is destroyed under a
// message_fate_scope saying so (pipeline/message_fate.hpp), one by one or as
// the tail of a buffer, so that a message type whose destructor settles
// something (a broker ack) can tell "never processed" and "failed" from
// "done". Only the messages counted are covered: moved-from husks and
// processed messages are destroyed with the normal fate.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "../channel.hpp"
#include "../channel/channel_state.hpp"
#include "../channel/task_waiters.hpp"
#include "../detail/assert.hpp"
#include "../detail/asymmetric_fence.hpp"
#include "../detail/ring_common.hpp"
#include "../pipeline_types.hpp"
#include "../thread_pool.hpp"
#include "message_fate.hpp"

namespace runnel::detail {

class pipeline_state;

// Relaxed counter used for statistics. Relaxed everywhere: a monitoring
// snapshot while running; the final values are read after the run finished,
// which the run's completion (a mutex) orders after every increment.
struct stat_counter {
  std::atomic<std::uint64_t> v{0};
  void add(std::uint64_t n) noexcept {
    if (n != 0) v.fetch_add(n, std::memory_order_relaxed);  // Relaxed: see above.
  }
  std::uint64_t get() const noexcept { return v.load(std::memory_order_relaxed); }  // Relaxed: see above.
};

struct node_base {
  explicit node_base(pipeline_state& s, std::string n, std::size_t w) : st(s), name(std::move(n)), workers(w) {}
  virtual ~node_base() = default;
  node_base(const node_base&) = delete;
  node_base& operator=(const node_base&) = delete;

  virtual void start() = 0;
  // Called once by cancel(), after the cancelled flag is set: close internal
  // channels, take back parked lanes that nothing else would wake.
  virtual void on_cancel() noexcept = 0;
  virtual std::size_t queue_depth() const noexcept = 0;

  pipeline_state& st;
  std::size_t index = 0;
  std::string name;
  std::size_t workers;
  stat_counter in, out, filtered, failed, discarded;
  stat_counter fused;  // activations run in the upstream's task (fusion)
};

// A resumable task of a node; parks as a waker.
struct lane : waker {
  lane() { wake = &lane::on_wake; }
  virtual ~lane() = default;
  virtual void run() noexcept = 0;
  pipeline_state* st = nullptr;
  static void on_wake(waker* w) noexcept;
};

class pipeline_state : public std::enable_shared_from_this<pipeline_state> {
 public:
  explicit pipeline_state(thread_pool& p) : pool(p) {}

  // Posts the lane again (after a wake-up: it continues where it parked).
  void resume(lane* l) {
    assert_unregistered(*l);
    pool.post([self = shared_from_this(), l] { l->run(); });
  }
  // Re-posts behind other waiting work (yield after a busy activation).
  void yield(lane* l) {
    assert_unregistered(*l);
    pool.post_fair([self = shared_from_this(), l] { l->run(); });
  }
  // The lane's one activation (header comment) belongs to whoever schedules
  // it: a lane still registered in a waiter list could also be scheduled by
  // that list's notifier, and would then run twice at once.
  static void assert_unregistered([[maybe_unused]] const lane& l) noexcept {
    // Relaxed: a lane in no list is written by nobody but its scheduler.
    RUNNEL_ASSERT(l.owner_.load(std::memory_order_relaxed) == nullptr,
                  "a lane is scheduled only while it is registered in no waiter list");
  }

  bool cancelled() const noexcept { return cancelled_.load(); }

  void cancel() noexcept {
    if (cancelled_.exchange(true)) return;
    // Lanes re-check cancelled() after registering a waker (heavy fence);
    // on_cancel() reads their registrations after this fence.
    light_fence();
    for (auto& n : nodes) n->on_cancel();
  }

  // An exception that ends the run (no handler, or the handler threw).
  void fail(std::exception_ptr e) noexcept {
    {
      std::lock_guard lock(m_);
      if (!first_error_) first_error_ = std::move(e);
    }
    cancel();
  }

  // A user function threw while processing `msg` (may be null) in `node`.
  template <class T>
  void report(const node_base& node, std::exception_ptr e, T* msg) noexcept {
    if (!on_error) {
      fail(std::move(e));
      return;
    }
    stage_failure f;
    f.stage = node.index;
    f.stage_name = node.name;
    f.error = std::move(e);
    if (msg != nullptr) {
      f.message_type = &typeid(T);
      f.message_ptr = msg;
    }
    try {
      // Serialised: stages call it from several workers at once.
      std::lock_guard lock(handler_m_);
      on_error(f);
    } catch (...) {
      fail(std::current_exception());
    }
  }

  void node_done() noexcept {
    const std::size_t before = live_.fetch_sub(1);
    RUNNEL_ASSERT(before != 0, "each node of a started run reports done once");
    if (before != 1) return;
    std::shared_ptr<pipeline_state> self;
    {
      std::lock_guard lock(m_);
      finished_ = true;
      self = std::move(self_);
      cv_.notify_all();
    }
    // `self` goes out of scope here, after the lock is released; the caller
    // (a lane's task) holds its own reference, so this is never the last.
  }

  void start() {
    live_.store(nodes.size());
    // The run owns itself until its last node is done: a lane parked on a
    // user's channel can be unlinked by a thread outside the pool, which then
    // calls its wake-up; the handle may be dropped in between (on a worker,
    // dropping only cancels), so no handle may be what keeps the lanes alive.
    self_ = shared_from_this();
    try {
      for (auto& n : nodes) n->start();
    } catch (...) {
      self_.reset();
      throw;
    }
  }

  bool finished() const {
    std::lock_guard lock(m_);
    return finished_;
  }

  // Blocks until every node is done; returns the error that ended the run.
  std::exception_ptr wait() {
    std::unique_lock lock(m_);
    cv_.wait(lock, [this] { return finished_; });
    return first_error_;
  }

  // As wait(), giving up at `deadline`: false on time-out (e untouched).
  bool wait_until(std::chrono::steady_clock::time_point deadline, std::exception_ptr& e) {
    std::unique_lock lock(m_);
    if (!cv_.wait_until(lock, deadline, [this] { return finished_; })) return false;
    e = first_error_;
    return true;
  }

  pipeline_stats stats() const {
    pipeline_stats s;
    for (auto& n : nodes) {
      stage_stats x;
      x.name = n->name;
      x.workers = n->workers;
      x.in = n->in.get();
      x.out = n->out.get();
      x.filtered = n->filtered.get();
      x.failed = n->failed.get();
      x.discarded = n->discarded.get();
      x.fused = n->fused.get();
      x.queue_depth = n->queue_depth();
      s.filtered += x.filtered;
      s.failed += x.failed;
      s.discarded += x.discarded;
      s.stages.push_back(std::move(x));
    }
    if (!s.stages.empty()) {
      s.produced = s.stages.front().in;
      s.delivered = s.stages.back().out;
    }
    s.finished = finished();
    s.cancelled = cancelled();
    return s;
  }

  thread_pool& pool;
  error_handler on_error;
  std::vector<std::unique_ptr<node_base>> nodes;

 private:
  std::atomic<bool> cancelled_{false};
  std::atomic<std::size_t> live_{0};
  mutable std::mutex m_;
  std::mutex handler_m_;
  std::condition_variable cv_;
  bool finished_ = false;               // guarded by m_
  std::shared_ptr<pipeline_state> self_;  // from start() until finished; guarded by m_ after start()
  std::exception_ptr first_error_;      // guarded by m_
};

inline void lane::on_wake(waker* w) noexcept {
  auto* l = static_cast<lane*>(w);
  l->st->resume(l);
}

// Where a node's output goes: an internal channel (closed when the node is
// done) or a user's channel given to .to() (the pipeline's sender handle is
// dropped when the node is done, closing it if it was the last).
template <class U>
struct output_port {
  std::shared_ptr<channel_state<U>> ch;
  // The pipeline's handle on a .to() channel (a plain handle rather than an
  // optional: g++ 12 with sanitizers warns falsely about optional<handle>).
  sender<U> external;
  bool is_external = false;
  std::size_t capacity_hint = 1024;
  // The lone lane of a serial node reading this (internal) channel, which an
  // upstream stage lane may run in its own task (fusion, header comment);
  // null when the reader has several lanes or the channel is the user's.
  lane* downstream = nullptr;
  node_base* downstream_node = nullptr;
  // Every lane of the node reading this internal channel (serial or
  // parallel), for the source's adaptive fusion; empty when unknown.
  std::vector<lane*> downstream_lanes;

  void finish() noexcept {
    if (is_external) external.reset();
    else if (ch) ch->close();
  }
  void close_if_internal() noexcept {
    if (!is_external && ch) ch->close();
  }
};

template <class T>
struct input_port {
  std::shared_ptr<channel_state<T>> ch;
  receiver<T> external;  // the pipeline's handle on a .from() channel
  bool is_external = false;
};

// The parameter a callable declares for a message of type T, when it can be
// named: the lone parameter of a function (pointer) or of a non-template
// operator(), or of operator()<T> of a generic lambda (`auto m` gives T,
// `auto& m` T&, `const auto& m` const T&); void when it cannot be named
// (overload sets, several parameters).
template <class Sig> struct message_param { using type = void; };
template <class R, class A> struct message_param<R (*)(A)> { using type = A; };
template <class R, class A> struct message_param<R (*)(A) noexcept> { using type = A; };
template <class R, class C, class A> struct message_param<R (C::*)(A)> { using type = A; };
template <class R, class C, class A> struct message_param<R (C::*)(A) const> { using type = A; };
template <class R, class C, class A> struct message_param<R (C::*)(A) noexcept> { using type = A; };
template <class R, class C, class A> struct message_param<R (C::*)(A) const noexcept> { using type = A; };

template <class F, class T>
struct declared_param { using type = void; };
template <class F, class T>
  requires std::is_pointer_v<F> || std::is_member_function_pointer_v<F>
struct declared_param<F, T> { using type = typename message_param<F>::type; };
template <class F, class T>
  requires requires { &F::operator(); }
struct declared_param<F, T> { using type = typename message_param<decltype(&F::operator())>::type; };
template <class F, class T>
  requires(!requires { &F::operator(); }) && requires { &F::template operator()<T>; }
struct declared_param<F, T> {
  using type = typename message_param<decltype(&F::template operator()<T>)>::type;
};

// True when fn takes the message by value (a parameter of object type): the
// pipeline then moves its message in, since an lvalue would be copied into
// the parameter and the copy is all the function ever sees.
template <class F, class T>
inline constexpr bool takes_by_value = std::is_object_v<typename declared_param<F, T>::type> &&
                                       std::is_invocable_v<F&, T&&>;

// Whether fn is called with the message as an lvalue: when it accepts one
// by reference (so that the message survives an exception and reaches the
// error handler whole); by value or T&& it gets an rvalue (moved, never
// copied), and the handler sees what the function left behind.
template <class F, class T>
inline constexpr bool passes_lvalue = std::is_invocable_v<F&, T&> && !takes_by_value<F, T>;

// Calls fn with the message as passes_lvalue says.
template <class F, class T>
decltype(auto) call_with(F& fn, T& msg) {
  if constexpr (passes_lvalue<F, T>) return fn(msg);
  else return fn(std::move(msg));
}

template <class F, class T>
using call_result_t = typename std::conditional_t<passes_lvalue<F, T>,
                                                  std::invoke_result<F&, T&>,
                                                  std::invoke_result<F&, T&&>>::type;

// Destroys v[from..] with fate `f` (the messages counted as discarded or
// failed); the rest of v is left to the caller.
template <class T>
void drop_tail(std::vector<T>& v, std::size_t from, message_fate f) noexcept {
  if constexpr (!std::is_trivially_destructible_v<T>) {  // else no destructor to tell
    if (from >= v.size()) return;
    const message_fate_scope scope(f);
    while (v.size() > from) v.pop_back();  // pop_back: T need not be assignable
  }
}

// Destroys the value held in `msg` now, with fate `f`, leaving a moved-from
// husk for the buffer to destroy later.
template <class T>
void drop_one(T& msg, message_fate f) noexcept {
  if constexpr (!std::is_trivially_destructible_v<T>) {  // else no destructor to tell
    const message_fate_scope scope(f);
    [[maybe_unused]] T gone(std::move(msg));
  }
}

template <class R> struct unwrap_optional { using type = R; static constexpr bool filters = false; };
template <class R> struct unwrap_optional<std::optional<R>> { using type = R; static constexpr bool filters = true; };

// Lanes run at most this many batches per activation before yielding.
inline constexpr int rounds_per_activation = 4;

// Fused activations nest (a fused lane may fuse its own downstream); beyond
// this depth a lane is posted as usual, so that a long chain of serial
// stages cannot grow a worker's stack without bound.
inline constexpr int max_fused_depth = 8;

// Depth of fused activations running on this thread.
inline thread_local int fused_depth = 0;

// How push_buffer ended.
enum class push_end {
  sent,     // everything was accepted
  parked,   // the output is full and `self` is parked on it: the caller must
            // return without touching the lane's state again
  stopped,  // cancelled, or the output was closed by its receivers: the
            // rest was counted as discarded and destroyed
};

// The send-and-park loop of every node: pushes buf[pos..] into the port's
// channel (one claim and one wake-up a call), parking `self` when it is full.
// Except when parked, buf is left empty and pos 0. With a `fuse` lane (a
// lane reading the port's channel), runs it in this task when it was parked
// on the channel (header comment: fusion).
template <class U>
push_end push_buffer(node_base& node, output_port<U>& port, std::vector<U>& buf, std::size_t& pos, lane& self,
                     lane* fuse) noexcept {
  pipeline_state& st = node.st;
  auto& och = *port.ch;
  lane* target = fused_depth < max_fused_depth ? fuse : nullptr;
  // Relaxed: a hint that saves the list's lock when the lane is surely not
  // parked; unpark() decides under that lock.
  const bool owned = target != nullptr && target->owner_.load(std::memory_order_relaxed) != nullptr &&
                     och.unpark(*target);
  push_end end = push_end::sent;
  while (pos < buf.size()) {
    const std::size_t left = buf.size() - pos;
    std::optional<std::size_t> k;
    if (!st.cancelled()) k = och.try_send_n(buf.begin() + static_cast<std::ptrdiff_t>(pos), left);
    if (!k) {
      // Cancelled, or a .to() channel closed by its receivers: nobody will
      // take more.
      node.discarded.add(left);
      drop_tail(buf, pos, message_fate::discarded);
      if (!st.cancelled()) st.cancel();
      end = push_end::stopped;
      break;
    }
    node.out.add(*k);
    pos += *k;
    if (*k == left) break;
    if (och.park_sender(self, [&st]() noexcept { return st.cancelled(); })) {
      end = push_end::parked;
      break;
    }
    // Space appeared (or cancel) right away: retry.
  }
  if (end != push_end::parked) {
    buf.clear();
    pos = 0;
  }
  if (owned) {
    if (end == push_end::sent) {
      port.downstream_node->fused.add(1);
      ++fused_depth;
      target->run();
      --fused_depth;
    } else {
      st.resume(target);  // it must see what it holds, or the cancel
    }
  }
  return end;
}

// ---- the source's adaptive fusion ------------------------------------------------

// Which schedule a source on a multi-worker pool gives the node after it:
//   split  every batch goes through the channel to the downstream lanes, run
//          as tasks of their own on whichever worker takes them;
//   fused  the source runs the downstream node's first lane (and, through
//          it, the serial chain fused after that) in its own task right after
//          pushing each batch, and holds the other lanes (taken off the
//          channel's waiter list, so the sends wake nobody), so no message
//          crosses to another core.
// Splitting pays only when what it takes off the source's core, the
// downstream's cost a message d, exceeds what a hop adds to it h (handing
// the message to another core: its cache lines travel, the channel's indices
// bounce, wake-ups); fused, a message costs the source's core g + d, split
// g + h, or d' (the downstream with its side of the hop) when that is slower.
// The source measures both directly, as the wall time a message of each
// schedule over a window of at least window_ns (generation, pushes, the
// inline run, waits on a full output: all of it), and splits only when split
// measured at least 1/8 faster than fused (ties go to fused, which leaves the
// other cores to other work). It runs split for the first window, probes
// fused for the next and keeps the faster; then the other schedule is probed
// again for one window after `interval` windows of the chosen one. The
// interval doubles up to max_interval while probes confirm the choice and
// falls to min_interval when one changes it, so a workload that grows heavier
// spreads again within about max_interval windows (and a probe costs at most
// one window in max_interval).
class fusion_schedule {
 public:
  using clock = std::chrono::steady_clock;
  static constexpr std::int64_t window_ns = 500'000;
  static constexpr unsigned samples = 3;  // windows a schedule is judged by (the fastest)
  static constexpr unsigned min_interval = 8, max_interval = 256;

  bool fused() const noexcept { return fused_; }

  // After each batch the source generated (n messages); may switch schedules.
  void account(std::size_t n) noexcept { account(n, clock::now()); }
  // The same at a given time (the rule alone, for a test's own clock).
  void account(std::size_t n, clock::time_point now) noexcept {
    if (msgs_ == 0 && start_ == clock::time_point{}) start_ = now;
    msgs_ += n;
    const std::int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(now - start_).count();
    if (ns < window_ns || msgs_ == 0) return;
    // The fastest of the schedule's last `samples` windows: a window that
    // lost the CPU to another process (a shared machine) says nothing of
    // the schedule.
    const double t = static_cast<double>(ns) / static_cast<double>(msgs_);
    double& best = best_[fused_ ? 1 : 0];
    best = seen_ == 0 ? t : std::min(best, t);
    ++seen_;
    start_ = now;
    msgs_ = 0;
    if (seen_ < samples) return;
    seen_ = 0;
    if (probing_) {
      probing_ = false;
      const bool before = !fused_;  // the schedule the probe interrupted
      fused_ = !(best_[0] * 8 < best_[1] * 7);  // split only when >= 1/8 faster
      interval_ = fused_ == before ? std::min(interval_ * 2, max_interval) : min_interval;
      left_ = interval_;
    } else if (left_ <= samples) {
      // The last `samples` windows of the schedule in use were just
      // measured: probe the other one.
      probing_ = true;
      fused_ = !fused_;
    } else {
      left_ -= samples;
    }
  }

 private:
  bool fused_ = false;
  bool probing_ = false;
  unsigned interval_ = min_interval / 2;  // the first decision doubles it
  unsigned left_ = samples;               // windows of the schedule in use before the next probe
  unsigned seen_ = 0;                     // windows measured towards the current sample
  clock::time_point start_{};             // of the current window
  std::uint64_t msgs_ = 0;                // generated in the current window
  double best_[2] = {0, 0};               // latest sample of split [0] and fused [1], ns a message
};

// ---- source ------------------------------------------------------------------

template <class T, class Gen>
class source_node final : public node_base {
 public:
  source_node(pipeline_state& s, Gen g, const stage_options& o)
      : node_base(s, o.name.empty() ? "source" : o.name, 1), gen_(std::move(g)), batch_(o.batch) {
    out_port.capacity_hint = o.capacity;
    buf_.reserve(batch_);
    lane_.owner = this;
    lane_.st = &s;
  }

  void start() override {
    held_.reserve(out_port.downstream_lanes.size());
    st.yield(&lane_);
  }
  void on_cancel() noexcept override {
    out_port.close_if_internal();  // wakes the lane if it is parked on it
    if (out_port.ch->unpark(lane_)) st.resume(&lane_);
  }
  std::size_t queue_depth() const noexcept override { return 0; }

  output_port<T> out_port;

 private:
  struct source_lane final : lane {
    source_node* owner = nullptr;
    void run() noexcept override { owner->activate(); }
  };

  void activate() noexcept {
    auto& och = *out_port.ch;
    // A one-worker pool always fuses: no other core could run the
    // downstream lanes meanwhile (fusion_schedule).
    const bool adaptive = st.pool.size() > 1;
    for (int round = 0; round < rounds_per_activation; ++round) {
      if (st.cancelled()) return finish();
      // 1. Push what we hold (one claim and one wake-up for the batch).
      const bool fuse = !adaptive || schedule_.fused();
      if (!fuse) release_held();
      switch (push_buffer(*this, out_port, buf_, pos_, lane_, fuse ? hold_downstream() : nullptr)) {
        case push_end::parked: return;
        case push_end::stopped: return finish();
        case push_end::sent: break;
      }
      if (ended_) return finish();
      // 2. Generate no more than the output has room for, so the generator
      // is not called while the output is full.
      const std::size_t cap = och.capacity(), size = och.size_approx();
      const std::size_t room = std::min(size < cap ? cap - size : 0, batch_);
      if (room == 0) {
        if (och.park_sender(lane_, [this]() noexcept { return st.cancelled(); })) return;
        continue;
      }
      if (fuse && size >= batch_) {
        // Fused, the downstream lane was busy elsewhere (not run here): let
        // it catch up rather than queue more, which its held siblings cannot
        // take and which would leave this task generating alone.
        st.yield(&lane_);
        return;
      }
      for (std::size_t i = 0; i < room; ++i) {
        try {
          std::optional<T> v = gen_();
          if (!v) {
            ended_ = true;
            break;
          }
          buf_.push_back(std::move(*v));  // within the reserved capacity
        } catch (...) {
          st.report<T>(*this, std::current_exception(), nullptr);
          if (st.cancelled()) break;
        }
      }
      in.add(buf_.size());
      if (adaptive) schedule_.account(buf_.size());
    }
    st.yield(&lane_);
  }

  // Fused schedule: takes the downstream lanes after the first off the
  // channel's waiter list when they park there (they hold nothing then: a
  // lane flushes its results before it waits for input), so that our sends
  // wake none of them; returns the lane to run in our task.
  lane* hold_downstream() noexcept {
    auto& lanes = out_port.downstream_lanes;
    if (lanes.empty()) return out_port.downstream;
    for (std::size_t i = 1; i < lanes.size(); ++i) {
      lane* l = lanes[i];
      // Relaxed: a hint that saves the list's lock when the lane is surely
      // not parked; unpark() decides under that lock.
      if (l->owner_.load(std::memory_order_relaxed) != nullptr && out_port.ch->unpark(*l)) held_.push_back(l);
    }
    return lanes.front();
  }

  // We own the held lanes' activations (unpark succeeded): schedule them,
  // as the channel's wake-up would have.
  void release_held() noexcept {
    for (lane* l : held_) st.resume(l);
    held_.clear();
  }

  void finish() noexcept {
    RUNNEL_ASSERT(pos_ <= buf_.size(), "the source's accepted prefix lies within its buffer");
    discarded.add(buf_.size() - pos_);
    drop_tail(buf_, pos_, message_fate::discarded);
    buf_.clear();
    pos_ = 0;
    out_port.finish();
    release_held();  // after the close: they see it and finish
    st.node_done();
  }

  Gen gen_;
  std::size_t batch_;
  std::vector<T> buf_;  // produced, buf_[pos_..] not yet accepted by the output
  std::size_t pos_ = 0;
  bool ended_ = false;  // the generator returned nullopt
  fusion_schedule schedule_;
  std::vector<lane*> held_;  // downstream lanes whose activation we hold (fused)
  source_lane lane_;
};

// ---- stage / sink ----------------------------------------------------------------

// U = void: a sink (the function's result is ignored, a message that did not
// throw counts as delivered).
template <class T, class U, class F>
class stage_node final : public node_base {
  static constexpr bool is_sink = std::is_void_v<U>;
  using R = call_result_t<F, T>;
  static constexpr bool filters = !is_sink && unwrap_optional<R>::filters;
  using out_t = std::conditional_t<is_sink, char, U>;  // placeholder for sinks

 public:
  stage_node(pipeline_state& s, F f, const stage_options& o, input_port<T> in_port, std::size_t idx)
      : node_base(s, o.name.empty() ? (is_sink ? "sink" : "stage " + std::to_string(idx)) : o.name,
                  o.workers),
        fn_(std::move(f)),
        batch_(o.batch),
        ordered_(!is_sink && o.ordered && o.workers > 1),
        in_(std::move(in_port)) {
    if constexpr (!is_sink) out_port.capacity_hint = o.capacity;
    lanes_.reserve(workers);
    for (std::size_t i = 0; i < workers; ++i) {
      auto l = std::make_unique<stage_lane>();
      l->owner = this;
      l->st = &s;
      l->inbuf.reserve(batch_);
      lanes_.push_back(std::move(l));
    }
    if (ordered_) {
      window_size_ = round_up_pow2(std::max<std::size_t>(2 * workers * batch_, 2));
      slots_.resize(window_size_);
      emitter_.owner = this;
      emitter_.st = &s;
    }
  }

  void start() override {
    for (auto& l : lanes_) st.yield(l.get());
  }

  void on_cancel() noexcept override {
    if constexpr (!is_sink) out_port.close_if_internal();
    // Lanes parked on a channel that close() did not reach (a .from() or
    // .to() channel of the user), or on the reorder window.
    for (auto& l : lanes_) take_back(*l);
    if (ordered_) {
      std::vector<lane*> waiters;
      {
        std::lock_guard lock(wm_);
        waiters.swap(window_waiters_);
      }
      for (lane* l : waiters) st.resume(l);
      if constexpr (!is_sink) {
        if (out_port.ch->unpark(emitter_)) st.resume(&emitter_);
      }
    }
  }

  std::size_t queue_depth() const noexcept override { return in_.ch->size_approx(); }

  // The lane an upstream stage may run in its own task (fusion): the only
  // one of a serial node, else null.
  lane* fusable_lane() noexcept { return workers == 1 ? lanes_.front().get() : nullptr; }
  // Every lane, for a source's adaptive fusion (the first is the one it runs).
  std::vector<lane*> source_fusable_lanes() {
    std::vector<lane*> v;
    for (auto& l : lanes_) v.push_back(l.get());
    return v;
  }

  std::conditional_t<is_sink, char, output_port<out_t>> out_port{};

 private:
  struct stage_lane final : lane {
    stage_node* owner = nullptr;
    std::vector<T> inbuf;           // the batch being processed
    std::vector<out_t> outbuf;      // results not yet accepted by the output
    std::size_t out_pos = 0;        // outbuf[out_pos..] still to push
    std::vector<std::optional<out_t>> results;  // ordered: one per message
    void run() noexcept override { owner->activate(*this); }
  };
  struct emitter_lane final : lane {
    stage_node* owner = nullptr;
    void run() noexcept override { owner->emit(); }
  };

  void take_back(lane& l) noexcept {
    if (in_.ch->unpark(l)) {
      st.resume(&l);
      return;
    }
    if constexpr (!is_sink) {
      if (out_port.ch->unpark(l)) st.resume(&l);
    }
  }

  auto cancelled_fn() {
    return [this]() noexcept { return st.cancelled(); };
  }

  // One activation of a lane.
  void activate(stage_lane& l) noexcept {
    auto& inch = *in_.ch;
    for (int round = 0; round < rounds_per_activation; ++round) {
      if constexpr (!is_sink) {
        if (!flush(l)) return;  // parked on the output
      }
      std::size_t seq0 = 0;
      std::optional<std::size_t> got;
      const auto take = [&l](T&& v) noexcept { l.inbuf.push_back(std::move(v)); };
      if (st.cancelled()) {
        // Stop taking from a user's channel; drain an internal one (it is
        // closed) so that everything in it is counted.
        if (in_.is_external) return lane_finished(l);
        got = inch.try_recv_n(take, batch_);
        if (got) {
          in.add(*got);
          discarded.add(*got);
          drop_tail(l.inbuf, 0, message_fate::discarded);
          if (*got != 0) continue;
        }
      } else if (ordered_) {
        std::unique_lock lock(wm_);
        const std::size_t room = window_size_ - (next_seq_ - base_);
        if (room == 0) {
          // Too far ahead of the oldest unemitted message: park on the
          // window; the emitter resumes us when it advances (or cancel()).
          if (st.cancelled()) continue;
          window_waiters_.push_back(&l);
          return;
        }
        got = inch.try_recv_n(take, std::min(batch_, room));
        seq0 = next_seq_;
        if (got) next_seq_ += *got;
      } else {
        got = inch.try_recv_n(take, batch_);
      }
      if (!got) return lane_finished(l);
      if (*got == 0) {
        if (inch.park_receiver(l, cancelled_fn())) return;
        continue;  // data, close or cancel arrived while parking: retry
      }
      in.add(*got);
      process(l, seq0);
    }
    // Pass the last batch's results on before yielding, not when the lane
    // next runs (behind other tasks).
    if constexpr (!is_sink) {
      if (!flush(l)) return;  // parked on the output
    }
    st.yield(&l);
  }

  // Runs the function over l.inbuf; results go to l.outbuf (unordered) or the
  // reorder window (ordered).
  void process(stage_lane& l, std::size_t seq0) noexcept {
    std::uint64_t n_out = 0, n_filtered = 0, n_failed = 0, n_discarded = 0;
    if (ordered_) l.results.clear();
    for (std::size_t i = 0; i < l.inbuf.size(); ++i) {
      T& msg = l.inbuf[i];
      std::optional<out_t> res;
      if (st.cancelled()) {
        ++n_discarded;
        drop_one(msg, message_fate::discarded);
      } else {
        try {
          if constexpr (is_sink) {
            call_with(fn_, msg);
            ++n_out;
          } else if constexpr (filters) {
            R r = call_with(fn_, msg);
            if (r) res.emplace(std::move(*r)); else ++n_filtered;
          } else {
            res.emplace(call_with(fn_, msg));
          }
        } catch (...) {
          ++n_failed;
          st.report(*this, std::current_exception(), &msg);
          // After the handler saw it (a by-reference function left it whole).
          drop_one(msg, message_fate::failed);
        }
      }
      if constexpr (!is_sink) {
        if (ordered_) l.results.push_back(std::move(res));
        else if (res) l.outbuf.push_back(std::move(*res));
      }
    }
    l.inbuf.clear();
    if constexpr (is_sink) out.add(n_out);
    filtered.add(n_filtered);
    failed.add(n_failed);
    discarded.add(n_discarded);
    if constexpr (!is_sink) {
      if (ordered_) insert_results(l, seq0);
    }
  }

  // Pushes l.outbuf; false when the lane parked on a full output.
  bool flush(stage_lane& l) noexcept {
    if constexpr (!is_sink) {
      if (l.outbuf.empty()) return true;
      return push_buffer(*this, out_port, l.outbuf, l.out_pos, l, out_port.downstream) != push_end::parked;
    }
    return true;
  }

  void lane_finished(stage_lane& l) noexcept {
    (void)l;
    if (ordered_) {
      bool complete = false;
      {
        std::lock_guard lock(wm_);
        RUNNEL_ASSERT(lanes_done_ < workers, "each lane finishes once");
        ++lanes_done_;
        complete = lanes_done_ == workers && !emitting_ && base_ == next_seq_;
        if (complete) emitting_ = true;  // nobody may emit any more
      }
      if (complete) node_complete();
      return;
    }
    const std::size_t done_before = lanes_done_atomic_.fetch_add(1);
    RUNNEL_ASSERT(done_before < workers, "each lane finishes once");
    if (done_before + 1 == workers) node_complete();
  }

  void node_complete() noexcept {
    // Every lane has finished (and the emitter, if any, is done): whatever
    // the node took in has been sent on, filtered, failed or discarded. The
    // lanes' relaxed counts are ordered before this by the completion
    // handshake (the last lane's RMW on the lanes count, or wm_).
    RUNNEL_ASSERT(in.get() == out.get() + filtered.get() + failed.get() + discarded.get(),
                  "a completed node accounts for every message it took: in == out + filtered + failed + discarded");
    if constexpr (!is_sink) out_port.finish();
    in_.external.reset();
    st.node_done();
  }

  // ---- ordered: reorder window -----------------------------------------------

  void insert_results(stage_lane& l, std::size_t seq0) noexcept {
    bool become_emitter = false;
    {
      std::lock_guard lock(wm_);
      RUNNEL_ASSERT(seq0 + l.results.size() - base_ <= window_size_, "results fall inside the reorder window");
      for (std::size_t i = 0; i < l.results.size(); ++i) {
        slot& s = slots_[(seq0 + i) & (window_size_ - 1)];
        RUNNEL_ASSERT(!s.ready, "each sequence number's slot is filled once before it is emitted");
        s.value = std::move(l.results[i]);
        s.ready = true;
      }
      if (!emitting_ && slots_[base_ & (window_size_ - 1)].ready) {
        emitting_ = true;
        become_emitter = true;
      }
    }
    l.results.clear();
    if (become_emitter) emit();
  }

  // Runs with the emitter token held.
  void emit() noexcept {
    if constexpr (!is_sink) {
      for (int round = 0; round < rounds_per_activation; ++round) {
        // 1. push what we already took from the window
        if (!ebuf_.empty() &&
            push_buffer(*this, out_port, ebuf_, epos_, emitter_, out_port.downstream) == push_end::parked)
          return;  // token stays with us
        // 2. take the next contiguous ready run from the window
        std::vector<lane*> waiters;
        bool complete = false, idle = false;
        {
          std::lock_guard lock(wm_);
          RUNNEL_ASSERT(emitting_, "emit() runs with the emitter token held");
          std::size_t taken = 0;
          while (taken < batch_ && base_ != next_seq_) {
            slot& s = slots_[base_ & (window_size_ - 1)];
            if (!s.ready) break;
            if (s.value) ebuf_.push_back(std::move(*s.value));
            s.value.reset();
            s.ready = false;
            ++base_;
            ++taken;
          }
          if (taken != 0) waiters.swap(window_waiters_);
          if (ebuf_.empty() && taken == 0) {
            idle = true;
            if (lanes_done_ == workers && base_ == next_seq_) complete = true;  // keep the token
            else emitting_ = false;
          }
        }
        for (lane* w : waiters) st.resume(w);
        if (complete) return node_complete();
        if (idle) return;
      }
      st.yield(&emitter_);
    }
  }

  struct slot {
    std::optional<out_t> value;
    bool ready = false;
  };

  F fn_;
  std::size_t batch_;
  bool ordered_;
  input_port<T> in_;
  std::vector<std::unique_ptr<stage_lane>> lanes_;
  std::atomic<std::size_t> lanes_done_atomic_{0};  // unordered nodes

  // Ordered nodes: everything below is guarded by wm_, except ebuf_/epos_,
  // which belong to whoever holds the emitter token.
  std::mutex wm_;
  std::size_t window_size_ = 0;
  std::vector<slot> slots_;
  std::size_t base_ = 0;       // oldest sequence number not yet emitted
  std::size_t next_seq_ = 0;   // next sequence number to hand out
  std::size_t lanes_done_ = 0;
  bool emitting_ = false;      // the emitter token is taken
  std::vector<lane*> window_waiters_;
  emitter_lane emitter_;
  std::vector<out_t> ebuf_;
  std::size_t epos_ = 0;
};

}  // namespace runnel::detail
