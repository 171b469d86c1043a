// The thread pool's overflow queue: an unbounded intrusive MPSC queue of
// nodes that carry their own link (`std::atomic<Node*> next`), for the work
// that does not fit in the pool's injection ring (see thread_pool::inject()).
//
// Algorithm: Dmitry Vyukov's intrusive MPSC node-based queue. A producer
// appends with one exchange on the tail and then links the previous tail to
// its node (wait-free, never allocates, never fails). There is one consumer
// at a time: the pool makes it whoever holds a mutex; producers never take
// it. The queue is empty when head and tail are both the stub node, a node
// of the queue's own that is never handed out.
//
// "Not yet". Between a producer's exchange and its link the chain from the
// head ends before the tail: the consumer cannot reach that producer's node,
// nor the last linked node in front of it (taking it would need its link),
// and pop() returns nullptr although nonempty() is true. The pool treats
// nonempty() as "work is queued", so nobody parks on it; the producer
// finishes its link a few instructions later.
//
// Order: nodes leave in the order of their exchanges on the tail, so the
// nodes of one producer leave in the order it pushed them.
#pragma once

#include <atomic>
#include <cstddef>

#include "../detail/assert.hpp"
#include "../detail/cache_line.hpp"

namespace runnel::detail {

template <class Node>
class overflow_queue {
 public:
  overflow_queue() noexcept {
    // The padding is computed by hand: producers' exchanges of the tail must
    // not take the consumer's head (or the stub) off its core.
    static_assert(offsetof(overflow_queue, tail_) - offsetof(overflow_queue, stub_) >= false_sharing_range,
                  "the tail is a false-sharing range away from the stub");
    static_assert(offsetof(overflow_queue, head_) - offsetof(overflow_queue, tail_) >= false_sharing_range,
                  "head and tail are a false-sharing range apart");
  }
  overflow_queue(const overflow_queue&) = delete;
  overflow_queue& operator=(const overflow_queue&) = delete;

  // The owner drains the queue before destroying it: the nodes are not ours
  // to free, and one left behind would leak its task.
  ~overflow_queue() {
    // Relaxed: destruction happens-after every other use of the queue.
    RUNNEL_ASSERT(head_.load(std::memory_order_relaxed) == &stub_ && tail_.load(std::memory_order_relaxed) == &stub_,
                  "an overflow queue is destroyed empty");
  }

  // Appends n (any thread; wait-free). n must not be queued already.
  void push(Node* n) noexcept { link(exchange_tail(n), n); }

  // push() in its two halves, so that a test can hold a producer between
  // them (the consumer then sees "not yet", header comment). The first
  // returns the previous tail, which the second links to n.
  Node* exchange_tail(Node* n) noexcept {
    RUNNEL_ASSERT(n != nullptr, "a null node is never pushed");
    // Relaxed: published by the release store that links n in link().
    n->next.store(nullptr, std::memory_order_relaxed);
    // acq_rel: acquire so that our link store into prev comes after prev's
    // own initialisation; release is carried by the link store.
    return tail_.exchange(n, std::memory_order_acq_rel);
  }

  void link(Node* prev, Node* n) noexcept {
    // Relaxed: a check of our own exchange's result; nobody else links prev.
    RUNNEL_ASSERT(prev->next.load(std::memory_order_relaxed) == nullptr,
                  "a node is linked to its successor once, by the producer that exchanged it out of the tail");
    // Release: n (and what it carries) is visible to the consumer that
    // follows this link with an acquire load.
    prev->next.store(n, std::memory_order_release);
  }

  // Whether the queue holds a node, counting one whose producer is between
  // its exchange and its link. Any thread.
  bool nonempty() const noexcept {
    // Relaxed: a hint for FIFO order and for "is there work"; the pool's
    // park() runs it after a heavy fence, which orders it. The head matters
    // too: a node put back by unpop() may sit in front of a stub that is
    // also the tail.
    return tail_.load(std::memory_order_relaxed) != &stub_ || head_.load(std::memory_order_relaxed) != &stub_;
  }

  // Consumer side (one at a time). Oldest node, or nullptr when empty or
  // when the oldest is still being linked ("not yet").
  Node* pop() noexcept {
    // Relaxed (every access to head_ here): written only by the consumer;
    // other threads read it as a hint only.
    Node* head = head_.load(std::memory_order_relaxed);
    // Acquire (all loads of `next` here): pairs with the producers' release
    // link stores, so the node's contents are visible.
    Node* next = head->next.load(std::memory_order_acquire);
    if (head == &stub_) {
      if (next == nullptr) return nullptr;
      head_.store(next, std::memory_order_relaxed);
      head = next;
      next = next->next.load(std::memory_order_acquire);
    }
    if (next != nullptr) return take(head, next);
    // head is the last linked node: take it only if no producer is between
    // its exchange and its link, by queueing the stub behind it.
    if (head != tail_.load(std::memory_order_acquire)) return nullptr;
    push(&stub_);
    next = head->next.load(std::memory_order_acquire);
    if (next == nullptr) return nullptr;
    return take(head, next);
  }

  // Puts back the node pop() just returned (same consumer, nothing popped
  // in between): it becomes the head again. Its link is unchanged (pop()
  // only read it).
  void unpop(Node* n) noexcept {
    // Relaxed: as in pop(); n's link was read by that pop with acquire.
    RUNNEL_ASSERT(n->next.load(std::memory_order_relaxed) == head_.load(std::memory_order_relaxed),
                  "unpop() puts back the node the last pop() returned");
    head_.store(n, std::memory_order_relaxed);
  }

 private:
  Node* take(Node* head, Node* next) noexcept {
    RUNNEL_ASSERT(head != &stub_, "the stub node is never handed out");
    // Relaxed: as in pop().
    head_.store(next, std::memory_order_relaxed);
    return head;
  }

  // Never handed out; re-queued behind the last node when that one is taken.
  Node stub_{};
  // Last node appended; producers exchange it.
  alignas(false_sharing_range) std::atomic<Node*> tail_{&stub_};
  // Oldest node (or the stub); written only by the consumer, on a line of
  // its own so that producers' exchanges do not take it away.
  alignas(false_sharing_range) std::atomic<Node*> head_{&stub_};
};

}  // namespace runnel::detail
