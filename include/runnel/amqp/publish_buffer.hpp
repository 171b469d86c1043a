// The I/O thread's write buffer for publishes: a batch of basic.publish
// messages encoded as AMQP frames into one buffer and written with one
// send() (or a few, for a large batch).
//
// Why. rabbitmq-c writes every publish as three send() calls (method,
// content header, body: one system call each, the last one pushing the
// segment). On a broker-bound stream those calls were about half of the I/O
// thread's CPU a message, CPU the broker (on the same cores) did not get.
// Here a batch costs one call.
//
// The frames are the library's own: the method arguments and the content
// properties are encoded by rabbitmq-c (amqp_encode_method,
// amqp_encode_properties); this buffer only adds the frame envelopes (type,
// channel, size, frame-end octet) and splits a body into frames of at most
// frame_max - 8 octets, as amqp_basic_publish does. The bytes are exactly
// those amqp_basic_publish would have written (checked byte for byte by
// tests/amqp_publish_buffer_test.cpp).
//
// Plain TCP only: the bytes go to the socket's file descriptor, so a TLS
// connection keeps publishing through the library. Frames of one connection
// must not interleave, so the owner writes the buffer out completely before
// any other library call writes to the connection (see core::take_publishes).
#pragma once

#include <amqp.h>
#include <amqp_framing.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>

namespace runnel::amqp::detail {

class publish_buffer {
 public:
  // Appends one publish (method, content header, body frames); returns
  // AMQP_STATUS_OK, or the encoder's error (a key longer than 255 octets, a
  // header table larger than a frame), in which case nothing is appended.
  int append(amqp_channel_t ch, amqp_bytes_t exchange, amqp_bytes_t routing_key,
             const amqp_basic_properties_t& props, amqp_bytes_t body, std::size_t frame_max) {
    const std::size_t start = len_;
    int st = append_method(ch, exchange, routing_key);
    if (st == AMQP_STATUS_OK) st = append_header(ch, props, body.len, frame_max);
    if (st != AMQP_STATUS_OK) {
      len_ = start;
      return st;
    }
    const std::size_t chunk = frame_max - frame_overhead;
    for (std::size_t off = 0; off < body.len; off += chunk) {
      const std::size_t n = body.len - off < chunk ? body.len - off : chunk;
      std::uint8_t* f = open_frame(AMQP_FRAME_BODY, ch, n);
      std::memcpy(f, static_cast<const std::uint8_t*>(body.bytes) + off, n);
      close_frame(n);
    }
    return AMQP_STATUS_OK;
  }

  // Drops what was appended and not written.
  void clear() noexcept { len_ = 0; }

  std::size_t size() const noexcept { return len_; }
  bool empty() const noexcept { return len_ == 0; }
  const std::uint8_t* data() const noexcept { return buf_.get(); }

  // Writes the whole buffer to fd (a non-blocking socket: waits for room as
  // amqp_basic_publish does, without a deadline) and empties it. Returns
  // AMQP_STATUS_OK, or AMQP_STATUS_SOCKET_ERROR with errno set; the buffer is
  // emptied either way (after an error the connection is dead).
  int flush(int fd) noexcept {
    std::size_t off = 0;
    int st = AMQP_STATUS_OK, err = 0;
    while (off < len_) {
      const ssize_t n = ::send(fd, buf_.get() + off, len_ - off, MSG_NOSIGNAL);
      if (n >= 0) {
        off += static_cast<std::size_t>(n);
        continue;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        pollfd p{fd, POLLOUT, 0};
        if (::poll(&p, 1, -1) >= 0 || errno == EINTR) continue;
      }
      st = AMQP_STATUS_SOCKET_ERROR;
      err = errno;
      break;
    }
    len_ = 0;
    // A batch of large bodies made the buffer large: give that back.
    if (cap_ > keep_capacity) {
      buf_.reset();
      cap_ = 0;
    }
    if (st != AMQP_STATUS_OK) errno = err;  // as send() left it
    return st;
  }

  // Bytes after which the owner should flush before appending more, so a
  // batch of large messages does not grow the buffer without bound.
  static constexpr std::size_t flush_at = 256 * 1024;

