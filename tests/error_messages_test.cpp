// Every exception a user can provoke names the call the user made (not an
// internal type such as the ring behind a channel), so the message alone
// says where to look.
#include <catch2/catch.hpp>

#include <runnel/channel.hpp>
#include <runnel/mpmc_queue.hpp>
#include <runnel/pipeline.hpp>
#include <runnel/spsc_queue.hpp>
#include <runnel/thread_pool.hpp>

#include <cstdint>
#include <future>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>

namespace {

using Catch::Matchers::Contains;

constexpr std::size_t huge = std::numeric_limits<std::size_t>::max() / 2;

std::optional<int> none() { return std::nullopt; }

// The message of the exception f throws, which must be an E.
template <class E, class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (...) {
    FAIL("threw an exception of another type");
  }
  FAIL("did not throw");
  return {};
}

}  // namespace

TEST_CASE("make_channel's capacity errors name make_channel, not the ring behind it") {
  const auto zero = message_of<std::invalid_argument>([] { (void)runnel::make_channel<int>(0); });
  CHECK_THAT(zero, Contains("runnel::make_channel") && Contains("capacity must be at least 1"));
  CHECK_THAT(zero, !Contains("mpmc_queue"));
  const auto big = message_of<std::length_error>([] { (void)runnel::make_channel<int>(huge); });
  CHECK_THAT(big, Contains("runnel::make_channel") && Contains("too large"));
  CHECK_THAT(big, !Contains("mpmc_queue"));
}

TEST_CASE("a ring's capacity errors name the ring the user constructed") {
  CHECK_THAT(message_of<std::invalid_argument>([] { runnel::mpmc_queue<int> q(0); }),
             Contains("runnel::mpmc_queue"));
  CHECK_THAT(message_of<std::invalid_argument>([] { runnel::spsc_queue<int> q(0); }),
             Contains("runnel::spsc_queue"));
  CHECK_THAT(message_of<std::length_error>([] { runnel::spsc_queue<int> q(huge); }),
             Contains("runnel::spsc_queue"));
}

TEST_CASE("using an empty channel handle names the kind of handle") {
  runnel::sender<int> tx;
  runnel::receiver<int> rx;
  CHECK_THAT(message_of<std::logic_error>([&] { (void)tx.try_send(1); }),
             Contains("runnel::sender") && Contains("empty"));
  CHECK_THAT(message_of<std::logic_error>([&] { (void)rx.try_recv(); }),
             Contains("runnel::receiver") && Contains("empty"));
}

TEST_CASE("bad stage options name the builder call they were given to") {
  runnel::thread_pool pool{{.threads = 1, .pin = false}};
  auto ident = [](int x) { return x; };
  auto drop = [](int) {};
  CHECK_THAT(message_of<std::invalid_argument>(
                 [&] { (void)runnel::pipeline{pool}.source(none).stage(ident, {.workers = 0}); }),
             Contains("runnel::pipeline::stage") && Contains("stage_options::workers"));
  CHECK_THAT(message_of<std::invalid_argument>(
                 [&] { (void)runnel::pipeline{pool}.source(none).sink(drop, {.batch = 0}); }),
             Contains("runnel::pipeline::sink") && Contains("stage_options::batch"));
  CHECK_THAT(message_of<std::invalid_argument>(
                 [&] { (void)runnel::pipeline{pool}.source(none, {.workers = 2}); }),
             Contains("runnel::pipeline::source") && Contains("stage_options::workers must be 1"));
  CHECK_THAT(message_of<std::invalid_argument>(
                 [&] { (void)runnel::pipeline{pool}.source(none, {.capacity = 0}); }),
             Contains("runnel::pipeline::source") && Contains("stage_options::capacity"));
  // The output channel of a node is made when the next node is added.
  const auto big = message_of<std::length_error>(
      [&] { (void)runnel::pipeline{pool}.source(none, {.capacity = huge}).sink(drop); });
  CHECK_THAT(big, Contains("runnel::pipeline::sink") && Contains("stage_options::capacity"));
  CHECK_THAT(big, !Contains("mpmc_queue"));
}

TEST_CASE("empty channel handles given to the pipeline name the call") {
  runnel::thread_pool pool{{.threads = 1, .pin = false}};
  CHECK_THAT(message_of<std::invalid_argument>(
                 [&] { (void)runnel::pipeline{pool}.from(runnel::receiver<int>{}); }),
             Contains("runnel::pipeline::from"));
  CHECK_THAT(message_of<std::invalid_argument>(
                 [&] { (void)runnel::pipeline{pool}.source(none).to(runnel::sender<int>{}); }),
             Contains("runnel::pipeline::to"));
  CHECK_THAT(message_of<std::invalid_argument>(
                 [&] { (void)runnel::produce(pool, runnel::sender<int>{}, none); }),
             Contains("runnel::produce"));
  CHECK_THAT(message_of<std::invalid_argument>(
                 [&] { (void)runnel::consume(pool, runnel::receiver<int>{}, [](int) {}); }),
             Contains("runnel::consume"));
  runnel::receiver<int> rx = runnel::make_channel<int>(4).second;
  CHECK_THAT(message_of<std::invalid_argument>([&] { (void)runnel::consume(pool, rx, [](int) {}, 0); }),
             Contains("runnel::consume") && Contains("stage_options::workers"));
}

TEST_CASE("misuse of a pipeline builder, plan or handle names the method") {
  runnel::thread_pool pool{{.threads = 1, .pin = false}};
  auto drop = [](int) {};

  auto flow = runnel::pipeline{pool}.source(none);
  auto plan = flow.sink(drop);
  CHECK_THAT(message_of<std::logic_error>([&] { (void)flow.sink(drop); }),
             Contains("runnel::pipeline::sink") && Contains("already used"));

  auto handle = plan.run();
  CHECK_THAT(message_of<std::logic_error>([&] { (void)plan.run(); }),
             Contains("runnel::pipeline_plan::run") && Contains("already run"));
  handle.wait();

  runnel::pipeline_handle empty;
  CHECK_THAT(message_of<std::logic_error>([&] { empty.wait(); }),
             Contains("runnel::pipeline_handle::wait") && Contains("empty"));
}

TEST_CASE("wait() on a worker of the pipeline's pool names pipeline_handle::wait") {
  runnel::thread_pool pool{{.threads = 1, .pin = false}};
  auto [tx, rx] = runnel::make_channel<int>(4);
  auto handle = runnel::consume(pool, rx, [](int) {});
  std::future<std::string> msg = pool.submit([&] {
    return message_of<std::logic_error>([&] { handle.wait(); });
  });
  CHECK_THAT(msg.get(), Contains("runnel::pipeline_handle::wait") && Contains("worker"));
  tx.close();
  handle.wait();
}
