// runnel::scaling with --amqp URL --queue Q: the same stage fed from a
// RabbitMQ queue through the bridge (runnel/amqp.hpp). Included by
// scaling.hpp when built with target runnel::scaling_amqp (which defines
// RUNNEL_SCALING_HAVE_AMQP and links runnel::amqp).
//
// One run on `cores` cores ("runnel+amqp"):
//   1. untimed: the queue must be empty and have no consumer (it is checked
//      with a passive queue.declare; a missing queue is declared durable), so
//      a real work queue is never drained by mistake; then the generator's N
//      messages are published to it (transient, with publisher confirms) and
//      every confirm is awaited;
//   2. timed: consume (prefetch = --capacity) -> stage(process, workers =
//      cores, --ordered, --batch) -> sink(consume), on a thread_pool of
//      `cores` pinned workers plus the bridge's I/O thread; the clock stops
//      when the broker has been sent the ack of every message.
// Latency is from the stage taking a delivery to the sink returning (when
// its ack is queued to the I/O thread): the time a message waited in the
// broker is left out, since the whole stream was queued before the clock
// started. A run checks that every sequence number arrived exactly once.
//
// The message type must be trivially copyable or std::string: a body is its
// 8-byte sequence number and then the message's bytes.
#pragma once

#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <sys/time.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "../amqp.hpp"
#include "../pipeline.hpp"
#include "../thread_pool.hpp"
#include "options.hpp"
#include "peers.hpp"
#include "report.hpp"

namespace runnel::scaling {

inline constexpr const char* amqp_name = "runnel+amqp";

// Whether messages of type M can travel through the broker.
template <class M>
inline constexpr bool amqp_carriable = std::is_trivially_copyable_v<M> || std::is_same_v<M, std::string>;

namespace detail {

template <class M>
std::string encode(std::uint64_t seq, const M& m) {
  std::string body(sizeof seq, '\0');
  std::memcpy(body.data(), &seq, sizeof seq);
  if constexpr (std::is_same_v<M, std::string>)
    body += m;
  else
    body.append(reinterpret_cast<const char*>(&m), sizeof m);
  return body;
}

// The sequence number and message of a body; nullopt for a foreign body.
template <class M>
std::optional<std::pair<std::uint64_t, M>> decode(const std::string& body) {
  std::uint64_t seq = 0;
  if (body.size() < sizeof seq) return std::nullopt;
  std::memcpy(&seq, body.data(), sizeof seq);
  if constexpr (std::is_same_v<M, std::string>) {
    return std::pair<std::uint64_t, M>{seq, body.substr(sizeof seq)};
  } else {
    if (body.size() != sizeof seq + sizeof(M)) return std::nullopt;
    std::pair<std::uint64_t, M> out{seq, M{}};
    std::memcpy(&out.second, body.data() + sizeof seq, sizeof(M));
    return out;
  }
}

// Ready messages and consumers of a queue, from a passive queue.declare on a
// short-lived connection of its own; nullopt when the queue does not exist.
struct queue_state {
  std::uint32_t messages = 0, consumers = 0;
};

inline std::optional<queue_state> inspect_queue(const amqp::connection_options& c, const std::string& queue) {
  amqp_connection_state_t conn = amqp_new_connection();
  struct closer {
    amqp_connection_state_t conn;
    bool open = false;
    ~closer() {
      if (open) amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
      amqp_destroy_connection(conn);
    }
  } guard{conn};
  const auto fail = [&](const std::string& what) {
    return amqp::error("runnel::scaling: --amqp: " + what + " (queue '" + queue + "' on " + c.endpoints[0].host +
                       ":" + std::to_string(c.endpoints[0].port) + ")");
  };
  amqp_socket_t* s = amqp_tcp_socket_new(conn);
  timeval tv{c.connect_timeout_s, 0};
  if (s == nullptr || amqp_socket_open_noblock(s, c.endpoints[0].host.c_str(), c.endpoints[0].port, &tv) != 0)
    throw fail("cannot connect");
  amqp_set_rpc_timeout(conn, &tv);
  if (amqp_login(conn, c.vhost.c_str(), 0, c.frame_max, 0, AMQP_SASL_METHOD_PLAIN, c.user.c_str(),
                 c.password.c_str())
          .reply_type != AMQP_RESPONSE_NORMAL)
    throw fail("login refused for user '" + c.user + "'");
  guard.open = true;
  amqp_channel_open(conn, 1);
  if (amqp_get_rpc_reply(conn).reply_type != AMQP_RESPONSE_NORMAL) throw fail("channel.open failed");
  const auto* ok = amqp_queue_declare(conn, 1, amqp_cstring_bytes(queue.c_str()), 1, 0, 0, 0, amqp_empty_table);
  if (ok == nullptr) {
    const amqp_rpc_reply_t r = amqp_get_rpc_reply(conn);
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD &&
        static_cast<const amqp_channel_close_t*>(r.reply.decoded)->reply_code == 404) {
      amqp_channel_close_ok_t close_ok{};
      amqp_send_method(conn, 1, AMQP_CHANNEL_CLOSE_OK_METHOD, &close_ok);
      return std::nullopt;
    }
    throw fail("passive queue.declare failed");
  }
  queue_state st{ok->message_count, ok->consumer_count};
  amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
  return st;
}

// A stage's result on its way to the sink, with the delivery to ack after it.
template <class R>
struct amqp_item {
  amqp::delivery d;
  std::uint64_t seq = 0;
  std::int64_t t0 = 0;
  std::optional<R> value;  // empty for a foreign body
};

// Polls until pred() holds; throws when `progress()` has not changed for
// `stall` (a liveness bound, not a measurement).
template <class Pred, class Progress>
void await(Pred pred, Progress progress, const char* what) {
  constexpr auto stall = std::chrono::seconds(60);
  auto last = progress();
  auto since = std::chrono::steady_clock::now();
  while (!pred()) {
    std::this_thread::sleep_for(std::chrono::microseconds(500));
    const auto p = progress();
    const auto now = std::chrono::steady_clock::now();
    if (p != last) {
      last = p;
      since = now;
    } else if (now - since > stall) {
      throw std::runtime_error(std::string("runnel::scaling: --amqp: no progress for 60 s while ") + what);
    }
  }
}

}  // namespace detail

