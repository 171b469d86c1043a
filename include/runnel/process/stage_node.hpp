// The pipeline node behind runnel::process_stage(pool): a stage whose
// function runs in a process pool's workers, without a pool thread waiting
// for any reply.
//
// Two lanes, each a resumable pool task like every other node's:
//   submitter  takes messages from the input channel and submit()s each to
//              the process pool, keeping the message in a slot of its own
//              (for the error handler); at most max_inflight slots are in
//              use, so the node's memory is bounded. With every slot taken
//              it parks on the slots (submit_waiting_) until the emitter
//              frees some.
//   emitter    the process pool's supervisor thread, in the submit()
//              callback, stores the result in the message's slot and pushes
//              the slot onto a lock-free stack (done_); the push that finds
//              the emitter idle schedules it. The emitter takes the whole
//              stack at once, passes the replies to the output channel
//              (parking on it when full, like any lane), hands each failure
//              (process_crash, process_error) with its whole message to the
//              error handler, and only then frees the slots.
//
// done_ holds the stack's top slot + 1 (0: empty) in its low 32 bits and
// `scheduled` in bit 32: set by the push that schedules the emitter, cleared
// only by the emitter when it finds the stack empty (a compare-exchange, so a
// push in between keeps it running). So exactly one activation of the
// emitter exists while the bit is set, and the supervisor thread's last
// access to the node is its push (or the post that schedules the emitter,
// which cannot finish the node before it has run). The stack is push-only
// with take-all, so a reused slot index cannot confuse a push (no ABA): a
// push links its slot to whatever top it replaces.
//
// The end. The node is complete when the input is closed and drained and
// every slot is free again (every reply passed on or reported): whichever of
// the two lanes makes that true, under fm_, finishes the node. A cancelled
// run stops taking input; replies of messages already submitted still
// arrive (the process pool cannot take a message back) and are counted as
// discarded, so the run ends when they have.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../pipeline/nodes.hpp"

namespace runnel {

template <class Pool>
struct process_stage_t;
template <class Out>
struct process_result;

namespace detail {

template <class T, class Pool>
class process_stage_node final : public node_base {
  using U = typename Pool::out_type;
  static_assert(std::is_same_v<T, typename Pool::in_type>,
                "runnel::process_stage: the node before it must send the process pool's request type In");

 public:
  using out_type = U;

  process_stage_node(pipeline_state& s, process_stage_t<Pool> f, const stage_options& o, input_port<T> in_port,
                     std::size_t idx)
      : node_base(s, o.name.empty() ? "process stage " + std::to_string(idx) : o.name, 1),
        pool_(*f.pool),
        batch_(o.batch),
        in_(std::move(in_port)),
        slots_(f.inflight_limit()) {
    if (o.ordered) throw std::invalid_argument("runnel::process_stage: ordered = true is not supported");
    out_port.capacity_hint = o.capacity;
    free_.reserve(slots_.size());
    for (std::size_t i = slots_.size(); i-- > 0;) free_.push_back(static_cast<std::uint32_t>(i));
    ids_.reserve(slots_.size());
    taken_.reserve(slots_.size());
    to_free_.reserve(slots_.size());
    inbuf_.reserve(batch_);
    submitter_.owner = this;
    submitter_.st = &s;
    emitter_.owner = this;
    emitter_.st = &s;
  }

  void start() override { st.yield(&submitter_); }

  void on_cancel() noexcept override {
    out_port.close_if_internal();
    if (in_.ch->unpark(submitter_)) st.resume(&submitter_);
    bool resume = false;
    {
      std::lock_guard lk(fm_);
      resume = std::exchange(submit_waiting_, false);
    }
    if (resume) st.resume(&submitter_);
    if (out_port.ch->unpark(emitter_)) st.resume(&emitter_);
  }

  std::size_t queue_depth() const noexcept override { return in_.ch->size_approx(); }

  // Not run in an upstream lane's task (fusion): its lanes are not a plain
  // serial stage's.
  lane* fusable_lane() noexcept { return nullptr; }

  output_port<U> out_port;

 private:
  struct slot {
    std::optional<T> msg;        // the message, kept for the error handler
    std::optional<U> value;      // its reply
    std::exception_ptr error;    // or its failure
    std::uint32_t next = 0;      // done_ stack: the slot below + 1 (0: none)
  };
  struct submit_lane final : lane {
    process_stage_node* owner = nullptr;
    void run() noexcept override { owner->submit_activate(); }
  };
  struct emit_lane final : lane {
    process_stage_node* owner = nullptr;
    void run() noexcept override { owner->emit(); }
  };

