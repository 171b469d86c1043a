// runnel::scaling::locked_queue: the obvious hand-written hand-off that
// runnel's benchmarks measure runnel against -- a bounded FIFO (std::deque)
// behind one std::mutex and two condition variables (not full, not empty),
// with close() for the end of the stream. The mutex+threads peer of the
// scaling benchmark and bench/pipeline_bench.cpp both use this one queue,
// so that "the mutex baseline" means the same code everywhere.
//
// It needs nothing but the standard library (a program can include it
// without linking runnel::scaling). It is a baseline, not a runnel
// primitive: every push and pop takes the lock, and a blocked thread
// sleeps on a condition variable.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace runnel::scaling {

template <class T>
class locked_queue {
 public:
  explicit locked_queue(std::size_t capacity) : capacity_(capacity) {}

  // Waits while the queue holds `capacity` values.
  void push(T v) {
    std::unique_lock lock(m_);
    not_full_.wait(lock, [&] { return q_.size() < capacity_; });
    q_.push_back(std::move(v));
    lock.unlock();
    not_empty_.notify_one();
  }

  // The oldest value; nullopt once closed and empty.
  std::optional<T> pop() {
    std::unique_lock lock(m_);
    not_empty_.wait(lock, [&] { return !q_.empty() || closed_; });
    if (q_.empty()) return std::nullopt;
    T v = std::move(q_.front());
    q_.pop_front();
    lock.unlock();
    not_full_.notify_one();
    return v;
  }

  // Moves up to n values into out (cleared first); false once closed and
  // empty. Wakes every blocked pusher, since up to n slots came free.
  bool pop_batch(std::vector<T>& out, std::size_t n) {
    out.clear();
    std::unique_lock lock(m_);
    not_empty_.wait(lock, [&] { return !q_.empty() || closed_; });
    if (q_.empty()) return false;
    while (!q_.empty() && out.size() < n) {
      out.push_back(std::move(q_.front()));
      q_.pop_front();
    }
    lock.unlock();
    not_full_.notify_all();
    return true;
  }

  // No more pushes; poppers drain what is left, then get nullopt / false.
  void close() {
    {
      std::lock_guard lock(m_);
      closed_ = true;
    }
    not_empty_.notify_all();
  }

 private:
  std::mutex m_;
  std::condition_variable not_empty_, not_full_;
  std::deque<T> q_;
  std::size_t capacity_;
  bool closed_ = false;
};

}  // namespace runnel::scaling
