// Consume a RabbitMQ queue, compute on every core, store the results in
// SQLite, and ack each input only after its row is committed: a template
// to copy for "read, process, store" services. A message redelivered after a
// crash is recognised by its key (the AMQP message id, else the body) and
// leaves the table unchanged.
//
//   export RUNNEL_AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10'
//   example_amqp_to_sqlite [in-queue] [database] [dead-letter-queue]
//
// Defaults: queue store.in, database store.db, dead letters store.dead.
// The "computation" counts the words of the body. A row that cannot be
// stored (here: an empty body violates the table's CHECK) goes to the
// failure policy: retried, then dead-lettered with the SQLite error text.
// SIGTERM/SIGINT stop gracefully: stop consuming, drain, commit, ack.
#include <runnel/amqp.hpp>
#include <runnel/pipeline.hpp>
#include <runnel/sqlite.hpp>
#include <runnel/thread_pool.hpp>

#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <sstream>
#include <string>
#include <thread>

namespace {

volatile std::sig_atomic_t stop_requested = 0;
extern "C" void on_stop_signal(int) { stop_requested = 1; }

// What the store writes: the result, and the input it came from (acked
// when this object is destroyed after the commit).
struct result {
  runnel::amqp::delivery in;
  std::string text;
  std::int64_t words = 0;
};

std::int64_t count_words(const std::string& s) {
  std::istringstream is(s);
  std::int64_t n = 0;
  for (std::string w; is >> w;) ++n;
  return n;
}

}  // namespace

int main(int argc, char** argv) try {
  const std::string in = argc > 1 ? argv[1] : "store.in";
  const std::string path = argc > 2 ? argv[2] : "store.db";
  const std::string dead = argc > 3 ? argv[3] : "store.dead";
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGINT, on_stop_signal);

  runnel::sqlite::store_options so;
  so.path = path;
  so.schema = {"CREATE TABLE IF NOT EXISTS word_counts("
               "  msg TEXT PRIMARY KEY, body TEXT NOT NULL CHECK(length(body) > 0), words INTEGER NOT NULL)"};
  // The key is the primary key here, so ON CONFLICT DO NOTHING alone is
  // idempotent; store_handlers::key adds the dedupe table for writes that
  // are not (an UPDATE of a counter, an insert into a log table).
  so.insert = "INSERT INTO word_counts(msg, body, words) VALUES(?1, ?2, ?3) ON CONFLICT(msg) DO NOTHING";
  so.batch = 256;
  so.max_wait = std::chrono::milliseconds(20);
  runnel::sqlite::store_handlers<result> sh;
  sh.bind = [](runnel::sqlite::statement& s, const result& r) {
    s.bind(1, r.in.message_id.empty() ? r.in.body : r.in.message_id).bind(2, r.text).bind(3, r.words);
  };
  // A row that could not be stored: tell the failure policy why.
  sh.on_failure = [](std::span<result> rs, const runnel::sqlite::write_failure& f) {
    std::fprintf(stderr, "not stored (%zu messages): %s\n", rs.size(), f.what.c_str());
    for (result& r : rs) r.in.fail(f.what);
  };
  runnel::sqlite::store<result> db(so, sh);

  runnel::amqp::client client{runnel::amqp::connection_options::from_env()};
  client.declare_queue(in);
  client.declare_queue(dead);
  runnel::thread_pool pool;
  runnel::amqp::consume_options co{.queue = in, .prefetch = 512};
  co.on_failure.max_attempts = 3;
  co.on_failure.dead_letter_routing_key = dead;
  auto run = runnel::pipeline{pool}
                 .from(client.consume(co))
                 .stage([](runnel::amqp::delivery d) {
                   result r;
                   r.words = count_words(d.body);
                   r.text = d.body;
                   r.in = std::move(d);
                   return r;
                 }, {.workers = pool.size()})
                 .to(db.input())  // backpressure: a full store input parks this node, never a worker
                 .run();

  auto last = std::chrono::steady_clock::now();
  while (stop_requested == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (std::chrono::steady_clock::now() - last > std::chrono::seconds(5)) {
      last = std::chrono::steady_clock::now();
      const auto s = db.stats();
      std::printf("stored %llu duplicates %llu failed %llu commits %llu\n",
                  static_cast<unsigned long long>(s.stored), static_cast<unsigned long long>(s.duplicates),
                  static_cast<unsigned long long>(s.failed), static_cast<unsigned long long>(s.commits));
      std::fflush(stdout);
    }
  }
  client.close();  // stop consuming, drain the pipeline; the store commits, the inputs are acked
  run.wait();
  db.close();
  const auto s = db.stats();
  const auto c = client.stats();
  std::printf("final: delivered %llu acked %llu stored %llu duplicates %llu failed %llu dead-lettered %llu\n",
              static_cast<unsigned long long>(c.delivered), static_cast<unsigned long long>(c.acked),
              static_cast<unsigned long long>(s.stored), static_cast<unsigned long long>(s.duplicates),
              static_cast<unsigned long long>(s.failed), static_cast<unsigned long long>(c.dead_lettered));
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "example_amqp_to_sqlite: %s\n", e.what());
  return 1;
}
