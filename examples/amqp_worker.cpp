// A RabbitMQ worker service to copy: consume a queue, process on every core,
// publish the results, dead-letter what keeps failing, stop gracefully on
// SIGTERM/SIGINT, and print a stats line every few seconds.
//
//   export RUNNEL_AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10'
//   example_amqp_worker [in-queue] [out-queue] [dead-letter-queue]
//
// Queues default to work.in, work.out and work.dead (declared durable).
// Processing here upper-cases the body; a body starting with "poison" throws,
// so it is retried up to 5 times and then lands in the dead-letter queue with
// the error text in header x-runnel-error. When the client ends on an error
// (it gave up reconnecting, its queue was deleted, ...), the worker exits
// with status 1 and that error instead of waiting for a signal.
#include <runnel/amqp.hpp>
#include <runnel/pipeline.hpp>
#include <runnel/thread_pool.hpp>

#include <atomic>
#include <cctype>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace {

volatile std::sig_atomic_t stop_requested = 0;
extern "C" void on_stop_signal(int) { stop_requested = 1; }

std::string process(const std::string& in) {
  if (in.rfind("poison", 0) == 0) throw std::runtime_error("cannot process a poison message");
  std::string body = in;
  for (char& c : body) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return body;
}

void print_stats(const char* when, const runnel::amqp::client_stats& s) {
  std::printf("%s: delivered %llu acked %llu published %llu confirmed %llu retried %llu dead-lettered %llu "
              "reconnects %llu unacked %llu\n",
              when, static_cast<unsigned long long>(s.delivered), static_cast<unsigned long long>(s.acked),
              static_cast<unsigned long long>(s.published), static_cast<unsigned long long>(s.confirmed),
              static_cast<unsigned long long>(s.retried), static_cast<unsigned long long>(s.dead_lettered),
              static_cast<unsigned long long>(s.reconnects), static_cast<unsigned long long>(s.unacked));
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) try {
  const std::string in = argc > 1 ? argv[1] : "work.in";
  const std::string out = argc > 2 ? argv[2] : "work.out";
  const std::string dead = argc > 3 ? argv[3] : "work.dead";
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGINT, on_stop_signal);

  runnel::amqp::client client{runnel::amqp::connection_options::from_env()};
  for (const auto& q : {in, out, dead}) client.declare_queue(q);

  runnel::thread_pool pool;
  runnel::amqp::consume_options co{.queue = in, .prefetch = 256};
  co.on_failure.max_attempts = 5;
  co.on_failure.dead_letter_routing_key = dead;
  auto run = runnel::pipeline{pool}
                 .from(client.consume(co))
                 // By value: a throw goes to the failure policy, which republishes
                 // the delivery as it was at the throw (so leave the body intact).
                 .stage([](runnel::amqp::delivery d) {
                   d.body = process(d.body);
                   return d;
                 }, {.workers = pool.size()})
                 .to(client.publish({.routing_key = out}))
                 .on_error([](const runnel::stage_failure& f) {
                   try {
                     std::rethrow_exception(f.error);
                   } catch (const std::exception& e) {
                     std::fprintf(stderr, "processing failed: %s\n", e.what());
                   }
                 })
                 .run();

  auto next = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  bool ended = false;  // the run ended by itself: the client failed
  while (stop_requested == 0) {
    if (run.wait_for(std::chrono::milliseconds(100))) {  // rethrows a stage's error
      ended = true;
      break;
    }
    if (std::chrono::steady_clock::now() >= next) {
      print_stats("stats", client.stats());
      next += std::chrono::seconds(5);
    }
  }
  if (!ended) std::printf("stopping: draining in-flight messages\n");
  client.close();  // stop consuming, drain, ack, close; rethrows the error the client ended on
  run.wait();
  print_stats("final", client.stats());
  if (ended) {
    std::fprintf(stderr, "amqp_worker: the pipeline ended without a stop request\n");
    return 1;
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "amqp_worker: %s\n", e.what());
  return 1;
}
