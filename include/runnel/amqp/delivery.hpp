// runnel::amqp::delivery: one broker message travelling through a pipeline,
// carrying its broker-side identity (connection epoch and delivery tag).
//
// Settling. A delivery is move-only; the object that ends up owning the
// identity settles the message when it is destroyed:
//   - destroyed normally (a stage filtered it, a sink returned): acked;
//   - destroyed while an exception unwinds through its owner (a stage or
//     sink taking it by value threw), destroyed by the pipeline as failed (a
//     stage or sink taking it by reference threw), or fail(reason) was
//     called: handed to the consumer's failure policy (retry with the
//     attempt count + 1, or dead-letter after max_attempts);
//   - destroyed by the pipeline as discarded, never processed (cancel(), or
//     a .to() channel closed by its receivers): nacked with requeue, so the
//     broker delivers it again (to this or another consumer) and it is
//     processed once; nothing is lost and nothing processed twice;
//   - moved into client::publish(): acked once the broker confirms the
//     publish of the result.
// The ack is queued to the connection's I/O thread (lock-free, never
// blocking the worker); an ack for an older connection epoch is dropped (the
// broker has already requeued that message) and counted.
//
// The pipeline tells "destroyed as failed" and "destroyed as discarded"
// through runnel::message_fate (set while it destroys a message it counts as
// failed or discarded; pipeline/message_fate.hpp). A
// default-constructed delivery has no identity: it is an outgoing message
// built by the user (see client::publish).
#pragma once

#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../pipeline/message_fate.hpp"

namespace runnel::amqp {

namespace detail { class core; }

// The content of a message (what the failure policy republishes).
struct message {
  std::string body;
  std::string routing_key;  // as delivered; publish() uses it when its own is empty
  std::string exchange;     // as delivered
  std::string message_id;
  // Header table entries with string or integer values, as text.
  std::vector<std::pair<std::string, std::string>> headers;
  bool redelivered = false;
  unsigned attempt = 1;  // 1 on the first processing; from header x-runnel-attempt after a retry
};

class delivery : public message {
 public:
  delivery() = default;
  delivery(delivery&& o) noexcept : message(std::move(o)) { take(o); }
  delivery& operator=(delivery&& o) noexcept {
    if (this != &o) {
      settle();
      message::operator=(std::move(o));
      take(o);
    }
    return *this;
  }
  delivery(const delivery&) = delete;
  delivery& operator=(const delivery&) = delete;
  ~delivery() { settle(); }

  // Hands the message to the failure policy now, with `reason` as the error
  // text; the delivery then has no identity.
  void fail(std::string reason) noexcept;

  bool has_identity() const noexcept { return core_ != nullptr; }
  std::uint64_t delivery_tag() const noexcept { return tag_; }
  std::uint64_t epoch() const noexcept { return epoch_; }

 private:
  friend class detail::core;

  void take(delivery& o) noexcept {
    core_ = std::move(o.core_);
    epoch_ = o.epoch_;
    tag_ = o.tag_;
    consumer_ = o.consumer_;
    // A moved-to object belongs to the scope that made it: count the
    // exceptions in flight now, to tell "destroyed by unwinding" later.
    uncaught_ = std::uncaught_exceptions();
    o.core_ = nullptr;
  }
  void settle() noexcept;

  std::shared_ptr<detail::core> core_;
  std::uint64_t epoch_ = 0;
  std::uint64_t tag_ = 0;
  std::uint32_t consumer_ = 0;
  int uncaught_ = 0;
};

// A message built by the user for client::publish (no input to ack).
using outgoing = delivery;

}  // namespace runnel::amqp
