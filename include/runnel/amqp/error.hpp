// runnel::amqp::error: every failure of the RabbitMQ bridge that reaches the
// user (bad options, connect and login failures, broker refusals, lost
// connections that could not be restored) is one of these.
#pragma once

#include <stdexcept>
#include <string>

namespace runnel::amqp {

class error : public std::runtime_error {
 public:
  // reply_code: the AMQP reply code the broker sent (404 not found, 403
  // access refused, 406 precondition failed, 320 connection forced, ...), or
  // 0 when the failure has none (bad URL, nothing listening, timeout).
  explicit error(const std::string& what, int reply_code = 0)
      : std::runtime_error(what), code_(reply_code) {}
  int reply_code() const noexcept { return code_; }

 private:
  int code_;
};

}  // namespace runnel::amqp
