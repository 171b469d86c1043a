// The memory a process pool shares with its launcher and workers: one
// anonymous memfd, mapped MAP_SHARED before the fork, so every process sees
// the same pages. The memfd has no name in any file system (nothing appears
// in /dev/shm); its pages go when the last process mapping them exits.
//
// Layout (every part starts on its own false_sharing_range block, 128 bytes):
//
//   region_header                      futex words of the parent, shutdown flag
//   worker_ctl[workers]                per worker: lifecycle (launcher <-> parent),
//                                      request ring indices (parent -> worker),
//                                      progress indices (worker -> parent)
//   slots: per worker, `depth` request slots, then `depth` reply slots
//
// Each worker has its own pair of single-producer single-consumer rings:
// the parent writes request slot i % depth and publishes tail = i + 1; the
// worker stores taken = i + 1 before it runs the function on message i (so
// the message a worker holds is always known: index done when taken > done),
// writes reply slot i % depth and publishes done = i + 1; the parent reads
// the reply and frees the slot (its own `consumed` count). A shared MPMC ring
// was not used: a worker could die between claiming a cell and recording the
// claim, and the message would then belong to nobody.
//
// Invariant, per worker:  consumed <= done <= taken <= tail <= consumed + depth.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <climits>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>

#include <sys/mman.h>
#include <unistd.h>

#include "../detail/cache_line.hpp"
#include "../detail/futex.hpp"

namespace runnel::process {

// Every part of the region starts on its own cache line; parts written by
// different processes are false_sharing_range apart (the adjacent-line
// prefetcher pairs 64-byte lines).
using runnel::detail::cache_line_size;
using runnel::detail::false_sharing_range;

static_assert(std::atomic<std::uint64_t>::is_always_lock_free && std::atomic<std::int32_t>::is_always_lock_free,
              "atomics shared between processes must be lock-free (address-free)");

struct alignas(false_sharing_range) region_header {
  // Futex the parent's supervisor sleeps on; bumped by anyone with news for
  // it (a reply, a death, a started worker, a submitted message).
  std::atomic<std::uint32_t> parent_wake{0};
  // 1 while the supervisor is about to sleep: the first notifier to take it
  // back to 0 bumps parent_wake and wakes (wake_sleeper).
  std::atomic<std::uint32_t> parent_sleeping{0};
  // 1: workers exit when idle, the launcher spawns no more and exits when its
  // children are gone. Set once, by the parent.
  std::atomic<std::uint32_t> shutdown{0};
};

enum class worker_state : std::uint32_t {
  spawn_wanted = 0,  // parent asks the launcher for a process (initial state)
  alive = 1,         // launcher forked it; pid is valid and not yet reaped
  dead = 2,          // launcher reaped it; wait_status is valid
  backoff = 3,       // parent settled its death; restart postponed (restart_delay)
};

struct alignas(false_sharing_range) worker_ctl {
  // ---- lifecycle: written by the launcher (pid, wait_status, state = alive
  // or dead) and by the parent (state = spawn_wanted or backoff,
  // kill_wanted); rare.
  std::atomic<std::uint32_t> state{static_cast<std::uint32_t>(worker_state::spawn_wanted)};
  std::atomic<std::int32_t> pid{0};
  std::atomic<std::int32_t> wait_status{0};
  std::atomic<std::uint32_t> kill_wanted{0};  // parent: SIGKILL this (hung) worker

  // ---- request ring, written by the parent (once a message).
  alignas(false_sharing_range) std::atomic<std::uint64_t> tail{0};  // requests published
  std::atomic<std::uint32_t> wake{0};                          // futex the worker sleeps on