template <class J>
run_sample run_runnel_amqp(const options& o, std::size_t cores, const J& j) {
  using M = typename J::message;
  using R = typename J::result;
  if constexpr (!amqp_carriable<M>) {
    throw usage_error("--amqp needs a message type that is trivially copyable or std::string");
  } else {
    const std::uint64_t n = o.messages;
    auto generate = j.generate;
    auto consume = j.consume;
    const auto conn = amqp::connection_options::from_url(o.amqp_url);
    const auto st = detail::inspect_queue(conn, o.queue);
    if (st && st->messages != 0)
      throw std::runtime_error("runnel::scaling: --amqp: queue '" + o.queue + "' holds " +
                               std::to_string(st->messages) +
                               " messages; the benchmark needs an empty queue of its own (it fills and drains it)");
    if (st && st->consumers != 0)
      throw std::runtime_error("runnel::scaling: --amqp: queue '" + o.queue + "' has " +
                               std::to_string(st->consumers) + " consumers; it needs a queue of its own");

    runnel::thread_pool pool({.threads = cores, .pin = true, .name_prefix = "scaling"});
    amqp::client client{conn};
    if (!st) client.declare_queue(o.queue);
    {
      auto tx = client.publish({.routing_key = o.queue, .persistent = false});
      for (std::uint64_t seq = 0; seq < n; ++seq) {
        const M msg = generate(seq);
        amqp::outgoing m;
        m.body = detail::encode(seq, msg);
        if (!tx.send(std::move(m))) throw std::runtime_error("runnel::scaling: --amqp: the publisher closed");
      }
    }
    detail::await([&] { return client.stats().confirmed >= n; }, [&] { return client.stats().confirmed; },
                  "waiting for the broker to confirm the preloaded messages");

    run_sample s;
    std::uint64_t delivered = 0;
    std::vector<std::uint8_t> seen(n, 0);
    std::uint64_t foreign = 0, twice = 0;
    amqp::consume_options co{.queue = o.queue,
                             .prefetch = static_cast<unsigned>(std::min<std::size_t>(o.capacity, 65535))};
    co.on_failure.max_attempts = 1;  // a failed message is dropped (acked); the run then fails
    const detail::stopwatch clock;
    auto run = runnel::pipeline{pool}
                   .from(client.consume(co))
                   .stage(
                       [&j](amqp::delivery d) {
                         const std::int64_t t0 = detail::now_ns();
                         auto m = detail::decode<M>(d.body);
                         if (!m) return detail::amqp_item<R>{std::move(d), ~std::uint64_t{0}, t0, std::nullopt};
                         std::optional<R> r{j.process(m->second)};
                         return detail::amqp_item<R>{std::move(d), m->first, t0, std::move(r)};
                       },
                       {.workers = cores, .ordered = o.ordered, .capacity = o.capacity, .batch = o.batch,
                        .name = "process"})
                   .sink(
                       [&](detail::amqp_item<R>& it) {
                         if (it.seq >= n || !it.value) {
                           ++foreign;
                           return;
                         }
                         if (seen[it.seq]++ != 0) ++twice;
                         consume(*it.value);
                         s.latency.record(static_cast<std::uint64_t>(detail::now_ns() - it.t0));
                         ++delivered;
                       },
                       {.batch = o.batch, .name = "consume"})
                   .run();
    try {
      detail::await([&] { return client.stats().acked >= n || run.done(); }, [&] { return client.stats().acked; },
                    "consuming");
    } catch (...) {
      run.cancel();
      throw;
    }
    clock.stop(s);
    client.close();
    run.wait();
    if (foreign != 0 || twice != 0)
      throw std::runtime_error("runnel::scaling: --amqp: " + std::to_string(foreign) + " foreign and " +
                               std::to_string(twice) + " duplicate messages in queue '" + o.queue + "'");
    detail::check_count(amqp_name, n, delivered);
    s.messages = delivered;
    return s;
  }
}

}  // namespace runnel::scaling
