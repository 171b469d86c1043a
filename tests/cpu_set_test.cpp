// pool/cpu_set.hpp's file reading (the quota parsers are covered in
// thread_pool_test.cpp): cgroup and proc files are read with POSIX read(),
// which must return the whole file however many reads it takes. And
// confining a thread to a set of CPUs (pin_current_thread is the set of one).
#include <catch2/catch.hpp>

#include <runnel/pool/cpu_set.hpp>

#include <sched.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>
#include <unistd.h>

TEST_CASE("read_file returns a file's exact contents, across several reads") {
  char path[] = "/tmp/runnel_cpu_set_test_XXXXXX";
  const int fd = ::mkstemp(path);
  REQUIRE(fd >= 0);
  std::string content;
  for (int i = 0; content.size() < 10000; ++i) content += "line " + std::to_string(i) + "\n";
  REQUIRE(::write(fd, content.data(), content.size()) == static_cast<ssize_t>(content.size()));
  ::close(fd);

  const auto got = runnel::detail::cgroup::read_file(path);
  ::unlink(path);
  REQUIRE(got.has_value());
  CHECK(got->size() == content.size());  // more than one 4096-byte read
  CHECK(*got == content);
}

TEST_CASE("read_file of a missing file or a directory is nullopt") {
  CHECK_FALSE(runnel::detail::cgroup::read_file("/nonexistent/runnel/cpu.max").has_value());
  CHECK_FALSE(runnel::detail::cgroup::read_file("/").has_value());
}

TEST_CASE("read_file reads a proc file, whose size is reported as 0") {
  const auto got = runnel::detail::cgroup::read_file("/proc/self/status");
  REQUIRE(got.has_value());
  CHECK(got->find("Cpus_allowed") != std::string::npos);
}

namespace {

// The calling thread's affinity mask as ascending CPU ids.
std::vector<int> mask_of_this_thread() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cpus;
  if (::sched_getaffinity(0, sizeof set, &set) != 0) return cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  return cpus;
}

}  // namespace

TEST_CASE("confine_current_thread sets exactly the listed CPUs and refuses an empty list or a negative id") {
  const std::vector<int> allowed = runnel::detail::affinity_cpus();
  // In threads of their own, so the test's main thread keeps its mask.
  bool empty_ok = true, negative_ok = true, first_ok = false, one_ok = false;
  std::vector<int> after_refusals, after_first, after_pin;
  std::thread([&] {
    empty_ok = runnel::detail::confine_current_thread({});
    const int bad[] = {allowed[0], -1};
    negative_ok = runnel::detail::confine_current_thread(bad);
    after_refusals = mask_of_this_thread();
    const std::vector<int> first(allowed.begin(), allowed.begin() + (allowed.size() > 1 ? 2 : 1));
    first_ok = runnel::detail::confine_current_thread(first);
    after_first = mask_of_this_thread();
    one_ok = runnel::detail::pin_current_thread(allowed.back());
    after_pin = mask_of_this_thread();
  }).join();
  CHECK_FALSE(empty_ok);
  CHECK_FALSE(negative_ok);
  CHECK(after_refusals == allowed);
  CHECK(first_ok);
  CHECK(after_first == std::vector<int>(allowed.begin(), allowed.begin() + (allowed.size() > 1 ? 2 : 1)));
  CHECK(one_ok);
  CHECK(after_pin == std::vector<int>{allowed.back()});
}
