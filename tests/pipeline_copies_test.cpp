// A message the pipeline owns is moved, never copied, whatever the signature
// of the function that takes it: by value, T&&, const T&, T&, generic
// (auto / auto&& / const auto&), a function pointer, std::function; stages,
// filters, ordered parallel stages and sinks. Move-only messages still work
// with every signature that can take them.
#include <runnel/pipeline.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>

using runnel::pipeline;
using runnel::stage_options;
using runnel::thread_pool;

namespace {

std::atomic<std::uint64_t> copies{0};

// Counts every copy (construction and assignment); moves are free.
struct counted {
  std::uint64_t v = 0;
  counted() = default;
  explicit counted(std::uint64_t x) : v(x) {}
  counted(const counted& o) : v(o.v) { copies.fetch_add(1, std::memory_order_relaxed); }  // Relaxed: a count read after wait().
  counted& operator=(const counted& o) {
    v = o.v;
    copies.fetch_add(1, std::memory_order_relaxed);  // Relaxed: as above.
    return *this;
  }
  counted(counted&&) noexcept = default;
  counted& operator=(counted&&) noexcept = default;
  ~counted() = default;
};

constexpr std::uint64_t n_messages = 5000;

auto counted_source() {
  return [i = std::uint64_t{0}]() mutable -> std::optional<counted> {
    if (i == n_messages) return std::nullopt;
    return counted(i++);
  };
}

runnel::pool_options two_workers() {
  runnel::pool_options o;
  o.threads = 2;
  o.pin = false;
  return o;
}

// Runs source -> stage(fn, opts) -> sink(by value) and checks the exact
// sum and that no message was copied.
template <class F>
void check_stage(F fn, stage_options opts = {}) {
  thread_pool pool(two_workers());
  copies = 0;
  std::uint64_t sum = 0, n = 0;
  auto run = pipeline{pool}
                 .source(counted_source())
                 .stage(std::move(fn), std::move(opts))
                 .sink([&](counted c) { sum += c.v; ++n; })
                 .run();
  run.wait();
  CHECK(n == n_messages);
  CHECK(sum == n_messages * (n_messages - 1) / 2);
  CHECK(copies.load() == 0);
}

counted plus_zero_by_value(counted c) { return c; }

}  // namespace

TEST_CASE("A stage taking its message by value receives it moved, not copied", "[pipeline][copies]") {
  check_stage([](counted c) { return c; });
  check_stage([](counted c) { return c; }, {.workers = 2});
  check_stage([](counted c) { return c; }, {.workers = 2, .ordered = true});
  check_stage([](const counted c) { return counted(c.v); });
}

TEST_CASE("A stage taking T&&, const T& or T& copies no message", "[pipeline][copies]") {
  check_stage([](counted&& c) { return std::move(c); });
  check_stage([](const counted& c) { return counted(c.v); });
  check_stage([](counted& c) { return std::move(c); }, {.workers = 2, .ordered = true});
}

TEST_CASE("Generic lambdas, function pointers and std::function copy no message", "[pipeline][copies]") {
  check_stage([](auto c) { return c; });
  check_stage([](auto&& c) { return counted(c.v); });
  check_stage([](const auto& c) { return counted(c.v); });
  check_stage(&plus_zero_by_value);
  check_stage(std::function<counted(counted)>([](counted c) { return c; }));
  check_stage([](counted c) mutable noexcept { return c; });
}

TEST_CASE("A filter taking its message by value copies no message", "[pipeline][copies]") {
  check_stage([](counted c) -> std::optional<counted> { return c; });
  check_stage([](counted c) -> std::optional<counted> { return c; }, {.workers = 2, .ordered = true});
}

TEST_CASE("A sink copies no message, for every signature", "[pipeline][copies]") {
  thread_pool pool(two_workers());
  std::uint64_t sum = 0;
  const auto run_with = [&](auto sink_fn, std::size_t workers) {
    copies = 0;
    sum = 0;
    auto run = pipeline{pool}.source(counted_source()).sink(sink_fn, {.workers = workers}).run();
    run.wait();
    CHECK(copies.load() == 0);
  };
  std::atomic<std::uint64_t> asum{0};
  run_with([&](counted c) { sum += c.v; }, 1);
  CHECK(sum == n_messages * (n_messages - 1) / 2);
  run_with([&](counted&& c) { sum += c.v; }, 1);
  CHECK(sum == n_messages * (n_messages - 1) / 2);
  run_with([&](const counted& c) { sum += c.v; }, 1);
  CHECK(sum == n_messages * (n_messages - 1) / 2);
  run_with([&](auto c) { sum += c.v; }, 1);
  CHECK(sum == n_messages * (n_messages - 1) / 2);
  run_with([&](counted c) { asum.fetch_add(c.v); }, 2);
  CHECK(asum.load() == n_messages * (n_messages - 1) / 2);
}

TEST_CASE("Move-only messages pass through by value, T&& and const T& functions", "[pipeline][copies]") {
  thread_pool pool(two_workers());
  std::uint64_t i = 0, sum = 0;
  auto run = pipeline{pool}
                 .source([&]() -> std::optional<std::unique_ptr<std::uint64_t>> {
                   if (i == n_messages) return std::nullopt;
                   return std::make_unique<std::uint64_t>(i++);
                 })
                 .stage([](std::unique_ptr<std::uint64_t> p) { return p; }, {.workers = 2, .ordered = true})
                 .stage([](std::unique_ptr<std::uint64_t>&& p) { return std::move(p); })
                 .stage([](const std::unique_ptr<std::uint64_t>& p) { return *p; })
                 .sink([&](std::uint64_t v) { sum += v; })
                 .run();
  run.wait();
  CHECK(sum == n_messages * (n_messages - 1) / 2);
}
