// The launcher: a single-threaded child the process pool forks in its
// constructor, before the program has started any thread. It forks every
// worker process (the first ones and each restart), reaps them, reports
// their deaths in the shared region, and kills hung workers on request.
//
// Why a launcher: fork() in a multi-threaded process copies only the calling
// thread; a lock another thread held (malloc's, stdio's, the user's) stays
// locked for ever in the child. The launcher was forked while the program was
// single-threaded and never starts a thread, so forking from it is safe at
// any time. (posix_spawn of the program itself would need a main() that knows
// about workers; the launcher needs nothing from the program.)
//
// Lifetimes. The launcher and the workers set PR_SET_PDEATHSIG(SIGKILL) and
// then check getppid() (the parent may have died before the prctl): when
// the parent dies the launcher is killed, and with it every worker. The
// launcher reaps every worker; the parent reaps the launcher. The workers are
// the launcher's children, so only it may signal them (it reaps them, so it
// never signals a recycled pid).
//
// Stop signals. The launcher and the workers ignore SIGTERM and SIGINT (see
// ignore_stop_signals): the program decides when the pool stops.
//
// The parent asks for work through the shared region (worker_ctl::state ==
// spawn_wanted, kill_wanted, region_header::shutdown) and rings an eventfd;
// the launcher sleeps in poll() on that eventfd and a signalfd for SIGCHLD.
#pragma once

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <thread>

#include <dirent.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "shared_region.hpp"

namespace runnel::process {

// Threads a sanitizer runtime may run in the background. ThreadSanitizer
// starts one at the program's first pthread_create and never ends it; it takes
// its own locks around fork(), so it does not make forking unsafe.
#if defined(__SANITIZE_THREAD__)
inline constexpr std::size_t runtime_threads = 1;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
inline constexpr std::size_t runtime_threads = 1;
#else
inline constexpr std::size_t runtime_threads = 0;
#endif
#else
inline constexpr std::size_t runtime_threads = 0;
#endif

// Threads of the calling process, from /proc/self/task (0 when /proc is not
// mounted: cannot tell). A thread that was just joined may linger there for a
// moment, so a count above `limit` is re-read a few times before it is
// believed.
inline std::size_t thread_count(std::size_t limit = 1 + runtime_threads) noexcept {
  std::size_t n = 0;
  for (int tries = 0; tries < 50; ++tries) {
    n = 0;
    if (DIR* d = ::opendir("/proc/self/task")) {
      while (const dirent* e = ::readdir(d))
        if (e->d_name[0] != '.') ++n;
      ::closedir(d);
    } else {
      return 0;
    }
    if (n <= limit) return n;
    ::usleep(2000);
  }
  return n;
}

// Ties the calling (just forked) process to its parent: SIGKILL when the
// parent dies; exits at once if it already has.
inline void die_with_parent(pid_t expected_parent) noexcept {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != expected_parent) ::_exit(127);
}

// SIGTERM and SIGINT are the program's to act on, not the pool's processes'.
// A service manager (systemd's default KillMode=control-group) or a terminal
// (Ctrl-C) sends them to every process of the service or of the process
// group at once; if a worker died of it, the message it held would be retried
// or reported as a crash while the program is trying to drain gracefully, and
// a dead launcher would fail every message in flight. So the launcher and
// the workers ignore both: the program stops the pool (request_stop() from
// its handler, then stop()), which finishes every accepted message, and the
// workers exit when told. A worker can still be killed with SIGKILL (handled
// as a crash), and every one of them dies with the program.
inline void ignore_stop_signals() noexcept {
  for (int sig : {SIGTERM, SIGINT}) {
    struct sigaction ign {};
    ign.sa_handler = SIG_IGN;
    ::sigemptyset(&ign.sa_mask);
    ::sigaction(sig, &ign, nullptr);
  }
}

// Restores what a worker should start from: no blocked signals, and the
// default action for the signals of a crash, so that a crash kills the worker
// with its signal (and the parent can report it) rather than running a
// handler the program (or a sanitizer runtime) installed for itself.
inline void reset_worker_signals() noexcept {
  sigset_t none;
  ::sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  // The raw system call, not signal(): sanitizer runtimes intercept signal()
  // and keep their own SIGSEGV handler, which would turn a crash into an
  // exit(1). An all-zero kernel sigaction is SIG_DFL, no flags, empty mask,
  // whatever the architecture's field order; the mask is 8 bytes (_NSIG / 8).
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGPIPE, SIGCHLD}) {
    unsigned long kernel_sigaction[4] = {};
    ::syscall(SYS_rt_sigaction, sig, kernel_sigaction, nullptr, 8);
  }
  ignore_stop_signals();
}

