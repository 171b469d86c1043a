// The baseline queue of the pipeline benchmarks: a bounded std::deque under
// one mutex with two condition variables, as a careful programmer would
// write it without a library.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <mutex>
#include <optional>
#include <utility>

namespace runnel_bench {

template <class T>
class mutex_queue {
 public:
  explicit mutex_queue(std::size_t cap) : cap_(cap) {}
  void push(T v) {
    std::unique_lock lock(m_);
    not_full_.wait(lock, [&] { return q_.size() < cap_; });
    q_.push_back(std::move(v));
    lock.unlock();
    not_empty_.notify_one();
  }
  // nullopt once closed and empty.
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
  std::size_t cap_;
  bool closed_ = false;
};

}  // namespace runnel_bench
