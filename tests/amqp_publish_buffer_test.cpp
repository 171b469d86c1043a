// The I/O thread's publish buffer (amqp/publish_buffer.hpp) writes exactly
// the bytes rabbitmq-c's amqp_basic_publish writes: each case publishes the
// same messages through both, the library's over one end of a socketpair,
// and compares the octets. No broker (the bridge tests publish through it to
// a real one).
#include <catch2/catch.hpp>

#include <runnel/amqp/publish_buffer.hpp>

#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

using runnel::amqp::detail::publish_buffer;

namespace {

struct msg {
  std::string exchange, routing_key, body, message_id;
  std::vector<std::pair<std::string, std::string>> headers;
  int delivery_mode = 2;
};

// Properties as the bridge builds them (core::send_publish).
struct props_of {
  explicit props_of(const msg& m) {
    p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG;
    p.delivery_mode = static_cast<std::uint8_t>(m.delivery_mode);
    if (!m.message_id.empty()) {
      p._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
      p.message_id = amqp_cstring_bytes(m.message_id.c_str());
    }
    for (const auto& h : m.headers) {
      amqp_table_entry_t e{};
      e.key = amqp_cstring_bytes(h.first.c_str());
      e.value.kind = AMQP_FIELD_KIND_UTF8;
      e.value.value.bytes = amqp_cstring_bytes(h.second.c_str());
      hs.push_back(e);
    }
    if (!hs.empty()) {
      p._flags |= AMQP_BASIC_HEADERS_FLAG;
      p.headers.num_entries = static_cast<int>(hs.size());
      p.headers.entries = hs.data();
    }
  }
  amqp_basic_properties_t p{};
  std::vector<amqp_table_entry_t> hs;
};

amqp_bytes_t bytes(const std::string& s) { return amqp_bytes_t{s.size(), const_cast<char*>(s.data())}; }

std::string drain(int fd) {
  std::string out;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) return out;
    out.append(buf, static_cast<std::size_t>(n));
  }
}

// The frame_max of a new rabbitmq-c connection state.
int initial_frame_max() {
  amqp_connection_state_t conn = amqp_new_connection();
  const int fm = amqp_get_frame_max(conn);
  amqp_destroy_connection(conn);
  return fm;
}

// What amqp_basic_publish writes for these messages on channel ch (on a
// connection whose frame_max is the initial one).
std::string library_bytes(const std::vector<msg>& ms, amqp_channel_t ch, int frame_max) {
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  REQUIRE(::fcntl(sv[1], F_SETFL, O_NONBLOCK) == 0);
  int big = 8 << 20;
  ::setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
  ::setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
  amqp_connection_state_t conn = amqp_new_connection();
  amqp_socket_t* s = amqp_tcp_socket_new(conn);
  amqp_tcp_socket_set_sockfd(s, sv[0]);  // the connection closes it
  // A connection that never logged in keeps its initial frame_max (it
  // accepts tuning only after login).
  REQUIRE(amqp_get_frame_max(conn) == frame_max);
  std::string out;
  std::thread reader([&] {
    // The peer end is non-blocking: read until the writer is done.
    for (;;) {
      const std::string got = drain(sv[1]);
      out += got;
      if (got.empty()) {
        char c;
        if (::recv(sv[1], &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0) return;  // closed
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
  });
  for (const msg& m : ms) {
    const props_of p(m);
    REQUIRE(amqp_basic_publish(conn, ch, bytes(m.exchange), bytes(m.routing_key), 0, 0, &p.p, bytes(m.body)) ==
            AMQP_STATUS_OK);
  }
  amqp_destroy_connection(conn);
  reader.join();
  ::close(sv[1]);
  return out;
}

// What publish_buffer holds for them, and what its flush() writes.
std::string buffer_bytes(const std::vector<msg>& ms, amqp_channel_t ch, int frame_max) {
  publish_buffer b;
  for (const msg& m : ms) {
    const props_of p(m);
    REQUIRE(b.append(ch, bytes(m.exchange), bytes(m.routing_key), p.p, bytes(m.body),
                     static_cast<std::size_t>(frame_max)) == AMQP_STATUS_OK);
  }
  const std::string held(reinterpret_cast<const char*>(b.data()), b.size());
  // flush() writes it all, also when it does not fit in the socket buffer
  // at once (a small buffer and a non-blocking socket: EAGAIN, poll, more).
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  REQUIRE(::fcntl(sv[0], F_SETFL, O_NONBLOCK) == 0);
  int small = 4096;
  ::setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
  std::string written;
  std::thread reader([&] {
    char buf[1000];
    for (;;) {
      const ssize_t n = ::read(sv[1], buf, sizeof buf);
      if (n <= 0) return;
      written.append(buf, static_cast<std::size_t>(n));
    }
  });
  REQUIRE(b.flush(sv[0]) == AMQP_STATUS_OK);
  CHECK(b.empty());
  ::close(sv[0]);
  reader.join();
  ::close(sv[1]);
  CHECK(written == held);
  return held;
}

std::string pattern(std::size_t n) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 131 + 7) & 0xff);
  return s;
}

}  // namespace

