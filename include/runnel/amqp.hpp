// runnel::amqp: a RabbitMQ source and sink for runnel pipelines
// (at-least-once: every input is acked only after its result is confirmed
// by the broker, or after the sink that took it returned).
//
//   #include <runnel/amqp.hpp>
//   runnel::amqp::client client{runnel::amqp::connection_options::from_env()};
//   runnel::thread_pool pool;
//   auto run = runnel::pipeline{pool}
//       .from(client.consume({.queue = "in", .prefetch = 256}))
//       .stage([](runnel::amqp::delivery d) { d.body = process(d.body); return d; },
//              {.workers = pool.size()})
//       .to(client.publish({.routing_key = "out"}))
//       .run();
//   ...
//   client.close();   // graceful: stop consuming, drain, ack, close
//   run.wait();
//
// Threads. The client owns one connection and its I/O thread, the only
// thread that touches the socket (rabbitmq-c is not thread-safe). It sleeps
// in poll() on the socket and an eventfd, so an idle client uses no CPU, and
// it keeps heartbeats flowing however long the stages take. Pool workers
// never block on it: acks go through a lock-free ring, results through the
// publish channel.
//
// Settling (see amqp/delivery.hpp): a delivery destroyed normally is acked
// (a filtering stage, a sink that returned); one destroyed by an exception
// unwinding through a stage or sink that took it by value, or fail()ed, goes
// to the consumer's failure_policy: republished to its queue with header
// x-runnel-attempt + 1 until max_attempts, then published to the
// dead-letter exchange/routing key with the error text in x-runnel-error;
// the input is acked once that publish is confirmed, so a crash in between
// redelivers it. A delivery moved into publish() is acked when the broker
// confirms its result. Acks are coalesced (multiple = true on the contiguous
// watermark, single acks for stragglers) and sent in batches, or when the
// I/O thread goes idle: at once if nothing else is in flight, else within
// 2 ms. pipeline_handle::cancel() requeues the deliveries the pipeline
// discards, and the I/O thread then cancels that consumer at the broker
// (basic.cancel) and requeues what it still holds; client.close() is the
// graceful stop (it drains instead).
//
// Sealed messages (amqp/seal.hpp): publish_options::seal seals every body
// (AES-256-GCM, routing key and message id bound), consume_options::open
// opens every delivery before the pipeline sees it; one that does not open is
// dead-lettered at once with the reason and counted in stats().unopened.
//
// Resource alarms: while the broker has blocked the connection
// (connection.blocked; stats().blocked) nothing is published, so the I/O
// thread never stalls in a write the broker does not read; results wait in
// their bounded publish channels.
//
// Faults. A lost connection (broker restart, forced close, heartbeat
// timeout, a channel error) is re-established with capped exponential
// backoff and jitter, rotating through the endpoints; queues the client
// declared are declared again, QoS and consumers restored, and publishes
// without an input that were not confirmed are sent again. Every delivery
// carries the epoch of its channel; acks and results of an older epoch are
// dropped (the broker redelivers those inputs) and counted in stats().stale,
// so no tag is ever acked on the wrong channel. Duplicates happen only for
// messages in flight at a fault.
//
// Errors (runnel::amqp::error, with the AMQP reply code when there is one):
// bad URL or options from from_url()/consume(); nothing listening, wrong
// password (the message names the user, never the password), missing vhost
// from the constructor within connect_timeout; queue not found (404) or
// access refused (403) from consume(); a consumer cancelled by the broker
// (queue deleted) ends the client: its pipelines' input closes and close()
// rethrows the error; so does a publish the broker refuses (403, no write
// permission on the exchange), whose inputs are not acked. TLS failures
// (amqps://, see amqp/tls.hpp) say which check failed. No message repeats a
// password or key material.
#pragma once

#include <exception>
#include <memory>
#include <string>
#include <utility>

#include "amqp/core.hpp"
#include "amqp/delivery.hpp"
#include "amqp/error.hpp"
#include "amqp/options.hpp"
#include "amqp/seal.hpp"
#include "channel.hpp"

namespace runnel::amqp {

class client {
 public:
  // Connects (trying each endpoint once) and starts the I/O thread; throws
  // error when no endpoint accepts the login within connect_timeout.
  explicit client(connection_options opts) : core_(std::make_shared<detail::core>(std::move(opts))) {
    core_->start();
  }
  client(const client&) = delete;
  client& operator=(const client&) = delete;
  ~client() {
    try {
      core_->close();
    } catch (...) {
      // A destructor cannot report; call close() to see the error.
    }
  }

  // Starts consuming from a queue: QoS prefetch, basic.consume; returns the
  // channel the deliveries arrive on (for pipeline::from). Throws error on a
  // bad option, a missing queue (404) or a refused one (403).
  receiver<delivery> consume(const consume_options& o) { return core_->consume(o); }

  // A channel whose deliveries are published (for pipeline_flow::to, or sent
  // to by hand). A delivery with an identity is acked once its publish is
  // confirmed; an outgoing one is only published (and republished after a
  // reconnect until confirmed).
  sender<delivery> publish(const publish_options& o) { return core_->publish(o); }

  // Declares a durable queue now and again after every reconnect.
  void declare_queue(const std::string& name) { core_->declare_queue(name); }

  // Graceful stop: cancels the consumers, closes their channels (the
  // pipelines drain them), waits (up to 30 s) until every delivery is acked
  // and every publish confirmed, then closes channel and connection.
  // Idempotent; rethrows the error that ended the client, if any.
  void close() { core_->close(); }

  client_stats stats() const noexcept { return core_->stats(); }

 private:
  std::shared_ptr<detail::core> core_;
};

}  // namespace runnel::amqp
