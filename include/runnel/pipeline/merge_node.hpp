// The node behind runnel::pipeline::from_merged: the first node of a
// pipeline fed by several channels of one type, taking from whichever is
// ready, in fair turns, without ever blocking a worker.
//
// Turns. The inputs take turns in a fixed cyclic order. A turn takes up to
// `batch` messages from one input and ends early when that input is empty
// (or closed and drained, which retires it). So while several inputs are
// ready, each gets exactly `batch` messages a cycle: none is starved by
// another that is always ready, and per input the messages leave in the
// order they were sent (one lane takes them, and pushes them in the order
// taken). Like a source, the node takes no more than its output has room
// for (at most `batch` a round); a turn cut short by a full output goes on
// where it stopped.
//
// Parking on every input at once. A lane is one waker, and a waker sits in
// one list; so the node parks one waker per input (`input_waker`), like a
// thread in runnel::select, and an atomic word decides which wake-up may
// resume the lane:
//
//   word_ = armed (bit 0) | out[i] (bit i + 1, for input i)
//
//   out[i]  waker i is out of the lane's hands: registered in input i's
//           list, or taken by a notifier whose callback has not yet run.
//           Set by the lane before it registers waker i; cleared by the
//           lane when it takes the waker back, or by the callback.
//   armed   the lane is parked on its inputs and wants one resumption. Set
//           by the lane, last, when it parks; cleared by whoever resumes it:
//           a callback, cancel, or the lane itself when it changes its mind.
//
// A callback clears its out bit and the armed bit in one RMW, and resumes
// the lane only if armed was set: so exactly one party resumes it, and
// that RMW is the callback's last access to the node (the lane cannot
// finish, freeing the node, while any out bit is set). A notifier reads the
// waker's list link before calling the callback, so the lane may register
// waker i again as soon as out[i] is clear.
//
// Registrations outlive an activation: a waker left in a list while the
// lane runs again is harmless (its callback clears its bit, resumes
// nothing, armed being clear, and hands the wake on to the channel's next
// parked receiver, if the channel is readable, as select does) and covers
// that input at the next park. When
// parking, the lane registers every open input whose bit is clear (re-
// checking it, as park_receiver does), then sets armed. No wake-up is lost:
// a notify on input i after that RMW finds armed set and resumes the lane;
// one whose callback ran before it cleared out[i], which the lane sees in
// the value its own RMW returns, and then it disarms and looks again.
// Before the node finishes, it takes back every registered waker and waits,
// parked (armed), for the callbacks of those a notifier had taken.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../channel.hpp"
#include "nodes.hpp"

namespace runnel::detail {

// A word of out bits and the armed bit: at most this many inputs a node.
inline constexpr std::size_t max_merge_inputs = 63;

template <class T>
class merge_node final : public node_base {
 public:
  merge_node(pipeline_state& s, std::vector<receiver<T>> inputs, const stage_options& o)
      : node_base(s, o.name.empty() ? "merge" : o.name, 1),
        rx_(std::move(inputs)),
        batch_(o.batch),
        wakers_(std::make_unique<input_waker[]>(rx_.size())),
        ended_(rx_.size(), false),
        open_(rx_.size()) {
    out_port.capacity_hint = o.capacity;
    ch_.reserve(rx_.size());
    for (std::size_t i = 0; i < rx_.size(); ++i) {
      ch_.push_back(pipeline_access<T>::state(rx_[i]));
      wakers_[i].wake = &on_input_wake;
      wakers_[i].node = this;
      wakers_[i].ch = ch_[i].get();
      wakers_[i].bit = out_bit(i);
    }
    buf_.reserve(batch_);
    lane_.owner = this;
    lane_.st = &s;
  }

  void start() override { st.yield(&lane_); }