TEST_CASE("a plain publish is the library's bytes", "[amqp][publish_buffer]") {
  const std::vector<msg> ms{{"", "out", "12345678", "", {}, 1}};
  const int fm = initial_frame_max();
  const std::string lib = library_bytes(ms, 1, fm);
  REQUIRE(lib.size() > 8 + 3 * 8);
  CHECK(buffer_bytes(ms, 1, fm) == lib);
}

TEST_CASE("properties, headers, an empty body and another channel are the library's bytes",
          "[amqp][publish_buffer]") {
  const std::vector<msg> ms{
      {"ex", "rk.a", "body", "id-1", {{"x-runnel-attempt", "2"}, {"x-runnel-error", "it threw"}}, 2},
      {"", "q", "", "", {}, 2},
      {"amq.topic", std::string(255, 'k'), "x", "m", {{"h", ""}}, 1},
  };
  const int fm = initial_frame_max();
  CHECK(buffer_bytes(ms, 7, fm) == library_bytes(ms, 7, fm));
}

TEST_CASE("a body larger than a frame is split as the library splits it", "[amqp][publish_buffer]") {
  // frame_max - 8 octets a body frame.
  const int fm = initial_frame_max();
  const std::size_t chunk = static_cast<std::size_t>(fm) - 8;
  for (const std::size_t n : {chunk - 1, chunk, chunk + 1, 3 * chunk, 3 * chunk + 100}) {
    INFO("body of " << n << " octets, frame_max " << fm);
    const std::vector<msg> ms{{"", "big", pattern(n), "", {}, 2}, {"", "after", "tail", "", {}, 2}};
    CHECK(buffer_bytes(ms, 3, fm) == library_bytes(ms, 3, fm));
  }
}

TEST_CASE("a batch larger than the socket buffer is written whole", "[amqp][publish_buffer]") {
  std::vector<msg> ms;
  for (int i = 0; i < 600; ++i) ms.push_back({"", "out", pattern(static_cast<std::size_t>(64 + i)), "", {}, 1});
  const int fm = initial_frame_max();
  CHECK(buffer_bytes(ms, 1, fm) == library_bytes(ms, 1, fm));
}

TEST_CASE("a publish the encoder refuses leaves the buffer as it was", "[amqp][publish_buffer]") {
  publish_buffer b;
  const msg ok{"", "out", "abc", "", {}, 2};
  const props_of p(ok);
  REQUIRE(b.append(1, bytes(ok.exchange), bytes(ok.routing_key), p.p, bytes(ok.body), 131072) == AMQP_STATUS_OK);
  const std::string before(reinterpret_cast<const char*>(b.data()), b.size());
  // A routing key longer than a short string (255 octets).
  const std::string long_key(256, 'k');
  CHECK(b.append(1, bytes(ok.exchange), bytes(long_key), p.p, bytes(ok.body), 131072) < 0);
  // Headers that do not fit in one frame.
  msg fat{"", "out", "abc", "", {{"h", std::string(5000, 'v')}}, 2};
  const props_of fp(fat);
  CHECK(b.append(1, bytes(fat.exchange), bytes(fat.routing_key), fp.p, bytes(fat.body), 4096) < 0);
  CHECK(std::string(reinterpret_cast<const char*>(b.data()), b.size()) == before);
}

TEST_CASE("a flush to a closed peer reports a socket error and empties the buffer", "[amqp][publish_buffer]") {
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  ::close(sv[1]);
  publish_buffer b;
  const msg m{"", "out", "abc", "", {}, 2};
  const props_of p(m);
  REQUIRE(b.append(1, bytes(m.exchange), bytes(m.routing_key), p.p, bytes(m.body), 131072) == AMQP_STATUS_OK);
  CHECK(b.flush(sv[0]) == AMQP_STATUS_SOCKET_ERROR);
  CHECK(b.empty());
  ::close(sv[0]);
}
