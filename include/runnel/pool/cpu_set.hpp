// Which CPUs the process may run on, how many of them a cgroup CPU quota lets
// it use, and pinning a thread to one CPU.
//
// The pool sizes itself from the calling thread's affinity mask (so `taskset`
// and container cpusets are honoured) capped by the CPU bandwidth quota of the
// cgroup (a container limited to 1.5 CPUs on a 64-CPU host gets 2 workers,
// not 64). The quota parsers take file *contents*, so they are testable
// without a real cgroup tree.
#pragma once

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstddef>
#include <iterator>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace runnel::detail {

// CPU ids in the calling thread's affinity mask, ascending. Never empty: if
// the mask cannot be read, falls back to 0 .. hardware_concurrency()-1.
inline std::vector<int> affinity_cpus() {
  std::vector<int> cpus;
#if defined(__linux__)
  // The kernel's mask may be larger than cpu_set_t (more than 1024 CPUs);
  // grow the dynamically sized set until sched_getaffinity accepts it.
  for (int ncpu = 1024; ncpu <= (1 << 20); ncpu *= 2) {
    cpu_set_t* set = CPU_ALLOC(static_cast<std::size_t>(ncpu));
    if (set == nullptr) break;
    const std::size_t bytes = CPU_ALLOC_SIZE(static_cast<std::size_t>(ncpu));
    CPU_ZERO_S(bytes, set);
    if (::sched_getaffinity(0, bytes, set) == 0) {
      for (int c = 0; c < ncpu; ++c)
        if (CPU_ISSET_S(static_cast<std::size_t>(c), bytes, set)) cpus.push_back(c);
      CPU_FREE(set);
      break;
    }
    const int err = errno;
    CPU_FREE(set);
    if (err != EINVAL) break;
  }
#endif
  if (cpus.empty()) {
    const unsigned n = std::max(1u, std::thread::hardware_concurrency());
    for (unsigned c = 0; c < n; ++c) cpus.push_back(static_cast<int>(c));
  }
  return cpus;
}

namespace cgroup {

inline std::string_view trim(std::string_view s) noexcept {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\n' || s.front() == '\r'))
    s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\n' || s.back() == '\r'))
    s.remove_suffix(1);
  return s;
}

inline std::optional<long long> parse_integer(std::string_view s) noexcept {
  s = trim(s);
  long long v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc{} || end != s.data() + s.size()) return std::nullopt;
  return v;
}

// cgroup v2 `cpu.max`: "<quota> <period>" or "max <period>" (microseconds).
// Returns the CPU limit quota/period, or nullopt for "max" (no limit) and for
// anything malformed (we then simply do not cap).
inline std::optional<double> parse_cpu_max(std::string_view contents) noexcept {
  contents = trim(contents);
  const auto space = contents.find_first_of(" \t");
  if (space == std::string_view::npos) return std::nullopt;
  const std::string_view quota = contents.substr(0, space);
  const std::string_view period = contents.substr(space + 1);
  if (quota == "max") return std::nullopt;
  const auto q = parse_integer(quota);
  const auto p = parse_integer(period);
  if (!q || !p || *q <= 0 || *p <= 0) return std::nullopt;
  return static_cast<double>(*q) / static_cast<double>(*p);
}

// cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us`: quota -1 means no limit.
inline std::optional<double> parse_cfs_quota(std::string_view quota_contents,
                                             std::string_view period_contents) noexcept {
  const auto q = parse_integer(quota_contents);
  const auto p = parse_integer(period_contents);
  if (!q || !p || *q <= 0 || *p <= 0) return std::nullopt;
  return static_cast<double>(*q) / static_cast<double>(*p);
}

// Whole CPUs a quota allows: rounded up (1.5 CPUs keep 2 workers busy at
// 75%), at least 1.
inline std::size_t cpus_for_limit(double limit) noexcept {
  if (!(limit > 0)) return 1;
  // Rounded up by hand: <cmath> is a large include for one call.
  if (limit >= 1e18) return static_cast<std::size_t>(1e18);
  auto c = static_cast<std::size_t>(limit);  // truncates; limit > 0
  if (static_cast<double>(c) < limit) ++c;
  return c < 1 ? 1 : c;
}

// Entries of /proc/self/cgroup: "<id>:<controllers>:<path>". Returns the path
// of the v2 hierarchy ("0::<path>") or of the v1 hierarchy whose controller
// list contains `controller`.
inline std::optional<std::string> find_cgroup_path(std::string_view proc_self_cgroup,
                                                   std::string_view controller) {
  while (!proc_self_cgroup.empty()) {
    const auto nl = proc_self_cgroup.find('\n');
    const std::string_view line = proc_self_cgroup.substr(0, nl);
    proc_self_cgroup = nl == std::string_view::npos ? std::string_view{} : proc_self_cgroup.substr(nl + 1);
    const auto c1 = line.find(':');
    if (c1 == std::string_view::npos) continue;
    const auto c2 = line.find(':', c1 + 1);
    if (c2 == std::string_view::npos) continue;
    const std::string_view ctrls = line.substr(c1 + 1, c2 - c1 - 1);
    const std::string_view path = trim(line.substr(c2 + 1));
    if (controller.empty()) {
      if (line.substr(0, c1) == "0" && ctrls.empty()) return std::string(path);
      continue;
    }
    std::string_view rest = ctrls;
    while (!rest.empty()) {
      const auto comma = rest.find(',');
      if (rest.substr(0, comma) == controller) return std::string(path);
      rest = comma == std::string_view::npos ? std::string_view{} : rest.substr(comma + 1);
    }
  }
  return std::nullopt;
}

