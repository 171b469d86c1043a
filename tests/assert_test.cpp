// RUNNEL_ASSERT: a broken invariant stops the program with a line that names
// it; a kept one costs nothing and says nothing. Forced on here so that the
// Release build of this test checks the macro too (elsewhere NDEBUG turns it
// off); each failing check runs in a forked child so the abort is observable.
#define RUNNEL_ASSERTS 1
#include <runnel/detail/assert.hpp>

#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <string>

namespace {

struct child_result {
  int signal = 0;     // the signal that ended the child, 0 when it exited
  int exit_code = -1;
  std::string err;    // what it wrote to stderr
};

// Runs f in a child process whose stderr goes to a pipe.
template <class F>
child_result in_child(F f) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    std::signal(SIGABRT, SIG_DFL);  // the test framework's handler would report the abort as its own failure
    ::dup2(fds[1], 2);
    ::close(fds[0]);
    ::close(fds[1]);
    f();
    ::_exit(0);
  }
  ::close(fds[1]);
  child_result r;
  char buf[512];
  ssize_t n = 0;
  while ((n = ::read(fds[0], buf, sizeof buf)) > 0) r.err.append(buf, static_cast<std::size_t>(n));
  ::close(fds[0]);
  int st = 0;
  REQUIRE(::waitpid(pid, &st, 0) == pid);
  if (WIFSIGNALED(st)) r.signal = WTERMSIG(st);
  if (WIFEXITED(st)) r.exit_code = WEXITSTATUS(st);
  return r;
}

}  // namespace

TEST_CASE("a broken invariant aborts with the expression, the reason and the place", "[assert]") {
  const auto r = in_child([] {
    const int lanes_active = 2;
    RUNNEL_ASSERT(lanes_active <= 1, "a lane is activated at most once");
  });
  CHECK(r.signal == SIGABRT);
  CHECK_THAT(r.err, Catch::Matchers::Contains("invariant broken at"));
  CHECK_THAT(r.err, Catch::Matchers::Contains("assert_test.cpp:"));
  CHECK_THAT(r.err, Catch::Matchers::Contains("a lane is activated at most once"));
  CHECK_THAT(r.err, Catch::Matchers::Contains("lanes_active <= 1"));
}

TEST_CASE("a kept invariant neither aborts nor prints, and its condition runs once", "[assert]") {
  const auto r = in_child([] {
    int evaluated = 0;
    RUNNEL_ASSERT(++evaluated == 1, "evaluated once");
    if (evaluated != 1) ::_exit(3);
  });
  CHECK(r.signal == 0);
  CHECK(r.exit_code == 0);
  CHECK(r.err.empty());
}