  // ---- progress, written by the worker (twice a message).
  alignas(false_sharing_range) std::atomic<std::uint64_t> taken{0};  // taken = i + 1: holds message i
  std::atomic<std::uint64_t> done{0};                           // replies published
  std::atomic<std::uint32_t> sleeping{0};                       // 1: the worker may be asleep
                                                                // (cleared by the parent's wake_sleeper)
};

// The parent's hot stores (tail, wake) and the worker's (taken, done,
// sleeping) must not share a prefetched pair of lines, nor share one with
// the lifecycle words (launcher) or the next worker's block.
static_assert(offsetof(worker_ctl, tail) == false_sharing_range,
              "worker_ctl: the parent-written ring indices start false_sharing_range past the lifecycle words");
static_assert(offsetof(worker_ctl, taken) - offsetof(worker_ctl, tail) == false_sharing_range,
              "worker_ctl: the worker-written progress must be false_sharing_range past the parent-written tail");
static_assert(sizeof(worker_ctl) == 3 * false_sharing_range,
              "worker_ctl: the next worker's block starts false_sharing_range past this one's progress");
static_assert(sizeof(region_header) % false_sharing_range == 0,
              "region_header: the worker_ctl array after it must start on a false_sharing_range boundary");

// A slot: this header, then up to slot_size bytes.
struct slot_header {
  std::uint32_t bytes;  // length of the encoded message
  std::uint32_t kind;   // replies: reply_kind
};

enum class reply_kind : std::uint32_t {
  value = 0,        // the encoded Out
  exception = 1,    // the function threw: the bytes are its what()
  encode_fail = 2,  // the reply could not be encoded or was too large: the bytes say why
};

class shared_region {
 public:
  shared_region(std::size_t workers, std::size_t depth, std::size_t slot_size)
      : workers_(workers), depth_(depth), slot_stride_(round_up(sizeof(slot_header) + slot_size)) {
    const std::size_t ctl_off = sizeof(region_header);
    slots_off_ = ctl_off + workers * sizeof(worker_ctl);
    const std::size_t per_worker = 2 * depth * slot_stride_;
    if (per_worker / 2 / depth != slot_stride_ || (SIZE_MAX - slots_off_) / workers < per_worker)
      throw std::length_error("runnel::process_pool: workers * depth * slot_size overflows");
    size_ = slots_off_ + workers * per_worker;

    fd_ = ::memfd_create("runnel-process-pool", MFD_CLOEXEC);
    if (fd_ < 0) throw std::system_error(errno, std::generic_category(), "runnel::process_pool: memfd_create");
    if (::ftruncate(fd_, static_cast<off_t>(size_)) != 0) {
      const int e = errno;
      ::close(fd_);
      throw std::system_error(e, std::generic_category(), "runnel::process_pool: ftruncate of the shared region");
    }
    void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    if (p == MAP_FAILED) {
      const int e = errno;
      ::close(fd_);
      throw std::system_error(e, std::generic_category(), "runnel::process_pool: mmap of the shared region");
    }
    // The mapping keeps the pages; nobody needs the descriptor any more, and
    // without it no exec'd program can inherit the region.
    ::close(fd_);
    fd_ = -1;
    base_ = static_cast<unsigned char*>(p);
    new (base_) region_header{};
    for (std::size_t w = 0; w < workers; ++w) new (base_ + ctl_off + w * sizeof(worker_ctl)) worker_ctl{};
  }

  shared_region(const shared_region&) = delete;
  shared_region& operator=(const shared_region&) = delete;
  ~shared_region() {
    if (base_ != nullptr) ::munmap(base_, size_);
  }

  region_header& header() const noexcept { return *std::launder(reinterpret_cast<region_header*>(base_)); }
  worker_ctl& ctl(std::size_t w) const noexcept {
    return *std::launder(reinterpret_cast<worker_ctl*>(base_ + sizeof(region_header) + w * sizeof(worker_ctl)));
  }
  slot_header* request_slot(std::size_t w, std::uint64_t i) const noexcept { return slot(w, i % depth_); }
  slot_header* reply_slot(std::size_t w, std::uint64_t i) const noexcept { return slot(w, depth_ + i % depth_); }
  static unsigned char* payload(slot_header* s) noexcept { return reinterpret_cast<unsigned char*>(s + 1); }

  std::size_t workers() const noexcept { return workers_; }
  std::size_t depth() const noexcept { return depth_; }
  std::size_t bytes() const noexcept { return size_; }

 private:
  // Slots are false_sharing_range apart: the last request slot (the parent
  // writes it) and the first reply slot (a worker writes it) are neighbours.
  static std::size_t round_up(std::size_t n) {
    return (n + false_sharing_range - 1) / false_sharing_range * false_sharing_range;
  }
  slot_header* slot(std::size_t w, std::size_t k) const noexcept {
    return reinterpret_cast<slot_header*>(base_ + slots_off_ + (w * 2 * depth_ + k) * slot_stride_);
  }

  std::size_t workers_, depth_, slot_stride_;
  std::size_t slots_off_ = 0, size_ = 0;
  int fd_ = -1;
  unsigned char* base_ = nullptr;
};

// Wakes whoever sleeps on `word` (a futex) after `sleeping` said it might:
// the futex-word protocol every sleeper in the region follows.
//
//   sleeper:   seq = word; sleeping = 1; re-check for news; futex_wait(word, seq);
//              sleeping = 0
//   notifier:  publish news; if (sleeping && sleeping.exchange(0)) { ++word; futex_wake }
//
// All seq_cst: the sleeper's store of sleeping then its re-check, and the
// notifier's news store then its load of sleeping, form a Dekker pair: in the
// single total order either the notifier's load follows the store of 1 (it
// wakes the sleeper) or the re-check follows the news (the sleeper does not
// sleep). The exchange hands the wake to exactly one notifier: a burst of
// news while the sleeper is still waking costs one system call, not one a
// message; a notifier that finds 0 comes later in the order than the
// exchange that cleared it, hence before the sleeper's next store of 1 and
// its re-check, which then sees its news. The bump of `word` makes a
// futex_wait that has not begun yet return at once.
inline void wake_sleeper(std::atomic<std::uint32_t>& sleeping, std::atomic<std::uint32_t>& word,
                         int count) noexcept {
  // seq_cst (load, exchange, bump): the Dekker pair above.
  if (sleeping.load(std::memory_order_seq_cst) == 0) return;
  if (sleeping.exchange(0, std::memory_order_seq_cst) == 0) return;
  word.fetch_add(1, std::memory_order_seq_cst);
  detail::futex_wake(word, count, detail::futex_scope::shared);
}

// Tells the parent's supervisor there is news (call after publishing it).
inline void notify_parent(region_header& h) noexcept { wake_sleeper(h.parent_sleeping, h.parent_wake, INT_MAX); }
}  // namespace runnel::process