// With POSIX read(), not <fstream>: the streams and locale headers would add
// about 0.3 s to every compile that includes the pool, for a few small files.
inline std::optional<std::string> read_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      out.append(buf, static_cast<std::size_t>(n));
    } else if (n == 0) {
      break;
    } else if (errno != EINTR) {
      ::close(fd);
      return std::nullopt;
    }
  }
  ::close(fd);
  return out;
}

inline std::optional<double> min_limit(std::optional<double> a, std::optional<double> b) noexcept {
  if (!a) return b;
  if (!b) return a;
  return std::min(*a, *b);
}

// The CPU limit for a process whose /proc/self/cgroup reads
// `proc_self_cgroup`, with the cgroup file systems mounted under `root`
// (normally /sys/fs/cgroup). v2: the smallest cpu.max from the process's
// cgroup up to the root (a parent's limit caps its children). v1: the cpu
// controller's cfs quota. In a container whose cgroup namespace hides the
// host path, the files sit directly under the mount, so that is tried too.
inline std::optional<double> cpu_limit_at(const std::string& root, std::string_view proc_self_cgroup) {
  std::optional<double> limit;
  if (auto v2 = find_cgroup_path(proc_self_cgroup, "")) {
    std::string rel = *v2;
    for (;;) {
      if (auto c = read_file(root + rel + (rel.empty() || rel.back() != '/' ? "/" : "") + "cpu.max"))
        limit = min_limit(limit, parse_cpu_max(*c));
      if (rel.empty() || rel == "/") break;
      const auto slash = rel.find_last_of('/');
      rel = slash == std::string::npos || slash == 0 ? std::string("/") : rel.substr(0, slash);
    }
    if (auto c = read_file(root + "/cpu.max")) limit = min_limit(limit, parse_cpu_max(*c));
    if (limit) return limit;
  }
  if (auto v1 = find_cgroup_path(proc_self_cgroup, "cpu")) {
    for (const char* mount : {"/cpu,cpuacct", "/cpuacct,cpu", "/cpu"}) {
      for (const std::string& rel : {*v1, std::string()}) {
        const std::string dir = root + mount + (rel == "/" ? std::string() : rel);
        const auto q = read_file(dir + "/cpu.cfs_quota_us");
        const auto p = read_file(dir + "/cpu.cfs_period_us");
        if (q && p) return parse_cfs_quota(*q, *p);
      }
    }
  }
  return limit;
}

// The limit for this process, or nullopt when none is set (or not Linux).
inline std::optional<double> process_cpu_limit() {
  const auto self = read_file("/proc/self/cgroup");
  if (!self) return std::nullopt;
  return cpu_limit_at("/sys/fs/cgroup", *self);
}

}  // namespace cgroup

// Default worker count: the CPUs we may run on, capped by the cgroup quota.
inline std::size_t default_worker_count(std::size_t allowed_cpus, std::optional<double> cpu_limit) noexcept {
  std::size_t n = allowed_cpus == 0 ? 1 : allowed_cpus;
  if (cpu_limit) n = std::min(n, cgroup::cpus_for_limit(*cpu_limit));
  return n;
}

inline std::size_t default_worker_count() {
  return default_worker_count(affinity_cpus().size(), cgroup::process_cpu_limit());
}

// Restricts the calling thread to the CPUs in `cpus` (the kernel may run it
// on any of them). Returns false if the kernel refuses (a CPU offline or
// outside the cpuset, a negative id, an empty list); the thread then keeps
// its mask.
inline bool confine_current_thread(std::span<const int> cpus) noexcept {
#if defined(__linux__)
  if (cpus.empty() || *std::min_element(cpus.begin(), cpus.end()) < 0) return false;
  const auto ncpu = static_cast<std::size_t>(*std::max_element(cpus.begin(), cpus.end())) + 1;
  cpu_set_t* set = CPU_ALLOC(ncpu);
  if (set == nullptr) return false;
  const std::size_t bytes = CPU_ALLOC_SIZE(ncpu);
  CPU_ZERO_S(bytes, set);
  for (const int c : cpus) CPU_SET_S(static_cast<std::size_t>(c), bytes, set);
  const bool ok = ::pthread_setaffinity_np(::pthread_self(), bytes, set) == 0;
  CPU_FREE(set);
  return ok;
#else
  (void)cpus;
  return false;
#endif
}

// Restricts the calling thread to `cpu`. Returns false if the kernel refuses
// (CPU offline or outside the cpuset); the thread then keeps its mask.
inline bool pin_current_thread(int cpu) noexcept { return confine_current_thread(std::span<const int>(&cpu, 1)); }

// Names the calling thread (Linux keeps at most 15 characters).
inline void name_current_thread(const std::string& name) noexcept {
#if defined(__linux__)
  const std::string shortened = name.substr(0, 15);
  ::pthread_setname_np(::pthread_self(), shortened.c_str());
#else
  (void)name;
#endif
}

}  // namespace runnel::detail
