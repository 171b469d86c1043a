// The ack window of one AMQP channel: which delivery tags are settled, and
// what to send so that acks are coalesced.
//
// The broker numbers deliveries 1, 2, 3, ... per channel. Pipeline workers
// finish them out of order. The window keeps `base_` (every tag below it is
// settled at the broker or about to be by the ack being returned) and one
// state per tag from base_ up to the last delivered:
//   pending    still in the pipeline (or waiting for its publish confirm)
//   done       finished, not yet acked
//   sent       already settled on its own (single ack or nack)
// advance() moves base_ over every done/sent tag and returns the highest
// done tag passed: one basic.ack(multiple = true) with that tag settles every
// done tag below it. The tag of a multiple ack must itself be unacked at the
// broker (RabbitMQ answers 406 "unknown delivery tag" otherwise), which is
// why it is the highest *done* tag and not simply base_ - 1. Done tags above
// a pending one (stragglers behind a slow message) are sent one by one by
// take_stragglers() when the connection goes idle or too many wait, so a slow
// message never holds the others back and a tag is never acked twice.
//
// Used by the connection's I/O thread only: no synchronisation.
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <vector>

namespace runnel::amqp::detail {

class ack_window {
 public:
  enum class state : std::uint8_t { pending, done, sent };

  // The broker delivered `tag` (always the next one on the channel).
  void delivered(std::uint64_t tag) {
    if (states_.empty() && base_ < tag) base_ = tag;
    while (base_ + states_.size() <= tag) states_.push_back(state::pending);
  }

  // A delivery finished; false when the tag is not pending (a bug upstream,
  // or a tag of another channel): it is then ignored.
  bool complete(std::uint64_t tag) {
    state* s = find(tag);
    if (s == nullptr || *s != state::pending) return false;
    *s = state::done;
    ++done_;
    return true;
  }

  // The tag was settled on its own (e.g. a nack); the watermark may pass it.
  bool mark_sent(std::uint64_t tag) {
    state* s = find(tag);
    if (s == nullptr || *s != state::pending) return false;
    *s = state::sent;
    ++sent_;
    return true;
  }

  // Moves the watermark; returns the tag for a multiple ack, if any, and the
  // number of tags it settles in *acked.
  std::optional<std::uint64_t> advance(std::uint64_t* acked = nullptr) {
    std::optional<std::uint64_t> last;
    std::uint64_t n = 0;
    while (!states_.empty() && states_.front() != state::pending) {
      if (states_.front() == state::done) {
        last = base_;
        ++n;
        --done_;
      } else {
        --sent_;
      }
      states_.pop_front();
      ++base_;
    }
    if (acked != nullptr) *acked = n;
    return last;
  }

  // Done tags above the watermark, now marked sent (to be acked singly).
  std::vector<std::uint64_t> take_stragglers() {
    std::vector<std::uint64_t> out;
    if (done_ == 0) return out;
    for (std::size_t i = 0; i < states_.size(); ++i) {
      if (states_[i] == state::done) {
        states_[i] = state::sent;
        out.push_back(base_ + i);
      }
    }
    sent_ += done_;
    done_ = 0;
    return out;
  }

  // Deliveries not yet settled (pending or done-not-acked).
  std::size_t unsettled() const noexcept { return states_.size() - sent_; }
  std::size_t done_waiting() const noexcept { return done_; }
  bool empty() const noexcept { return states_.empty(); }
  void reset() {
    states_.clear();
    base_ = 1;
    done_ = 0;
    sent_ = 0;
  }

 private:
  state* find(std::uint64_t tag) {
    if (tag < base_ || tag >= base_ + states_.size()) return nullptr;
    return &states_[static_cast<std::size_t>(tag - base_)];
  }

  std::uint64_t base_ = 1;   // lowest tag not yet passed by the watermark
  std::deque<state> states_; // states_[i] is tag base_ + i
  std::size_t done_ = 0;     // count of done tags in states_
  std::size_t sent_ = 0;     // count of sent tags in states_
};

}  // namespace runnel::amqp::detail