  static constexpr std::uint64_t scheduled = std::uint64_t{1} << 32;
  static constexpr std::uint64_t top_mask = scheduled - 1;

  // ---- submitter ------------------------------------------------------------

  void submit_activate() noexcept {
    auto& inch = *in_.ch;
    const auto take = [this](T&& v) noexcept { inbuf_.push_back(std::move(v)); };
    for (int round = 0; round < rounds_per_activation; ++round) {
      std::optional<std::size_t> got;
      if (st.cancelled()) {
        // As a stage lane: stop taking from a user's channel, drain an
        // internal one (closed by the cancel) so that all of it is counted.
        if (in_.is_external) return submit_finished();
        got = inch.try_recv_n(take, batch_);
        if (got) {
          in.add(*got);
          discarded.add(*got);
          drop_tail(inbuf_, 0, message_fate::discarded);
          inbuf_.clear();
          if (*got != 0) continue;
        }
      } else {
        std::size_t room = 0;
        {
          std::lock_guard lk(fm_);
          room = free_.size();
          if (room == 0 && !st.cancelled()) {
            submit_waiting_ = true;  // the emitter (or cancel) resumes us
            return;
          }
        }
        if (room == 0) continue;  // cancelled meanwhile
        got = inch.try_recv_n(take, std::min(batch_, room));
      }
      if (!got) return submit_finished();
      if (*got == 0) {
        if (inch.park_receiver(submitter_, [this]() noexcept { return st.cancelled(); })) return;
        continue;  // data, close or cancel arrived while parking: retry
      }
      in.add(*got);
      submit_batch();
    }
    st.yield(&submitter_);
  }

  // Submits inbuf_ (no longer than the free slots).
  void submit_batch() noexcept {
    std::vector<std::uint32_t>& ids = ids_;
    {
      std::lock_guard lk(fm_);
      RUNNEL_ASSERT(inbuf_.size() <= free_.size(), "the submitter takes no more messages than free slots");
      for (std::size_t i = 0; i < inbuf_.size(); ++i) {
        ids.push_back(free_.back());
        free_.pop_back();
      }
      inflight_ += inbuf_.size();
    }
    std::size_t given_back = 0;
    for (std::size_t i = 0; i < inbuf_.size(); ++i) {
      const std::uint32_t id = ids[i];
      slot& sl = slots_[id];
      sl.msg.emplace(std::move(inbuf_[i]));
      if (st.cancelled()) {
        discarded.add(1);
      } else {
        try {
          // The callback captures 16 trivially copyable bytes: std::function
          // keeps them without allocating.
          pool_.submit(*sl.msg, [this, id](process_result<U>&& r) { on_result(id, std::move(r)); });
          continue;
        } catch (...) {  // stopped pool, too large a message, dead launcher
          failed.add(1);
          st.report(*this, std::current_exception(), &*sl.msg);
          const message_fate_scope fate(message_fate::failed);
          sl.msg.reset();
        }
      }
      if (sl.msg) {
        const message_fate_scope fate(message_fate::discarded);
        sl.msg.reset();
      }
      ids[given_back++] = id;  // never submitted: the slot is free again
    }
    inbuf_.clear();
    if (given_back != 0) {
      std::lock_guard lk(fm_);
      free_.insert(free_.end(), ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(given_back));
      inflight_ -= given_back;  // the submitter is not finished, so the node cannot be complete
    }
    ids.clear();
  }

  void submit_finished() noexcept {
    bool complete = false;
    {
      std::lock_guard lk(fm_);
      input_done_ = true;
      complete = inflight_ == 0;
    }
    if (complete) node_complete();
  }

  // ---- completions (the process pool's supervisor thread) -----------------

  void on_result(std::uint32_t id, process_result<U>&& r) noexcept {
    slot& sl = slots_[id];
    if (r.error) sl.error = std::move(r.error);
    else sl.value = std::move(r.value);
    // relaxed: only a first guess; the compare-exchange checks it.
    std::uint64_t old = done_.load(std::memory_order_relaxed);
    do {
      sl.next = static_cast<std::uint32_t>(old & top_mask);
      // release: the slot's result and link before the emitter's acquire
      // exchange; acquire: the emitter's last activation (its idle store)
      // before the one this push may schedule.
    } while (!done_.compare_exchange_weak(old, (std::uint64_t{id} + 1) | scheduled, std::memory_order_acq_rel,
                                          std::memory_order_relaxed));
    if ((old & scheduled) == 0) st.resume(&emitter_);
  }