// The function a worker process runs (never returns): worker index w.
using worker_entry = void (*)(void* ctx, std::size_t w);

class launcher {
 public:
  launcher(shared_region& r, int event_fd, worker_entry entry, void* ctx) noexcept
      : r_(r), event_fd_(event_fd), entry_(entry), ctx_(ctx) {}

  [[noreturn]] void run(pid_t parent) noexcept {
    ignore_stop_signals();  // first: the program's handler is still installed here
    die_with_parent(parent);
    sigset_t chld;
    ::sigemptyset(&chld);
    ::sigaddset(&chld, SIGCHLD);
    ::sigprocmask(SIG_BLOCK, &chld, nullptr);
    // SIGCHLD must not be ignored, or children would be reaped by the kernel.
    ::signal(SIGCHLD, SIG_DFL);
    signal_fd_ = ::signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    if (signal_fd_ < 0) ::_exit(126);
    for (;;) {
      reap();
      const bool spawn_pending = serve_requests();
      if (r_.header().shutdown.load(std::memory_order_acquire) != 0 && alive_ == 0) ::_exit(0);
      pollfd fds[2] = {{event_fd_, POLLIN, 0}, {signal_fd_, POLLIN, 0}};
      // A failed fork is retried after a short pause; otherwise sleep until told.
      ::poll(fds, 2, spawn_pending ? 10 : -1);
      drain(event_fd_, sizeof(std::uint64_t));
      drain(signal_fd_, sizeof(signalfd_siginfo));
    }
  }

 private:
  static void drain(int fd, std::size_t unit) noexcept {
    alignas(8) unsigned char buf[sizeof(signalfd_siginfo) * 4];
    while (::read(fd, buf, unit == sizeof(std::uint64_t) ? unit : sizeof buf) > 0) {
    }
  }

  // Reaps every finished child and reports it in its worker's control block.
  void reap() noexcept {
    int status = 0;
    pid_t pid;
    while ((pid = ::waitpid(-1, &status, WNOHANG)) > 0) {
      for (std::size_t w = 0; w < r_.workers(); ++w) {
        worker_ctl& c = r_.ctl(w);
        // relaxed: only this process writes pid and state = alive.
        if (c.pid.load(std::memory_order_relaxed) != pid ||
            c.state.load(std::memory_order_relaxed) != static_cast<std::uint32_t>(worker_state::alive))
          continue;
        c.wait_status.store(status, std::memory_order_relaxed);
        // seq_cst: publishes wait_status, and is the "news" half of the Dekker
        // pair with the supervisor's parent_sleeping (notify_parent).
        c.state.store(static_cast<std::uint32_t>(worker_state::dead), std::memory_order_seq_cst);
        --alive_;
        notify_parent(r_.header());
        break;
      }
    }
  }

  // Spawns wanted workers and kills hung ones. Returns true if a spawn failed.
  bool serve_requests() noexcept {
    const bool stopping = r_.header().shutdown.load(std::memory_order_acquire) != 0;
    bool failed = false;
    for (std::size_t w = 0; w < r_.workers(); ++w) {
      worker_ctl& c = r_.ctl(w);
      const auto st = static_cast<worker_state>(c.state.load(std::memory_order_acquire));
      if (st == worker_state::alive && c.kill_wanted.exchange(0, std::memory_order_acq_rel) != 0)
        ::kill(c.pid.load(std::memory_order_relaxed), SIGKILL);  // unreaped: still our child
      if (st == worker_state::spawn_wanted && !stopping && !spawn(w)) failed = true;
    }
    return failed;
  }

  bool spawn(std::size_t w) noexcept {
    const pid_t me = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) return false;
    if (pid == 0) {
      die_with_parent(me);
      ::close(signal_fd_);
      ::close(event_fd_);
      reset_worker_signals();
      entry_(ctx_, w);
      ::_exit(0);
    }
    worker_ctl& c = r_.ctl(w);
    c.pid.store(pid, std::memory_order_relaxed);  // published by the release below
    c.kill_wanted.store(0, std::memory_order_relaxed);
    // seq_cst: publishes pid; the news half of notify_parent's Dekker pair.
    c.state.store(static_cast<std::uint32_t>(worker_state::alive), std::memory_order_seq_cst);
    ++alive_;
    notify_parent(r_.header());
    return true;
  }

  shared_region& r_;
  int event_fd_;
  int signal_fd_ = -1;
  worker_entry entry_;
  void* ctx_;
  std::size_t alive_ = 0;
};

}  // namespace runnel::process