 private:
  // Frame type (1), channel (2), payload size (4) before the payload, the
  // frame-end octet after it.
  static constexpr std::size_t frame_header = 7;
  static constexpr std::size_t frame_overhead = frame_header + 1;
  // Capacity kept across flushes (a batch of small publishes fits many times).
  static constexpr std::size_t keep_capacity = 2 * flush_at;
  // Largest encoded basic.publish arguments: ticket (2), exchange and
  // routing key (1 + 255 each), the mandatory/immediate bits (1).
  static constexpr std::size_t max_publish_args = 2 + 256 + 256 + 1;

  int append_method(amqp_channel_t ch, amqp_bytes_t exchange, amqp_bytes_t routing_key) {
    amqp_basic_publish_t m{};
    m.exchange = exchange;
    m.routing_key = routing_key;
    reserve(frame_overhead + 4 + max_publish_args);
    std::uint8_t* p = buf_.get() + len_ + frame_header;
    put32(p, AMQP_BASIC_PUBLISH_METHOD);
    const int n = amqp_encode_method(AMQP_BASIC_PUBLISH_METHOD, &m, amqp_bytes_t{max_publish_args, p + 4});
    if (n < 0) return n;
    open_frame(AMQP_FRAME_METHOD, ch, 4 + static_cast<std::size_t>(n));
    close_frame(4 + static_cast<std::size_t>(n));
    return AMQP_STATUS_OK;
  }

  // The content header: class, weight 0, body size, then the properties,
  // which (as in rabbitmq-c) must fit in one frame.
  int append_header(amqp_channel_t ch, const amqp_basic_properties_t& props, std::size_t body_size,
                    std::size_t frame_max) {
    const std::size_t room = frame_max - frame_overhead - 12;
    reserve(frame_overhead + 12 + room);
    std::uint8_t* p = buf_.get() + len_ + frame_header;
    put16(p, AMQP_BASIC_CLASS);
    put16(p + 2, 0);
    put64(p + 4, body_size);
    const int n = amqp_encode_properties(AMQP_BASIC_CLASS, const_cast<amqp_basic_properties_t*>(&props),
                                         amqp_bytes_t{room, p + 12});
    if (n < 0) return n;
    open_frame(AMQP_FRAME_HEADER, ch, 12 + static_cast<std::size_t>(n));
    close_frame(12 + static_cast<std::size_t>(n));
    return AMQP_STATUS_OK;
  }

  // Writes the envelope of a frame of `size` payload octets at the end and
  // returns where its payload goes (room for it and the end octet reserved).
  std::uint8_t* open_frame(std::uint8_t type, amqp_channel_t ch, std::size_t size) {
    reserve(size + frame_overhead);
    std::uint8_t* f = buf_.get() + len_;
    f[0] = type;
    put16(f + 1, ch);
    put32(f + 3, static_cast<std::uint32_t>(size));
    return f + frame_header;
  }

  void close_frame(std::size_t size) noexcept {
    buf_[len_ + frame_header + size] = AMQP_FRAME_END;
    len_ += size + frame_overhead;
  }

  // Room for n more octets (contents kept; new octets not initialized).
  void reserve(std::size_t n) {
    if (len_ + n <= cap_) return;
    std::size_t cap = cap_ == 0 ? 64 * 1024 : cap_;
    while (cap < len_ + n) cap *= 2;
    std::unique_ptr<std::uint8_t[]> b(new std::uint8_t[cap]);
    if (len_ != 0) std::memcpy(b.get(), buf_.get(), len_);
    buf_ = std::move(b);
    cap_ = cap;
  }

  static void put16(std::uint8_t* p, std::uint16_t v) noexcept {
    p[0] = static_cast<std::uint8_t>(v >> 8);
    p[1] = static_cast<std::uint8_t>(v);
  }
  static void put32(std::uint8_t* p, std::uint32_t v) noexcept {
    put16(p, static_cast<std::uint16_t>(v >> 16));
    put16(p + 2, static_cast<std::uint16_t>(v));
  }
  static void put64(std::uint8_t* p, std::uint64_t v) noexcept {
    put32(p, static_cast<std::uint32_t>(v >> 32));
    put32(p + 4, static_cast<std::uint32_t>(v));
  }

  std::unique_ptr<std::uint8_t[]> buf_;  // cap_ octets, the first len_ in use
  std::size_t len_ = 0, cap_ = 0;
};

}  // namespace runnel::amqp::detail