  void on_cancel() noexcept override {
    out_port.close_if_internal();  // wakes the lane if it is parked on it
    if (out_port.ch->unpark(lane_)) st.resume(&lane_);
    // Parked on the inputs: take the resumption from the callbacks.
    if (disarm()) st.resume(&lane_);
  }

  std::size_t queue_depth() const noexcept override {
    std::size_t n = 0;
    for (const auto& c : ch_) n += c->size_approx();
    return n;
  }

  output_port<T> out_port;

 private:
  struct merge_lane final : lane {
    merge_node* owner = nullptr;
    void run() noexcept override { owner->activate(); }
  };

  // One per input; registered in that input's list of parked receivers.
  struct input_waker : waker {
    merge_node* node = nullptr;
    channel_state<T>* ch = nullptr;  // the input's channel
    std::uint64_t bit = 0;           // out_bit(input)
  };

  static constexpr std::uint64_t armed_bit = 1;
  static std::uint64_t out_bit(std::size_t i) noexcept { return std::uint64_t{2} << i; }

  static void on_input_wake(waker* w) noexcept {
    auto* iw = static_cast<input_waker*>(w);
    // Read before the RMW: after it the lane may reuse iw.
    merge_node* n = iw->node;
    channel_state<T>* ch = iw->ch;
    // seq_cst RMW: the node's one arbiter of resumptions (header comment);
    // its place in word_'s order against the lane's arming decides who
    // resumes. After it, the node is touched only by a callback that took
    // the armed bit, which the lane then waits for.
    const std::uint64_t prev = n->word_.fetch_and(~(iw->bit | armed_bit));
    if ((prev & armed_bit) != 0) {
      n->st.resume(&n->lane_);
    } else {
      // Not parked on its inputs: the lane looks at this input anyway, but
      // another receiver of the channel (a thread, a select, a task) asleep
      // behind this stale registration may be the one this wake was for.
      // Hand it on, as select does; the notifier keeps the channel alive.
      ch->pass_on_receiver_wake();
    }
  }

  // Takes the armed bit back; true when it was still set (nobody else will
  // resume the lane: the caller owns its activation).
  bool disarm() noexcept {
    // seq_cst RMW: races with the callbacks' RMWs and cancel (header comment).
    return (word_.fetch_and(~armed_bit) & armed_bit) != 0;
  }

  void activate() noexcept {
    auto& och = *out_port.ch;
    for (int round = 0; round < rounds_per_activation; ++round) {
      if (st.cancelled()) return finish_cancelled();
      // 1. Push what we hold; a serial downstream node may run in this task.
      switch (push_buffer(*this, out_port, buf_, pos_, lane_, out_port.downstream)) {
        case push_end::parked: return;
        case push_end::stopped: return finish_cancelled();
        case push_end::sent: break;
      }
      if (open_ == 0) return finish_when_quiet();
      // 2. Take no more than the output has room for.
      const std::size_t cap = och.capacity(), size = och.size_approx();
      const std::size_t room = std::min(size < cap ? cap - size : 0, batch_);
      if (room == 0) {
        if (och.park_sender(lane_, [this]() noexcept { return st.cancelled(); })) return;
        continue;
      }
      if (take(room) == 0 && open_ != 0) {
        if (park_on_inputs()) return;
      }
    }
    st.yield(&lane_);
  }

  // Takes up to `room` messages in turns (header comment); returns how many.
  std::size_t take(std::size_t room) noexcept {
    const auto sink = [this](T&& v) noexcept { buf_.push_back(std::move(v)); };
    std::size_t got = 0, empty_visits = 0;
    while (got < room && open_ != 0 && empty_visits < open_) {
      const std::size_t ask = std::min(batch_ - turn_taken_, room - got);
      const std::optional<std::size_t> k = ch_[cursor_]->try_recv_n(sink, ask);
      if (!k) {  // closed and drained: retire it, its turn passes on
        ended_[cursor_] = true;
        --open_;
        next_turn();
        continue;
      }
      got += *k;
      turn_taken_ += *k;
      empty_visits = *k == 0 ? empty_visits + 1 : 0;
      if (*k < ask || turn_taken_ == batch_) next_turn();
    }
    in.add(got);
    return got;
  }

