// detail/cpu_set.hpp's file reading (the quota parsers are covered in
// thread_pool_test.cpp): cgroup and proc files are read with POSIX read(),
// which must return the whole file however many reads it takes.
#include <catch2/catch.hpp>

#include <runnel/detail/cpu_set.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>
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
