// Instructions per operation on one thread, counted by callgrind: a figure
// that holds on a busy machine, where timings do not. op_instructions.sh
// builds this against an include directory (this checkout's, or another's)
// and prints the counts, so two versions of the headers can be compared.
#include <runnel/runnel.hpp>

#include <cstdint>
#include <cstdio>
#include <cstring>

namespace {

constexpr int ops = 1'000'000;

std::uint64_t ring() {
  runnel::mpmc_queue<std::uint64_t> q{1024};
  std::uint64_t sum = 0;
  for (int i = 0; i < ops; ++i) {
    (void)q.try_push(std::uint64_t(i));
    std::uint64_t v = 0;
    (void)q.try_pop(v);
    sum += v;
  }
  return sum;
}

std::uint64_t channel_try() {
  auto [tx, rx] = runnel::make_channel<std::uint64_t>(1024);
  std::uint64_t sum = 0;
  for (int i = 0; i < ops; ++i) {
    (void)tx.try_send(std::uint64_t(i));
    auto v = rx.try_recv();
    sum += *v;
  }
  return sum;
}

std::uint64_t channel_blocking() {
  auto [tx, rx] = runnel::make_channel<std::uint64_t>(1024);
  std::uint64_t sum = 0;
  for (int i = 0; i < ops; ++i) {
    (void)tx.send(std::uint64_t(i));
    auto v = rx.recv();
    sum += *v;
  }
  return sum;
}

// One worker, so the count is nearly the same run to run (the waiting
// thread's spin before it parks still varies a little).
std::uint64_t task_group_run() {
  runnel::thread_pool pool{runnel::pool_options{.threads = 1}};
  std::uint64_t sum = 0;
  for (int r = 0; r < ops / 1000; ++r) {
    runnel::task_group g{pool};
    for (int i = 0; i < 1000; ++i) g.run([&sum] { ++sum; });
    g.wait();
  }
  return sum;
}

}  // namespace

int main(int argc, char** argv) {
  const char* what = argc > 1 ? argv[1] : "";
  std::uint64_t r = 0;
  if (!std::strcmp(what, "ring")) r = ring();
  else if (!std::strcmp(what, "channel_try")) r = channel_try();
  else if (!std::strcmp(what, "channel_blocking")) r = channel_blocking();
  else if (!std::strcmp(what, "task_group_run")) r = task_group_run();
  else {
    std::fprintf(stderr, "usage: op_instructions ring|channel_try|channel_blocking|task_group_run\n");
    return 2;
  }
  std::printf("%s %llu\n", what, static_cast<unsigned long long>(r));
  return 0;
}
