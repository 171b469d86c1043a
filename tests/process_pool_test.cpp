// runnel::process_pool: exact results through 1..4 worker processes, crashes
// (SIGSEGV every k-th message, random SIGKILLs, hung workers) with nothing
// lost and exactly the poison messages reported, the parent's death, and
// the error paths.
//
// Each pool is constructed while the test process has one thread (the rule
// process_pool checks): CTest runs every test case in its own process, and
// in a whole-binary run every earlier thread has been joined by then.
// RUNNEL_PROCESS_LONG=1 makes the random-SIGKILL run 1,000,000 messages.
#include <catch2/catch.hpp>

#include <runnel/pipeline.hpp>
#include <runnel/process_pool.hpp>
#include <runnel/thread_pool.hpp>

#include <atomic>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <filesystem>
#include <fstream>
#include <future>

#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

namespace {

using u64 = std::uint64_t;

u64 square_plus_one(u64 x) { return x * x + 1; }

// Runs `n` messages 0..n-1 through `pool` by submit(); returns each result
// (value or error), indexed by message, after the pool is destroyed.
struct outcome {
  std::vector<std::optional<u64>> value;
  std::vector<std::exception_ptr> error;
  std::vector<int> results;  // how many results each message got
};

template <class Pool>
void submit_all(Pool& pool, u64 n, outcome& out) {
  out.value.assign(n, std::nullopt);
  out.error.assign(n, nullptr);
  out.results.assign(n, 0);
  for (u64 i = 0; i < n; ++i) {
    // The callbacks run on the supervisor thread only; the test reads the
    // vectors after the pool's destructor joined it.
    pool.submit(i, [&out, i](runnel::process_result<u64>&& r) {
      ++out.results[i];
      if (r.error)
        out.error[i] = r.error;
      else
        out.value[i] = *r.value;
    });
  }
}

// Every message 0..n-1 got exactly one result, and it is its reply.
void require_every_reply(const outcome& out, u64 n) {
  for (u64 i = 0; i < n; ++i) {
    REQUIRE(out.results[i] == 1);
    REQUIRE(out.value[i].has_value());
    REQUIRE(*out.value[i] == square_plus_one(i));
  }
}

template <class E>
const E* error_as(const std::exception_ptr& e, E& storage) {
  try {
    std::rethrow_exception(e);
  } catch (const E& x) {
    storage = x;
    return &storage;
  } catch (...) {
    return nullptr;
  }
}

bool process_gone(pid_t pid) { return ::kill(pid, 0) != 0 && errno == ESRCH; }

// The state letter of /proc/<pid>/stat ('S': sleeping in the kernel).
char process_state(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(f, line);
  const auto close = line.rfind(')');
  return close == std::string::npos || close + 2 >= line.size() ? '?' : line[close + 2];
}

// Memory shared with every process forked after it (workers included):
// `n` counters, zeroed; unmapped at scope exit.
struct shared_counters {
  explicit shared_counters(std::size_t n) : n(n) {
    void* p = ::mmap(nullptr, bytes(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    REQUIRE(p != MAP_FAILED);
    at = static_cast<std::atomic<std::uint32_t>*>(p);
  }
  ~shared_counters() { ::munmap(at, bytes()); }
  shared_counters(const shared_counters&) = delete;
  shared_counters& operator=(const shared_counters&) = delete;
  std::size_t bytes() const { return n * sizeof(std::atomic<std::uint32_t>); }
  std::size_t n;
  std::atomic<std::uint32_t>* at;
};

}  // namespace

TEST_CASE("process_pool: every message gets its exact result through 1, 2, 3 and 4 worker processes", "[process]") {
  for (std::size_t workers = 1; workers <= 4; ++workers) {
    CAPTURE(workers);
    constexpr u64 n = 20'000;
    outcome out;
    runnel::process_pool_stats st;
    {
      runnel::process_pool<u64, u64> pool(square_plus_one, {.workers = workers});
      REQUIRE(pool.worker_pids().size() <= workers);
      submit_all(pool, n, out);
      REQUIRE(pool.call(7).get() == 50);
      pool.drain();
      st = pool.stats();
    }
    require_every_reply(out, n);
    CHECK(st.submitted == n + 1);
    CHECK(st.crashed == 0);
    CHECK(st.restarts == 0);
  }
}

TEST_CASE("process_pool: many threads calling at once (more threads than cores) each get their own replies", "[process]") {
  runnel::process_pool<u64, u64> pool(square_plus_one, {.workers = 3, .depth = 2, .queue_capacity = 2});
  constexpr int threads = 6;
  constexpr u64 per_thread = 3'000;
  std::atomic<u64> wrong{0}, right{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      for (u64 i = 0; i < per_thread; ++i) {
        const u64 x = static_cast<u64>(t) * 1'000'000 + i;
        if (pool.call(x).get() == square_plus_one(x))
          right.fetch_add(1);
        else
          wrong.fetch_add(1);
      }
    });
  for (auto& t : ts) t.join();
  CHECK(wrong.load() == 0);
  CHECK(right.load() == threads * per_thread);
  CHECK(pool.stats().completed == threads * per_thread);
}

TEST_CASE("process_pool: a worker that segfaults on every k-th message loses nothing and reports exactly those messages with SIGSEGV", "[process]") {
  constexpr u64 n = 3'000, k = 97;
  outcome out;
  runnel::process_pool_stats st;
  {
    runnel::process_pool<u64, u64> pool(
        [](u64 x) -> u64 {
          if (x % k == k - 1) ::raise(SIGSEGV);
          return square_plus_one(x);
        },
        {.workers = 2, .max_attempts = 2});
    submit_all(pool, n, out);
    REQUIRE(pool.call(1).get() == 2);  // the pool is still serving
    pool.drain();
    st = pool.stats();
  }
  u64 poison = 0;
  for (u64 i = 0; i < n; ++i) {
    CAPTURE(i);
    REQUIRE(out.results[i] == 1);
    if (i % k == k - 1) {
      ++poison;
      REQUIRE(out.error[i]);
      runnel::process_crash c(0, 0, 0, false);
      const auto* e = error_as(out.error[i], c);
      REQUIRE(e != nullptr);
      CHECK(e->signal == SIGSEGV);
      CHECK(e->attempts == 2);
      CHECK_FALSE(e->hung);
    } else {
      REQUIRE(out.value[i].has_value());
      REQUIRE(*out.value[i] == square_plus_one(i));
    }
  }
  CHECK(st.crashed == poison);
  CHECK(st.restarts == 2 * poison);  // each poison message killed two workers
  CHECK(st.retried == poison);
}

TEST_CASE("process_pool: SIGKILLs of random workers during a run lose no message and duplicate none", "[process]") {
  const bool long_run = std::getenv("RUNNEL_PROCESS_LONG") != nullptr;
  const u64 n = long_run ? 1'000'000 : 10'000;
  outcome out;
  runnel::process_pool_stats st;
  u64 kills = 0;
  {
    runnel::process_pool<u64, u64> pool(
        [](u64 x) -> u64 {
          // A little work, so that kills land on held messages too.
          volatile u64 acc = x;
          for (int i = 0; i < 2'000; ++i) acc = acc * 6364136223846793005ULL + 1442695040888963407ULL;
          return square_plus_one(x);
        },
        {.workers = 3, .max_attempts = 1'000'000});
    std::atomic<bool> stop{false};
    std::thread killer([&] {
      std::mt19937 rng(12345);
      // One kill at a time: the next only once the last victim has been
      // replaced, so that a slow fork (sanitizers) does not turn the run
      // into a string of restarts.
      while (!stop.load()) {
        auto pids = pool.worker_pids();
        if (pids.size() == 3 && pool.stats().restarts == kills) {
          ::kill(pids[rng() % pids.size()], SIGKILL);
          ++kills;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    });
    submit_all(pool, n, out);
    REQUIRE(pool.call(3).get() == 10);
    pool.drain();
    stop.store(true);
    killer.join();
    st = pool.stats();
  }
  require_every_reply(out, n);
  INFO("kills sent " << kills << ", restarts " << st.restarts << ", retried " << st.retried);
  CHECK(kills > 0);
  CHECK(st.restarts > 0);
  CHECK(st.crashed == 0);
}

TEST_CASE("process_pool: a hung worker is killed after hang_timeout and its message reported as hung with SIGKILL", "[process]") {
  constexpr u64 n = 200, stuck = 13;
  outcome out;
  runnel::process_pool_stats st;
  {
    runnel::process_pool<u64, u64> pool(
        [](u64 x) -> u64 {
          if (x == stuck)
            for (;;) ::pause();
          return square_plus_one(x);
        },
        {.workers = 2, .max_attempts = 2, .hang_timeout = std::chrono::milliseconds(400)});
    submit_all(pool, n, out);
    pool.drain();
    st = pool.stats();
  }
  CHECK(st.hung_kills == 2);
  CHECK(st.crashed == 1);
  for (u64 i = 0; i < n; ++i) {
    REQUIRE(out.results[i] == 1);
    if (i == stuck) {
      runnel::process_crash c(0, 0, 0, false);
      const auto* e = error_as(out.error[i], c);
      REQUIRE(e != nullptr);
      CHECK(e->hung);
      CHECK(e->signal == SIGKILL);
      CHECK(e->attempts == 2);
    } else {
      REQUIRE(out.value[i].has_value());
      REQUIRE(*out.value[i] == square_plus_one(i));
    }
  }
}

TEST_CASE("process_pool: when the parent is SIGKILLed, its launcher and workers die too (no orphans)", "[process]") {
  // This process becomes the reaper of orphans, so it can reap (and so see
  // the death of) the launcher and the workers once their parent is gone.
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::close(fds[0]);
    {
      runnel::process_pool<u64, u64> pool(square_plus_one, {.workers = 3});
      while (pool.worker_pids().size() < 3) ::usleep(1000);
      std::vector<pid_t> pids = pool.worker_pids();
      pids.push_back(pool.launcher_pid());
      if (::write(fds[1], pids.data(), pids.size() * sizeof(pid_t)) < 0) ::_exit(2);
      for (;;) ::pause();  // killed here, the pool never destroyed
    }
  }
  ::close(fds[1]);
  pid_t pids[4] = {};
  std::size_t got = 0;
  while (got < sizeof pids) {
    const auto r = ::read(fds[0], reinterpret_cast<char*>(pids) + got, sizeof pids - got);
    REQUIRE(r > 0);
    got += static_cast<std::size_t>(r);
  }
  ::close(fds[0]);
  REQUIRE(::kill(child, SIGKILL) == 0);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  std::set<pid_t> waiting(std::begin(pids), std::end(pids));
  std::map<pid_t, int> how;
  // Reap the orphans as they die (generously bounded: not a timing claim).
  for (int i = 0; i < 20'000 && !waiting.empty(); ++i) {
    const pid_t p = ::waitpid(-1, &status, WNOHANG);
    if (p > 0) {
      waiting.erase(p);
      how[p] = status;
    } else {
      ::usleep(1000);
    }
  }
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
  CHECK(waiting.empty());
  for (pid_t p : pids) {
    CAPTURE(p);
    REQUIRE(how.count(p) == 1);
    CAPTURE(how[p]);
    // SIGKILL from PR_SET_PDEATHSIG, or, for a worker forked just before
    // the launcher died (listed alive, not yet at its prctl), exit 127 from
    // the getppid() check after it.
    const bool killed = WIFSIGNALED(how[p]) && WTERMSIG(how[p]) == SIGKILL;
    const bool late_check = p != pids[3] && WIFEXITED(how[p]) && WEXITSTATUS(how[p]) == 127;
    CHECK((killed || late_check));
  }
}

TEST_CASE("process_pool: destroying the pool leaves no process behind", "[process]") {
  std::vector<pid_t> pids;
  pid_t launcher = 0;
  {
    runnel::process_pool<u64, u64> pool(square_plus_one, {.workers = 2});
    REQUIRE(pool.call(2).get() == 5);
    while (pool.worker_pids().size() < 2) ::usleep(1000);
    pids = pool.worker_pids();
    launcher = pool.launcher_pid();
  }
  // The launcher was reaped by the destructor, the workers by the launcher.
  int status = 0;
  CHECK(::waitpid(launcher, &status, WNOHANG) == -1);
  CHECK(errno == ECHILD);
  CHECK(process_gone(launcher));
  for (pid_t p : pids) CHECK(process_gone(p));
}

TEST_CASE("process_pool: when the launcher is killed, every outstanding message is reported as a crash and submit refuses", "[process]") {
  constexpr u64 n = 8;
  runnel::process_pool<u64, u64> pool(
      [](u64) -> u64 {
        for (;;) ::pause();  // held until the worker dies with the launcher
      },
      {.workers = 2});
  std::vector<runnel::process_future<u64>> fs;
  for (u64 i = 0; i < n; ++i) fs.push_back(pool.call(i));
  while (pool.worker_pids().size() < 2) ::usleep(1000);
  REQUIRE(::kill(pool.launcher_pid(), SIGKILL) == 0);
  for (auto& f : fs) {
    // A guard against a hang, not a timing claim: the supervisor looks at
    // the launcher every 100 ms while messages are outstanding.
    REQUIRE(f.wait_for(std::chrono::seconds(30)) == std::future_status::ready);
    try {
      (void)f.get();
      FAIL("a message got a reply from a worker that never returns");
    } catch (const runnel::process_crash& e) {
      CHECK(e.signal == SIGKILL);
    }
  }
  CHECK(pool.stats().crashed == n);
  CHECK_THROWS_WITH(pool.call(n), Catch::Matchers::Contains("launcher process died"));
}

TEST_CASE("process_pool: a throwing function is reported as process_error, and the worker keeps serving", "[process]") {
  runnel::process_pool<u64, u64> pool(
      [](u64 x) -> u64 {
        if (x == 5) throw std::runtime_error("five is not allowed");
        return x;
      },
      {.workers = 1});
  auto bad = pool.call(5);
  REQUIRE_THROWS_WITH(bad.get(), "five is not allowed");
  CHECK(pool.call(6).get() == 6);
  CHECK(pool.stats().restarts == 0);
  CHECK(pool.stats().failed == 1);
}

TEST_CASE("process_pool: messages cross as strings, and a request or reply beyond slot_size is an error", "[process]") {
  runnel::process_pool<std::string, std::string> pool(
      [](const std::string& s) { return s == "grow" ? std::string(100, 'x') : s + "!"; },
      {.workers = 1, .slot_size = 64});
  CHECK(pool.call("hi").get() == "hi!");
  CHECK(pool.call(std::string(63, 'a')).get() == std::string(63, 'a') + "!");  // 64 bytes back
  REQUIRE_THROWS_AS(pool.call(std::string(65, 'a')), runnel::process_message_too_large);
  auto big = pool.call("grow");
  REQUIRE_THROWS_AS(big.get(), runnel::process_error);
  CHECK(pool.call("still").get() == "still!");
}

// The wake rules (a worker wakes the parent at depth / 2 left and after its
// last request; a submission wakes it while a ring has room) are what brings
// a reply back: with launcher_check_period at an hour, the supervisor's only
// other reason to wake, a missing wake leaves the test waiting. The waits
// are bounded (a minute) so that a broken rule fails instead of hanging; a
// correct one answers in milliseconds.
constexpr auto hour = std::chrono::milliseconds(3'600'000);
constexpr auto wake_bound = std::chrono::seconds(60);

TEST_CASE("process_pool: a lone message's reply wakes the sleeping parent, call after call", "[process]") {
  // 2 ms of work: the supervisor's watch (microseconds) is over before the
  // reply, so the supervisor sleeps and only a wake brings the reply in.
  auto slow = [](u64 x) {
    ::usleep(2000);
    return square_plus_one(x);
  };
  runnel::process_pool<u64, u64> pool(slow, {.workers = 1, .depth = 8, .launcher_check_period = hour});
  for (u64 i = 0; i < 5; ++i) {
    auto f = pool.call(i);
    REQUIRE(f.wait_for(wake_bound) == std::future_status::ready);
    REQUIRE(f.get() == square_plus_one(i));
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // the pool goes idle between calls
  }
}

TEST_CASE("process_pool: a worker wakes the parent for its first replies when depth / 2 requests are left, not only at the end", "[process]") {
  // Message 4 waits (in the worker) for a byte the parent's callback of
  // message 3 writes: it comes only if the parent collects the replies of
  // 0..3 while the worker still has 4 requests of its ring of 8 left.
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const int rd = fds[0], wr = fds[1];
  {
    auto fn = [rd](u64 x) {
      if (x < 4) ::usleep(1000);  // the supervisor's watch ends before the replies
      char c = 0;
      if (x == 4 && ::read(rd, &c, 1) != 1) ::_exit(3);
      return square_plus_one(x);
    };
    runnel::process_pool<u64, u64> pool(fn, {.workers = 1, .depth = 8, .launcher_check_period = hour});
    std::vector<std::promise<u64>> got(8);
    std::vector<std::future<u64>> replies;
    for (auto& p : got) replies.push_back(p.get_future());
    for (u64 i = 0; i < 8; ++i)
      pool.submit(i, [&got, i, wr](runnel::process_result<u64>&& r) {
        const char c = 1;
        // On the supervisor thread: no Catch assertion here; a failed write
        // shows as message 4's worker exiting (a crash, no value).
        if (i == 3 && ::write(wr, &c, 1) != 1) return got[i].set_value(0);
        got[i].set_value(r.value.value_or(0));
      });
    bool all = true;
    for (auto& f : replies) all = all && f.wait_for(wake_bound) == std::future_status::ready;
    const char unblock[8] = {};
    REQUIRE(::write(wr, unblock, sizeof unblock) == 8);  // frees a worker stuck on message 4 either way
    REQUIRE(all);
    for (u64 i = 0; i < 8; ++i) REQUIRE(replies[i].get() == square_plus_one(i));
  }
  ::close(rd);
  ::close(wr);
}

TEST_CASE("process_pool: bad options and a process that already runs threads are refused", "[process]") {
  auto id = [](u64 x) { return x; };
  using pool_t = runnel::process_pool<u64, u64>;
  CHECK_THROWS_AS(pool_t(id, {.workers = 0}), std::invalid_argument);
  CHECK_THROWS_AS(pool_t(id, {.depth = 0}), std::invalid_argument);
  CHECK_THROWS_AS(pool_t(id, {.slot_size = 0}), std::invalid_argument);
  CHECK_THROWS_AS(pool_t(id, {.max_attempts = 0}), std::invalid_argument);
  CHECK_THROWS_AS(pool_t(id, {.launcher_check_period = std::chrono::milliseconds(0)}), std::invalid_argument);
  std::atomic<bool> stop{false};
  std::thread t([&] {
    while (!stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  CHECK_THROWS_AS(pool_t(id, {}), std::logic_error);
  stop.store(true);
  t.join();
  pool_t ok(id, {.workers = 1});  // one thread again: accepted
  CHECK(ok.call(9).get() == 9);
}

TEST_CASE("process_pool: process_stage in a pipeline delivers every message or hands the crashed ones to the error handler", "[process]") {
  constexpr u64 n = 2'000, k = 101;
  runnel::process_pool<u64, u64> procs(
      [](u64 x) -> u64 {
        if (x % k == 0) ::raise(SIGSEGV);
        return square_plus_one(x);
      },
      {.workers = 2, .max_attempts = 1});
  runnel::thread_pool threads({.threads = 2});
  u64 next = 0, sum = 0, delivered = 0;
  std::mutex m;
  std::set<u64> failed;
  std::vector<int> signals;
  auto run = runnel::pipeline{threads}
                 .source([&]() -> std::optional<u64> {
                   if (next == n) return std::nullopt;
                   return next++;
                 })
                 .stage(runnel::process_stage(procs), {.workers = 4})
                 .sink([&](u64 y) {
                   sum += y;
                   ++delivered;
                 })
                 .on_error([&](const runnel::stage_failure& f) {
                   std::lock_guard lk(m);
                   if (const u64* msg = f.message<u64>()) failed.insert(*msg);
                   try {
                     std::rethrow_exception(f.error);
                   } catch (const runnel::process_crash& c) {
                     signals.push_back(c.signal);
                   } catch (...) {
                     signals.push_back(-1);
                   }
                 })
                 .run();
  run.wait();
  u64 expect_sum = 0;
  std::set<u64> expect_failed;
  for (u64 i = 0; i < n; ++i) {
    if (i % k == 0)
      expect_failed.insert(i);
    else
      expect_sum += square_plus_one(i);
  }
  CHECK(delivered == n - expect_failed.size());
  CHECK(sum == expect_sum);
  CHECK(failed == expect_failed);
  CHECK(signals == std::vector<int>(expect_failed.size(), SIGSEGV));
}

// Runs 0..n-1 through source -> process_stage(procs, max_inflight) -> sink
// on `threads`; the sink counts each value it sees.
struct stage_run {
  std::vector<int> seen;  // by message: replies delivered for it
  u64 wrong = 0;          // replies that are no message's
  std::set<u64> failed;   // messages at the error handler
  std::vector<int> signals;
  runnel::pipeline_stats stats;
  bool finished = false;
};

template <class Pool>
stage_run run_process_stage(Pool& procs, runnel::thread_pool& threads, u64 n, std::size_t max_inflight) {
  stage_run r;
  r.seen.assign(n, 0);
  u64 next = 0;
  std::mutex m;
  auto run = runnel::pipeline{threads}
                 .source([&]() -> std::optional<u64> {
                   if (next == n) return std::nullopt;
                   return next++;
                 })
                 .stage(runnel::process_stage(procs, max_inflight), {.batch = 16})
                 .sink([&](u64 y) {
                   // y = x * x + 1: recover x (exact at these sizes). The
                   // sink runs on a pool thread: counted here, checked after.
                   const u64 x = static_cast<u64>(std::llround(std::sqrt(static_cast<double>(y - 1))));
                   if (x < n && square_plus_one(x) == y) ++r.seen[x];
                   else ++r.wrong;
                 })
                 .on_error([&](const runnel::stage_failure& f) {
                   std::lock_guard lk(m);
                   if (const u64* msg = f.message<u64>()) r.failed.insert(*msg);
                   try {
                     std::rethrow_exception(f.error);
                   } catch (const runnel::process_crash& c) {
                     r.signals.push_back(c.signal);
                   } catch (const runnel::process_error&) {
                     r.signals.push_back(0);
                   } catch (...) {
                     r.signals.push_back(-1);
                   }
                 })
                 .run();
  // A guard against a hang, not a timing: a lost reply would never come.
  r.finished = run.wait_for(std::chrono::seconds(60));
  r.stats = run.stats();
  if (!r.finished) {
    // The run cannot finish (a reply was lost); destroying the handle would
    // wait for it for ever, so it is left behind and the test fails.
    run.cancel();
    static_cast<void>(new runnel::pipeline_handle(std::move(run)));
  }
  return r;
}

TEST_CASE("process_stage: every message reaches the sink exactly once through 1, 2, 3 and 4 worker processes, without a lane a message", "[process]") {
  constexpr u64 n = 2'000;
  for (std::size_t workers = 1; workers <= 4; ++workers) {
    // max_inflight 1 and 3 make the submitter park on its slots again and
    // again; 0 is the default (2 * workers * depth).
    for (std::size_t inflight : {std::size_t{1}, std::size_t{3}, std::size_t{0}}) {
      CAPTURE(workers, inflight);
      runnel::process_pool<u64, u64> procs(square_plus_one, {.workers = workers});
      runnel::thread_pool threads({.threads = 2, .pin = false});
      const stage_run r = run_process_stage(procs, threads, n, inflight);
      REQUIRE(r.finished);
      CHECK(r.wrong == 0);
      for (u64 i = 0; i < n; ++i) REQUIRE(r.seen[i] == 1);
      CHECK(r.failed.empty());
      CHECK(r.stats.produced == n);
      CHECK(r.stats.delivered == n);
      REQUIRE(r.stats.stages.size() == 3);
      CHECK(r.stats.stages[1].in == n);
      CHECK(r.stats.stages[1].out == n);
      CHECK(r.stats.stages[1].failed == 0);
      CHECK(r.stats.stages[1].discarded == 0);
      CHECK(procs.stats().submitted == n);
    }
  }
}

TEST_CASE("process_stage: crashes and throws in the workers reach on_error with the whole message and the right error, everything else the sink", "[process]") {
  constexpr u64 n = 600, crash_every = 97, throw_every = 89;
  runnel::process_pool<u64, u64> procs(
      [](u64 x) -> u64 {
        if (x % crash_every == 0) ::raise(SIGSEGV);
        if (x % throw_every == 0) throw std::runtime_error("no");
        return square_plus_one(x);
      },
      {.workers = 2, .max_attempts = 2});
  runnel::thread_pool threads({.threads = 2, .pin = false});
  const stage_run r = run_process_stage(procs, threads, n, 4);
  REQUIRE(r.finished);
  CHECK(r.wrong == 0);
  std::set<u64> expect_failed;
  std::vector<int> expect_signals;
  for (u64 i = 0; i < n; ++i) {
    const bool crash = i % crash_every == 0, thrown = !crash && i % throw_every == 0;
    if (crash || thrown) expect_failed.insert(i);
    CHECK(r.seen[i] == (crash || thrown ? 0 : 1));
  }
  CHECK(r.failed == expect_failed);
  // The handler sees process_crash (SIGSEGV) for each crash, process_error
  // for each throw, in whatever order they arrive.
  std::multiset<int> got(r.signals.begin(), r.signals.end());
  CHECK(got.count(SIGSEGV) == (n + crash_every - 1) / crash_every);
  CHECK(got.count(0) == expect_failed.size() - (n + crash_every - 1) / crash_every);
  CHECK(got.size() == expect_failed.size());
  CHECK(r.stats.stages[1].in == n);
  CHECK(r.stats.stages[1].failed == expect_failed.size());
  CHECK(r.stats.stages[1].out == n - expect_failed.size());
  CHECK(r.stats.delivered == n - expect_failed.size());
}

TEST_CASE("process_stage: no pool thread waits for a reply: on a one-thread pool another pipeline runs while a worker holds a message", "[process]") {
  // The worker holding message 0 waits until a flag in shared memory is set
  // by the sink of a second pipeline on the same one-thread pool. A stage
  // that held the pool's thread while waiting for the reply would keep the
  // second pipeline from running until the worker gave up (after its
  // generous limit) and replied 0.
  shared_counters flags(2);  // [0]: the worker holds message 0; [1]: the second pipeline ran
  std::atomic<std::uint32_t>* at = flags.at;
  runnel::process_pool<u64, u64> procs(
      [at](u64 x) -> u64 {
        if (x != 0) return square_plus_one(x);
        at[0].store(1, std::memory_order_release);
        const auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(20);
        while (at[1].load(std::memory_order_acquire) == 0) {
          if (std::chrono::steady_clock::now() > limit) return 0;  // never released: the thread was held
          ::usleep(1000);
        }
        return square_plus_one(0);
      },
      {.workers = 1});
  runnel::thread_pool threads({.threads = 1, .pin = false});
  u64 next = 0;
  std::vector<u64> got;
  auto first = runnel::pipeline{threads}
                   .source([&]() -> std::optional<u64> {
                     if (next == 3) return std::nullopt;
                     return next++;
                   })
                   .stage(runnel::process_stage(procs))
                   .sink([&](u64 y) { got.push_back(y); })
                   .run();
  while (at[0].load(std::memory_order_acquire) == 0) ::usleep(1000);  // the worker holds message 0
  bool second_ran = false;
  u64 once = 0;
  auto second = runnel::pipeline{threads}
                    .source([&]() -> std::optional<u64> {
                      if (once++ == 1) return std::nullopt;
                      return u64{1};
                    })
                    .sink([&](u64) {
                      second_ran = true;
                      at[1].store(1, std::memory_order_release);
                    })
                    .run();
  second.wait();
  first.wait();
  CHECK(second_ran);
  std::sort(got.begin(), got.end());
  CHECK(got == std::vector<u64>{square_plus_one(0), square_plus_one(1), square_plus_one(2)});
}

TEST_CASE("process_stage: ordered = true is refused", "[process]") {
  runnel::process_pool<u64, u64> procs(square_plus_one, {.workers = 1});
  runnel::thread_pool threads({.threads = 1, .pin = false});
  u64 next = 0;
  auto src = [&]() -> std::optional<u64> {
    if (next == 1) return std::nullopt;
    return next++;
  };
  CHECK_THROWS_AS(runnel::pipeline{threads}.source(src).stage(runnel::process_stage(procs), {.ordered = true}),
                  std::invalid_argument);
}

TEST_CASE("detail::futex_wait with futex_scope::shared is woken by a futex_wake from another process", "[process]") {
  // The word lives in a MAP_SHARED page; the child sleeps on it, the parent
  // wakes it once the child is asleep. A private futex (FUTEX_PRIVATE_FLAG)
  // is keyed on the address space, so the child would sleep until its
  // (generous) deadline and exit 1.
  shared_counters word(1);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (word.at[0].load(std::memory_order_acquire) == 0) {
      runnel::detail::futex_wait_until(word.at[0], 0, deadline, runnel::detail::futex_scope::shared);
      if (std::chrono::steady_clock::now() >= deadline) ::_exit(1);  // slept to the deadline: never woken
    }
    ::_exit(0);
  }
  // Wait until the child sleeps in the kernel (its only blocking call is the
  // futex wait), so the wake below is what ends its sleep.
  while (process_state(child) != 'S') ::usleep(1000);
  word.at[0].store(1, std::memory_order_release);
  runnel::detail::futex_wake(word.at[0], 1, runnel::detail::futex_scope::shared);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("process::restart_delay: none for the first death, then doubling from restart_backoff up to the cap", "[process]") {
  using std::chrono::milliseconds;
  using std::chrono::nanoseconds;
  const nanoseconds first = milliseconds(10), cap = milliseconds(2000);
  CHECK(runnel::process::restart_delay(0, first, cap) == nanoseconds(0));
  CHECK(runnel::process::restart_delay(1, first, cap) == nanoseconds(0));
  CHECK(runnel::process::restart_delay(2, first, cap) == milliseconds(10));
  CHECK(runnel::process::restart_delay(3, first, cap) == milliseconds(20));
  CHECK(runnel::process::restart_delay(4, first, cap) == milliseconds(40));
  CHECK(runnel::process::restart_delay(9, first, cap) == milliseconds(1280));
  CHECK(runnel::process::restart_delay(10, first, cap) == cap);
  CHECK(runnel::process::restart_delay(4'000'000'000U, first, cap) == cap);  // no overflow
  CHECK(runnel::process::restart_delay(5, nanoseconds(0), cap) == nanoseconds(0));  // backoff off
  CHECK(runnel::process::restart_delay(5, first, milliseconds(15)) == milliseconds(15));
  CHECK(runnel::process::restart_delay(2, milliseconds(30), milliseconds(30)) == milliseconds(30));
}

TEST_CASE("process::next_spin_budget: the supervisor's watch doubles after news up to the cap, halves after none down to 1", "[process]") {
  using runnel::process::next_spin_budget;
  CHECK(next_spin_budget(1, true, 16) == 2);
  CHECK(next_spin_budget(4, true, 16) == 8);
  CHECK(next_spin_budget(16, true, 16) == 16);
  CHECK(next_spin_budget(12, true, 16) == 16);
  CHECK(next_spin_budget(16, false, 16) == 8);
  CHECK(next_spin_budget(3, false, 16) == 1);
  CHECK(next_spin_budget(1, false, 16) == 1);  // never 0: one round before each sleep
  // A supervisor that keeps finding nothing is back to one round within log2(cap) watches.
  unsigned b = 16;
  for (int i = 0; i < 4; ++i) b = next_spin_budget(b, false, 16);
  CHECK(b == 1);
}

TEST_CASE("process_pool: a worker that keeps crashing is restarted with backoff: every death after the first in a row is delayed", "[process]") {
  constexpr u64 n = 6;
  runnel::process_pool_stats st;
  {
    runnel::process_pool<u64, u64> pool(
        [](u64) -> u64 {
          ::raise(SIGSEGV);
          return 0;
        },
        {.workers = 1,
         .max_attempts = 1,
         .restart_backoff = std::chrono::milliseconds(1),
         .restart_backoff_max = std::chrono::milliseconds(4)});
    for (u64 i = 0; i < n; ++i) REQUIRE_THROWS_AS(pool.call(i).get(), runnel::process_crash);
    st = pool.stats();
  }
  CHECK(st.crashed == n);
  CHECK(st.restarts == n);
  CHECK(st.delayed_restarts == n - 1);
}

TEST_CASE("process_pool: a worker that completes a message between crashes is restarted at once each time", "[process]") {
  constexpr u64 n = 12;
  runnel::process_pool<u64, u64> pool(
      [](u64 x) -> u64 {
        if (x % 2 == 0) ::raise(SIGSEGV);
        return square_plus_one(x);
      },
      {.workers = 1, .max_attempts = 1, .restart_backoff = std::chrono::milliseconds(1),
       .restart_backoff_max = std::chrono::milliseconds(1)});
  for (u64 i = 0; i < n; ++i) {
    auto f = pool.call(i);
    if (i % 2 == 0)
      REQUIRE_THROWS_AS(f.get(), runnel::process_crash);
    else
      REQUIRE(f.get() == square_plus_one(i));
  }
  CHECK(pool.stats().restarts == n / 2);
  CHECK(pool.stats().delayed_restarts == 0);
}

TEST_CASE("process_pool: a backed-off worker stays down until its delay, and stop() restarts it at once to drain", "[process]") {
  runnel::process_pool<u64, u64> pool(
      [](u64 x) -> u64 {
        if (x < 2) ::raise(SIGSEGV);
        return square_plus_one(x);
      },
      {.workers = 1, .max_attempts = 1, .restart_backoff = std::chrono::hours(1),
       .restart_backoff_max = std::chrono::hours(1)});
  REQUIRE_THROWS_AS(pool.call(0).get(), runnel::process_crash);  // first death: restarted at once
  REQUIRE_THROWS_AS(pool.call(1).get(), runnel::process_crash);  // second in a row: an hour's backoff
  auto waiting = pool.call(2);
  // Not a timing claim: with an hour's backoff the message cannot be served
  // now; a pool that ignored the backoff would serve it within this wait.
  CHECK(waiting.wait_for(std::chrono::milliseconds(300)) == std::future_status::timeout);
  CHECK(pool.worker_pids().empty());
  pool.stop();  // cuts the backoff: the accepted message is served
  CHECK(waiting.get() == square_plus_one(2));
  const auto st = pool.stats();
  CHECK(st.restarts == 2);
  CHECK(st.delayed_restarts == 1);
  CHECK(st.completed == 1);
  CHECK(st.crashed == 2);
  REQUIRE_THROWS_AS(pool.call(3), runnel::process_pool_stopped);
}

TEST_CASE("process_pool: the destructor restarts a backed-off worker at once to finish the accepted messages", "[process]") {
  std::optional<u64> reply;
  runnel::process_pool_stats st;
  {
    runnel::process_pool<u64, u64> pool(
        [](u64 x) -> u64 {
          if (x < 2) ::raise(SIGSEGV);
          return square_plus_one(x);
        },
        {.workers = 1, .max_attempts = 1, .restart_backoff = std::chrono::hours(1),
         .restart_backoff_max = std::chrono::hours(1)});
    REQUIRE_THROWS_AS(pool.call(0).get(), runnel::process_crash);
    REQUIRE_THROWS_AS(pool.call(1).get(), runnel::process_crash);  // now an hour's backoff
    // The callback runs on the supervisor thread; read after the destructor joined it.
    pool.submit(2, [&reply](runnel::process_result<u64>&& r) { reply = r.value; });
    st = pool.stats();
  }  // no stop(): the destructor alone must not wait out the hour
  CHECK(st.delayed_restarts == 1);
  REQUIRE(reply.has_value());
  CHECK(*reply == square_plus_one(2));
}

TEST_CASE("process_pool: after request_stop() submit and call throw process_pool_stopped, and accepted messages all get their result", "[process]") {
  constexpr u64 n = 2'000;
  outcome out;
  runnel::process_pool_stats st;
  {
    runnel::process_pool<u64, u64> pool(square_plus_one, {.workers = 2, .queue_capacity = 4'096});
    submit_all(pool, n, out);
    pool.request_stop();
    CHECK(pool.stop_requested());
    REQUIRE_THROWS_AS(pool.call(1), runnel::process_pool_stopped);
    REQUIRE_THROWS_AS(pool.submit(1, [](runnel::process_result<u64>&&) {}), runnel::process_pool_stopped);
    pool.stop();
    pool.stop();  // a second stop (and the destructor after it) does nothing more
    st = pool.stats();
  }
  require_every_reply(out, n);
  CHECK(st.submitted == n);
  CHECK(st.completed == n);
}

// The program's side of a graceful stop, as a service would write it.
namespace {
runnel::process_pool<u64, u64>* term_pool = nullptr;
extern "C" void on_term(int) { term_pool->request_stop(); }

struct term_report {
  u64 accepted = 0, results = 0, wrong = 0, runs_not_once = 0, runs_beyond = 0;
  runnel::process_pool_stats st{};
  int left_alive = 0;
};
}  // namespace

TEST_CASE("process_pool: SIGTERM to the whole process group drains: every accepted message run once and answered, none lost", "[process]") {
  // A child process plays the service: its own process group (so that the
  // pool's launcher and workers are in it), a SIGTERM handler that calls
  // request_stop(), a submit loop until the pool refuses, then stop(). The
  // test sends SIGTERM to the group, as systemd or a shell would, once
  // messages are flowing. The workers count each run of each message in
  // shared memory.
  constexpr u64 max_messages = 2'000'000;
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::close(fds[0]);
    ::setpgid(0, 0);
    term_report rep;
    {
      shared_counters runs(max_messages);
      std::vector<std::optional<u64>> value(max_messages);
      std::vector<std::uint8_t> results(max_messages);
      std::atomic<u64> delivered{0};
      runnel::process_pool<u64, u64> pool(
          [&runs](u64 x) -> u64 {
            runs.at[x].fetch_add(1, std::memory_order_relaxed);
            volatile u64 acc = x;  // a little work, so that messages are held when the signal comes
            for (int i = 0; i < 2'000; ++i) acc = acc * 6364136223846793005ULL + 1442695040888963407ULL;
            return square_plus_one(x);
          },
          {.workers = 3, .queue_capacity = 64});
      term_pool = &pool;
      struct sigaction sa {};
      sa.sa_handler = on_term;
      ::sigemptyset(&sa.sa_mask);
      ::sigaction(SIGTERM, &sa, nullptr);
      u64 i = 0;
      try {
        for (; i < max_messages; ++i)
          pool.submit(i, [&, i](runnel::process_result<u64>&& r) {
            ++results[i];
            if (r.value) value[i] = *r.value;
            if (delivered.fetch_add(1) + 1 == 1'000) {
              const char go = 'g';
              if (::write(fds[1], &go, 1) != 1) ::_exit(3);
            }
          });
      } catch (const runnel::process_pool_stopped&) {
      }
      std::vector<pid_t> pids = pool.worker_pids();
      pids.push_back(pool.launcher_pid());
      pool.stop();
      rep.accepted = i;
      rep.st = pool.stats();
      for (u64 m = 0; m < max_messages; ++m) {
        const std::uint32_t r = runs.at[m].load(std::memory_order_relaxed);
        if (m < i) {
          rep.results += results[m];
          if (results[m] != 1 || value[m] != square_plus_one(m)) ++rep.wrong;
          if (r != 1) ++rep.runs_not_once;
        } else if (r != 0) {
          ++rep.runs_beyond;
        }
      }
      for (pid_t p : pids) rep.left_alive += process_gone(p) ? 0 : 1;
    }
    if (::write(fds[1], &rep, sizeof rep) != static_cast<ssize_t>(sizeof rep)) ::_exit(2);
    ::_exit(0);
  }
  ::close(fds[1]);
  char go = 0;
  REQUIRE(::read(fds[0], &go, 1) == 1);
  REQUIRE(::kill(-child, SIGTERM) == 0);
  term_report rep;
  std::size_t got = 0;
  while (got < sizeof rep) {
    const auto r = ::read(fds[0], reinterpret_cast<char*>(&rep) + got, sizeof rep - got);
    if (r <= 0) break;
    got += static_cast<std::size_t>(r);
  }
  ::close(fds[0]);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  REQUIRE(got == sizeof rep);
  INFO("accepted " << rep.accepted << ", restarts " << rep.st.restarts << ", retried " << rep.st.retried);
  CHECK(rep.accepted >= 1'000);
  CHECK(rep.accepted < max_messages);  // the signal stopped the run
  CHECK(rep.results == rep.accepted);
  CHECK(rep.wrong == 0);
  CHECK(rep.runs_not_once == 0);
  CHECK(rep.runs_beyond == 0);
  CHECK(rep.st.completed == rep.accepted);
  CHECK(rep.st.crashed == 0);
  CHECK(rep.st.restarts == 0);
  CHECK(rep.st.retried == 0);
  CHECK(rep.left_alive == 0);
}

TEST_CASE("process_pool: the shared region is an anonymous memfd: nothing appears in /dev/shm, so nothing can be left there", "[process]") {
  auto shm_entries = [] {
    std::set<std::string> names;
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator("/dev/shm", ec)) names.insert(e.path().filename().string());
    return names;
  };
  const auto before = shm_entries();
  runnel::process_pool<u64, u64> pool(square_plus_one, {.workers = 2});
  REQUIRE(pool.call(4).get() == 17);
  CHECK(shm_entries() == before);
  // The mapping the launcher and workers share is the memfd (the kernel
  // frees its pages with the last process mapping it, whoever dies first).
  std::ifstream maps("/proc/self/maps");
  std::string line;
  bool memfd = false;
  while (std::getline(maps, line)) memfd |= line.find("/memfd:runnel-process-pool") != std::string::npos;
  CHECK(memfd);
}