  void next_turn() noexcept {
    turn_taken_ = 0;
    if (open_ == 0) return;
    do cursor_ = (cursor_ + 1) % rx_.size();
    while (ended_[cursor_]);
  }

  // Parks the lane on every open input; true when it stays parked (the
  // caller must return), false when it should look at the inputs again.
  bool park_on_inputs() noexcept {
    std::uint64_t need = 0;  // the out bits that must still be set once armed
    for (std::size_t i = 0; i < rx_.size(); ++i) {
      if (ended_[i]) continue;
      const std::uint64_t bit = out_bit(i);
      need |= bit;
      // seq_cst: see on_input_wake. Set: a registration (or its wake) from
      // an earlier park still covers input i.
      if ((word_.load() & bit) != 0) continue;
      word_.fetch_or(bit);  // seq_cst: before the waker can be seen in the list
      if (!ch_[i]->park_receiver(wakers_[i], [this]() noexcept { return st.cancelled(); })) {
        word_.fetch_and(~bit);  // seq_cst: the waker is back in our hands
        return false;           // input i is ready (or closed, or cancel)
      }
    }
    // seq_cst RMW: see on_input_wake; the cancelled() load below follows it
    // in the single total order, pairing with cancel() (flag, then disarm).
    const std::uint64_t prev = word_.fetch_or(armed_bit);
    // A callback that ran before arming cleared its bit and resumed nothing:
    // the value it announced may be there. Cancel may have come too.
    if ((prev & need) == need && !st.cancelled()) return true;
    return !disarm();  // false: ours again, look again; true: someone resumes us
  }

  // Takes every waker back; finishes once no callback can touch the node.
  void finish_when_quiet() noexcept {
    for (std::size_t i = 0; i < rx_.size(); ++i) {
      const std::uint64_t bit = out_bit(i);
      // seq_cst: see on_input_wake.
      if ((word_.load() & bit) != 0 && ch_[i]->unpark(wakers_[i])) word_.fetch_and(~bit);
    }
    for (;;) {
      // seq_cst: see on_input_wake.
      if (word_.load() == 0) return finish();
      // A notifier holds a waker: park until its callback resumes us.
      const std::uint64_t prev = word_.fetch_or(armed_bit);  // seq_cst RMW: see on_input_wake
      if (prev != 0) return;
      if (!disarm()) return;  // cancel took the armed bit and resumes us
    }
  }

  void finish_cancelled() noexcept {
    discarded.add(buf_.size() - pos_);
    drop_tail(buf_, pos_, message_fate::discarded);
    buf_.clear();
    pos_ = 0;
    finish_when_quiet();
  }

  void finish() noexcept {
    out_port.finish();
    for (auto& r : rx_) r.reset();  // the last receiver closes its channel
    st.node_done();
  }

  std::vector<receiver<T>> rx_;  // the pipeline's handles on the inputs, until it finishes
  // Their shared states, kept past finish() for stats() (queue_depth).
  std::vector<std::shared_ptr<channel_state<T>>> ch_;
  std::size_t batch_;
  std::unique_ptr<input_waker[]> wakers_;
  std::vector<bool> ended_;   // input i was closed and drained
  std::size_t open_;          // inputs not ended
  std::size_t cursor_ = 0;    // the input whose turn it is
  std::size_t turn_taken_ = 0;  // messages taken in the current turn
  std::vector<T> buf_;        // taken, buf_[pos_..] not yet accepted by the output
  std::size_t pos_ = 0;
  merge_lane lane_;
  // armed | out bits (header comment). Every access seq_cst: see on_input_wake.
  std::atomic<std::uint64_t> word_{0};
};

}  // namespace runnel::detail