  // ---- emitter -----------------------------------------------------------------

  void emit() noexcept {
    for (int round = 0; round < rounds_per_activation; ++round) {
      if (!outbuf_.empty() && push_buffer(*this, out_port, outbuf_, out_pos_, emitter_, nullptr) == push_end::parked)
        return;  // resumed when the output has room (scheduled stays set)
      if (!to_free_.empty() && release_slots()) return node_complete();
      // acquire: the pushed slots' results (the pushes' release).
      const std::uint64_t word = done_.exchange(scheduled, std::memory_order_acquire);
      std::uint32_t top = static_cast<std::uint32_t>(word & top_mask);
      if (top == 0) {
        std::uint64_t expect = scheduled;
        // release: this activation's work before the next one, which the
        // push that finds the bit clear schedules (its acquire).
        if (done_.compare_exchange_strong(expect, 0, std::memory_order_release, std::memory_order_relaxed))
          return;  // idle; the last access to the node
        continue;  // a push came in between
      }
      taken_.clear();
      for (; top != 0; top = slots_[top - 1].next) taken_.push_back(top - 1);
      std::reverse(taken_.begin(), taken_.end());  // the stack is newest first
      for (const std::uint32_t id : taken_) settle(id);
    }
    st.yield(&emitter_);
  }

  // A completed slot: its reply goes to outbuf_, its failure to the handler.
  void settle(std::uint32_t id) noexcept {
    slot& sl = slots_[id];
    if (st.cancelled()) {
      discarded.add(1);
      const message_fate_scope fate(message_fate::discarded);
      sl.msg.reset();
    } else if (sl.error) {
      failed.add(1);
      st.report(*this, sl.error, &*sl.msg);
      const message_fate_scope fate(message_fate::failed);
      sl.msg.reset();
    } else {
      outbuf_.push_back(std::move(*sl.value));  // push_buffer counts it out
      sl.msg.reset();
    }
    sl.value.reset();
    sl.error = nullptr;
    to_free_.push_back(id);
  }

  // Frees the slots whose results have left; true when that completes the
  // node (input done, nothing in flight).
  bool release_slots() noexcept {
    bool resume = false, complete = false;
    {
      std::lock_guard lk(fm_);
      free_.insert(free_.end(), to_free_.begin(), to_free_.end());
      inflight_ -= to_free_.size();
      resume = std::exchange(submit_waiting_, false);
      complete = input_done_ && inflight_ == 0;
    }
    to_free_.clear();
    if (resume) st.resume(&submitter_);
    return complete;
  }

  void node_complete() noexcept {
    RUNNEL_ASSERT(in.get() == out.get() + failed.get() + discarded.get(),
                  "a completed process stage accounts for every message: in == out + failed + discarded");
    out_port.finish();
    in_.external.reset();
    st.node_done();
  }

  Pool& pool_;
  std::size_t batch_;
  input_port<T> in_;
  std::vector<slot> slots_;

  std::mutex fm_;
  std::vector<std::uint32_t> free_;  // guarded by fm_: slots not in flight
  std::size_t inflight_ = 0;         // guarded by fm_: slots taken, not yet freed
  bool submit_waiting_ = false;      // guarded by fm_: the submitter parked on the slots
  bool input_done_ = false;          // guarded by fm_: the submitter finished

  // Top of the stack of completed slots + 1, and `scheduled` (header comment).
  std::atomic<std::uint64_t> done_{0};

  submit_lane submitter_;
  std::vector<T> inbuf_;               // submitter only
  std::vector<std::uint32_t> ids_;     // submitter only: submit_batch's slots
  emit_lane emitter_;
  std::vector<U> outbuf_;              // emitter only: replies not yet accepted by the output
  std::size_t out_pos_ = 0;
  std::vector<std::uint32_t> taken_;    // emitter only: the slots taken off the stack
  std::vector<std::uint32_t> to_free_;  // emitter only: settled slots, freed once outbuf_ is out
};

}  // namespace detail
}  // namespace runnel
