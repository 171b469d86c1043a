// runnel::message_fate: why the pipeline is destroying a message, readable
// from the message's destructor.
//
// A pipeline destroys the messages it holds in three situations that a
// message type may need to tell apart (one that settles an external resource
// in its destructor, e.g. a broker acknowledgement):
//   - normal      the message was processed: a stage took it by reference
//                 and returned, filtered it, or its result was delivered;
//                 also any destruction outside the pipeline;
//   - discarded   the message was never processed: cancel() or a .to()
//                 channel closed by its receivers left it in the pipeline
//                 (counted in stage_stats::discarded);
//   - failed      a stage or sink taking it by reference threw while
//                 processing it (counted in stage_stats::failed); it is
//                 destroyed after the error handler has seen it.
// The pipeline's nodes set the fate on their own thread for exactly the
// duration of those destructions (message_fate_scope); current_message_fate()
// reads it. A message taken by value and destroyed inside the user's function
// is the user's: the fate there is `normal` (a throw is visible through
// std::uncaught_exceptions()).
#pragma once

#include <cstdint>

namespace runnel {

enum class message_fate : std::uint8_t { normal, discarded, failed };

namespace detail {
// Thread-local: each worker destroys its own batch; no sharing.
inline thread_local message_fate current_fate = message_fate::normal;
}  // namespace detail

// The fate of the message being destroyed on this thread (normal outside a
// pipeline's discard or failure).
inline message_fate current_message_fate() noexcept { return detail::current_fate; }

// Sets the fate for the lifetime of the scope (nests; restores the previous).
class message_fate_scope {
 public:
  explicit message_fate_scope(message_fate f) noexcept : prev_(detail::current_fate) { detail::current_fate = f; }
  ~message_fate_scope() { detail::current_fate = prev_; }
  message_fate_scope(const message_fate_scope&) = delete;
  message_fate_scope& operator=(const message_fate_scope&) = delete;

 private:
  message_fate prev_;
};

}  // namespace runnel
