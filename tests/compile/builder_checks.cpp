// Compiled by the compile_* tests in tests/compile/CMakeLists.txt.
//   TYPE_MISTAKES: each statement is one mistake in building a pipeline; the
//     compiler must report each in runnel's words, naming both types, and
//     nothing else (no screens of invoke_result errors).
//   DISCARDED_RESULTS: each statement ignores a result that must not be
//     ignored; at -Werror each must be an error carrying runnel's reason.
//   neither: the same calls done right must compile warning-free, which shows
//     the command itself is sound.
// Independent template instantiations, so one compile reports every case.
#include <runnel/channel.hpp>
#include <runnel/mpmc_queue.hpp>
#include <runnel/pipeline.hpp>
#include <runnel/spsc_queue.hpp>
#include <runnel/thread_pool.hpp>

#include <optional>
#include <string>

struct Parsed {
  int code = 0;
};

namespace {

std::optional<std::string> no_lines() { return std::nullopt; }

}  // namespace

int main() {
  runnel::thread_pool pool{{.threads = 1, .pin = false}};
  int total = 0;
  auto [tx, rx] = runnel::make_channel<Parsed>(8);
  auto [stx, srx] = runnel::make_channel<std::string>(8);
  runnel::mpmc_queue<int> mq(8);
  runnel::spsc_queue<int> sq(8);

#if defined(TYPE_MISTAKES)
  // The stage takes Parsed, the source sends std::string.
  auto h1 = runnel::pipeline{pool}.source(no_lines).stage([](Parsed p) { return p.code; })
                .sink([&](int c) { total += c; }).run();
  auto h2 = runnel::pipeline{pool}.source(no_lines).sink([&](const Parsed& p) { total += p.code; }).run();
  auto h3 = runnel::pipeline{pool}.source(no_lines).to(tx).run();
  auto h4 = runnel::pipeline{pool}.source([] { return 1; }).sink([&](int c) { total += c; }).run();
  auto h5 = runnel::pipeline{pool}.source([](int x) -> std::optional<int> { return x; })
                .sink([&](int c) { total += c; }).run();
#elif defined(DISCARDED_RESULTS)
  // The temporary handle's destructor would cancel the run at once.
  runnel::pipeline{pool}.source(no_lines).sink([&](const std::string& s) { total += int(s.size()); }).run();
  runnel::pipeline{pool}.source(no_lines).sink([&](const std::string& s) { total += int(s.size()); });
  runnel::produce(pool, stx, no_lines);
  stx.try_send("x");
  srx.try_recv();
  runnel::make_channel<std::string>(8);
  pool.submit([] { return 1; });
  mq.try_push(1);
  sq.try_push(1);
#else
  auto h1 = runnel::pipeline{pool}
                .source(no_lines)
                .stage([](const std::string& s) { return Parsed{static_cast<int>(s.size())}; })
                .to(tx)
                .run();
  h1.wait();
  while (auto r = rx.try_recv()) total += r->code;
  auto h2 = runnel::produce(pool, stx, no_lines);
  h2.wait();
  if (stx.try_send("x") && srx.try_recv()) ++total;
  auto [unused_tx, unused_rx] = runnel::make_channel<std::string>(8);
  total += pool.submit([] { return 1; }).get();
  if (mq.try_push(1) && sq.try_push(1)) ++total;
#endif
  return total >= 0 ? 0 : 1;
}
