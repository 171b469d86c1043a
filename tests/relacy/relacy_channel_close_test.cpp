// Model checking of the channel's close race (channel/channel_state.hpp) under
// Relacy (Debian relacy-dev): the channel's own shared state, instantiated
// with relacy_atomics (its state word, its ring and its threads' event
// counts), run over the interleavings of senders, a receiver and a closer on
// a ring of two cells, with Relacy's model of the C++ memory model choosing
// what each load may read. Threads sleep in the modelled futex (see
// relacy_event_count_test.cpp): a thread left asleep for ever is reported as
// a deadlock.
//
// What must hold:
//   - every value whose send succeeded is received exactly once, in the
//     order sent, and nothing else is received (the values are Relacy
//     variables: a hand-over not ordered by happens-before is a data race);
//   - a send that fails because of close() hands its value back intact, and
//     every send after it fails too;
//   - close() wakes every blocked sender and receiver (no thread is left
//     asleep), including a receiver that went to sleep because it saw the
//     channel closed with a send still in flight (the last withdrawing send
//     wakes it, also one that pushed nothing because the ring was full);
//   - the try-operations are linearizable with close(): once every send
//     has returned and close() has returned, a try_recv never answers
//     "empty" (only a value or "closed"), and once it answered "closed" it
//     keeps answering it.
//
// Tests of the tests, run every time (each must be reported as failing):
// the hand-over the close protocol rests on, a send's withdrawal (release)
// read by a receiver's "closed, nothing in flight" (acquire), taken away on
// either side:
//   read-modify-writes without their release half: the withdrawal no longer
//     publishes the value pushed before it, and a receiver reports "closed"
//     with that value left in the ring (a value lost);
//   seq_cst loads made relaxed: the receiver's read of the state word no
//     longer takes the value over, with the same loss.
// Checked by hand (a change to the code, not to the atomics, so not run
// every time): a withdrawal after close() that forgets to wake the
// receivers (wake_receivers_after_last_send emptied) is reported as a
// deadlock by "full: try_send vs close, then recv" (after 57 interleavings
// at context bound 2, 4 at bound 1); the other models pass it (a send that
// pushes wakes by its push; a late send's window between announcement and
// withdrawal needs more preemptions than their searches allow).
//
// Usage: relacy_channel_close_test [-v] [name-part]   (see relacy_check.hpp)
#include "relacy_invariants.hpp"  // first: see there

#include <runnel/channel/channel_state.hpp>

#include <optional>

#include "relacy_check.hpp"

namespace {

using runnel::channel_status;
using runnel::detail::channel_state;
using runnel_model::bounded;
using runnel_model::caught;
using runnel_model::passes;
using runnel_model::random_schedules;
using runnel_model::relacy_atomics;
using runnel_model::weaken;

// A value whose contents Relacy watches for unordered access. A move
// empties its source (0), so a value handed back is seen intact or not.
struct payload {
  rl::var<int> v;
  explicit payload(int x) : v(x) {}
  payload(payload&& o) noexcept : v(static_cast<int>(o.v(RL_INFO))) { o.v(RL_INFO) = 0; }
  payload& operator=(payload&&) = delete;
  int get() { return v(RL_INFO); }
};

template <weaken W>
using channel_t = channel_state<payload, relacy_atomics<W>>;

// Capacity 1 asks for one cell; the ring has two (see mpmc_ring), so
// three sends fill it and the third may block.
constexpr std::size_t capacity = 1;

// Receives what is left after the model's threads are done (single-threaded
// in after()); every call must end in "closed".
template <class Channel>
int drain(Channel& ch, int* got, int n) {
  std::optional<payload> out;
  channel_status st;
  while ((st = ch.try_recv(out)) == channel_status::ok) {
    RL_ASSERT(n < 3);
    got[n++] = out->get();
    out.reset();
  }
  RL_ASSERT(st == channel_status::closed);
  return n;
}

// Fills the two cells with 1 and 2 (single-threaded, in before()).
template <class Channel>
void fill(Channel& ch) {
  for (int i = 1; i <= 2; ++i) {
    payload p(i);
    RL_ASSERT(ch.try_send(p) == channel_status::ok);
  }
}

// ---- Blocking send, blocking receive, close. The sender sends 1, 2, 3
// (the third may wait for room); the receiver receives until "closed"; the
// closer closes at any point. The sends that succeeded are a prefix 1..k,
// received exactly once and in order; the others failed with their value
// handed back; nobody is left asleep.
template <weaken W>
struct send_recv_close : rl::test_suite<send_recv_close<W>, 3> {
  std::optional<channel_t<W>> ch;
  channel_status sent[3] = {};
  int handed_back[3] = {};
  int got[3] = {};
  int ngot = 0;

  void before() { ch.emplace(capacity); }
  void thread(unsigned id) {
    if (id == 0) {
      for (int i = 0; i < 3; ++i) {
        payload p(i + 1);
        sent[i] = ch->send(p);
        handed_back[i] = p.get();
      }
    } else if (id == 1) {
      std::optional<payload> out;
      while (ch->recv(out) == channel_status::ok) {
        RL_ASSERT(ngot < 3);
        got[ngot++] = out->get();
        out.reset();
      }
    } else {
      ch->close();
    }
  }
  void after() {
    int ok = 0;
    for (int i = 0; i < 3; ++i) {
      if (sent[i] == channel_status::ok) {
        RL_ASSERT(ok == i);  // once a send failed, every later one fails
        RL_ASSERT(handed_back[i] == 0);
        ++ok;
      } else {
        RL_ASSERT(sent[i] == channel_status::closed);
        RL_ASSERT(handed_back[i] == i + 1);  // the value came back intact
      }
    }
    // The receiver saw "closed": nothing may be left, and it got exactly
    // the values sent, in order.
    RL_ASSERT(drain(*ch, got, ngot) == ngot);
    RL_ASSERT(ngot == ok);
    for (int i = 0; i < ngot; ++i) RL_ASSERT(got[i] == i + 1);
    ch.reset();
  }
};

// ---- One send against close, with the receiver asleep: the send either
// lands before close() (and is received) or is refused, handing its value
// back. A send that announces itself just after close() counts as in
// flight for an instant, long enough for the receiver to see "closed, but a
// send in flight" and go back to sleep: the send's withdrawal must then
// wake it.
template <weaken W>
struct late_send_wakes_receiver : rl::test_suite<late_send_wakes_receiver<W>, 3> {
  std::optional<channel_t<W>> ch;
  channel_status sent = channel_status::empty;
  int handed_back = 0;
  int got = 0;

  void before() { ch.emplace(capacity); }
  void thread(unsigned id) {
    if (id == 0) {
      payload p(1);
      sent = ch->try_send(p);
      handed_back = p.get();
    } else if (id == 1) {
      std::optional<payload> out;
      while (ch->recv(out) == channel_status::ok) {
        RL_ASSERT(got == 0);
        got = out->get();
        out.reset();
      }
    } else {
      ch->close();
    }
  }
  void after() {
    if (sent == channel_status::ok) {
      RL_ASSERT(got == 1 && handed_back == 0);
    } else {
      RL_ASSERT(sent == channel_status::closed && got == 0 && handed_back == 1);
    }
    int rest[3] = {};
    RL_ASSERT(drain(*ch, rest, 0) == 0);
    ch.reset();
  }
};

// ---- Two threads, for a systematic search. The sender makes one try_send
// (Blocking: one send); the other thread closes and then receives until
// "closed". A send that announces itself just after close() is in flight
// for an instant; a receiver that sees "closed, but a send in flight" goes
// to sleep, and the send's withdrawal must wake it.
template <weaken W, bool Blocking>
struct send_vs_close_then_recv : rl::test_suite<send_vs_close_then_recv<W, Blocking>, 2> {
  std::optional<channel_t<W>> ch;
  channel_status sent = channel_status::empty;
  int handed_back = 0;
  int got = 0;

  void before() { ch.emplace(capacity); }
  void thread(unsigned id) {
    if (id == 0) {
      payload p(1);
      sent = Blocking ? ch->send(p) : ch->try_send(p);
      handed_back = p.get();
    } else {
      ch->close();
      std::optional<payload> out;
      while (ch->recv(out) == channel_status::ok) {
        RL_ASSERT(got == 0);
        got = out->get();
        out.reset();
      }
    }
  }
  void after() {
    if (sent == channel_status::ok) {
      RL_ASSERT(got == 1 && handed_back == 0);
    } else {
      RL_ASSERT(sent == channel_status::closed && got == 0 && handed_back == 1);
    }
    int rest[3] = {};
    RL_ASSERT(drain(*ch, rest, 0) == 0);
    ch.reset();
  }
};

// ---- A send refused for want of room, withdrawing after close(). The
// channel starts full (1, 2). The sender makes one try_send of 3: it
// announces itself before close() and finds no room; the other thread
// closes and then receives until "closed". While the refused send is still
// announced, the receiver, having taken 1 and 2, sees "closed, but a send
// in flight" and goes to sleep; that send pushes nothing, so no push wakes
// the receiver, and close() woke before the receiver slept: only the
// withdrawal's wake (wake_receivers_after_last_send) is left to end its
// sleep. One preemption suffices (the sender's, between its refused push
// and its withdrawal), so the two-thread systematic search reaches it: with
// that wake removed, the model deadlocks.
template <weaken W>
struct full_send_withdraws_after_close : rl::test_suite<full_send_withdraws_after_close<W>, 2> {
  std::optional<channel_t<W>> ch;
  channel_status sent = channel_status::empty;
  int handed_back = 0;
  int got[3] = {};
  int ngot = 0;

  void before() {
    ch.emplace(capacity);
    fill(*ch);
  }
  void thread(unsigned id) {
    if (id == 0) {
      payload p(3);
      sent = ch->try_send(p);
      handed_back = p.get();
    } else {
      ch->close();
      std::optional<payload> out;
      while (ch->recv(out) == channel_status::ok) {
        RL_ASSERT(ngot < 3);
        got[ngot++] = out->get();
        out.reset();
      }
    }
  }
  void after() {
    // 3 lands only if a receive made room before the push and before close().
    if (sent == channel_status::ok) {
      RL_ASSERT(handed_back == 0 && ngot == 3 && got[2] == 3);
    } else {
      RL_ASSERT((sent == channel_status::full || sent == channel_status::closed) && handed_back == 3);
      RL_ASSERT(ngot == 2);
    }
    RL_ASSERT(got[0] == 1 && got[1] == 2);
    int rest[3] = {};
    RL_ASSERT(drain(*ch, rest, 0) == 0);
    ch.reset();
  }
};

// ---- Close wakes blocked receivers: two receivers wait on an empty
// channel; close() must wake both, and both report "closed".
template <weaken W>
struct close_wakes_receivers : rl::test_suite<close_wakes_receivers<W>, 3> {
  std::optional<channel_t<W>> ch;

  void before() { ch.emplace(capacity); }
  void thread(unsigned id) {
    if (id < 2) {
      std::optional<payload> out;
      RL_ASSERT(ch->recv(out) == channel_status::closed);
      RL_ASSERT(!out.has_value());
    } else {
      ch->close();
    }
  }
  void after() { ch.reset(); }
};

// ---- Close wakes blocked senders: the channel starts full (1, 2); two
// senders wait for room; close() must wake both, each gets its value back,
// and the two values sent before close() are still received.
template <weaken W>
struct close_wakes_senders : rl::test_suite<close_wakes_senders<W>, 3> {
  std::optional<channel_t<W>> ch;
  int handed_back[2] = {};

  void before() {
    ch.emplace(capacity);
    fill(*ch);
  }
  void thread(unsigned id) {
    if (id < 2) {
      payload p(10 + static_cast<int>(id));
      RL_ASSERT(ch->send(p) == channel_status::closed);
      handed_back[id] = p.get();
    } else {
      ch->close();
    }
  }
  void after() {
    RL_ASSERT(handed_back[0] == 10 && handed_back[1] == 11);
    int got[3] = {};
    RL_ASSERT(drain(*ch, got, 0) == 2);
    RL_ASSERT(got[0] == 1 && got[1] == 2);
    ch.reset();
  }
};

// ---- try-operations against close. The sender makes two try_sends and
// then raises sender_done; the closer closes and raises close_done; the
// receiver polls with try_recv until "closed". Once it has seen both flags
// (acquire: both have returned), "empty" is wrong: no send is in flight and
// the channel is closed, so the answer is a value or "closed". A try_send
// that failed was refused by close(), and so is every later one. "closed"
// stays reported.
template <weaken W>
struct try_ops_vs_close : rl::test_suite<try_ops_vs_close<W>, 3> {
  std::optional<channel_t<W>> ch;
  rl::atomic<int> sender_done;
  rl::atomic<int> close_done;
  channel_status sent[2] = {};
  int handed_back[2] = {};
  int got[3] = {};
  int ngot = 0;

  void before() {
    ch.emplace(capacity);
    sender_done.store(0, rl::mo_relaxed, RL_INFO);
    close_done.store(0, rl::mo_relaxed, RL_INFO);
  }
  void thread(unsigned id) {
    if (id == 0) {
      for (int i = 0; i < 2; ++i) {
        payload p(i + 1);
        sent[i] = ch->try_send(p);
        handed_back[i] = p.get();
      }
      sender_done.store(1, rl::mo_release, RL_INFO);
    } else if (id == 1) {
      ch->close();
      close_done.store(1, rl::mo_release, RL_INFO);
    } else {
      std::optional<payload> out;
      for (;;) {
        const bool both_done =
            sender_done.load(rl::mo_acquire, RL_INFO) == 1 && close_done.load(rl::mo_acquire, RL_INFO) == 1;
        const channel_status st = ch->try_recv(out);
        if (st == channel_status::closed) break;
        if (st == channel_status::ok) {
          RL_ASSERT(ngot < 2);
          got[ngot++] = out->get();
          out.reset();
          continue;
        }
        RL_ASSERT(st == channel_status::empty);
        RL_ASSERT(!both_done);
        rl::yield(1, RL_INFO);
      }
      RL_ASSERT(ch->try_recv(out) == channel_status::closed);
    }
  }
  void after() {
    int ok = 0;
    for (int i = 0; i < 2; ++i) {
      if (sent[i] == channel_status::ok) {
        RL_ASSERT(ok == i);
        ++ok;
      } else {
        // Two cells, two values: never full, so only close() refuses.
        RL_ASSERT(sent[i] == channel_status::closed);
        RL_ASSERT(handed_back[i] == i + 1);
      }
    }
    RL_ASSERT(drain(*ch, got, ngot) == ngot);
    RL_ASSERT(ngot == ok);
    for (int i = 0; i < ngot; ++i) RL_ASSERT(got[i] == i + 1);
    ch.reset();
  }
};

}  // namespace

int main(int argc, char** argv) {
  // Two threads: every interleaving with at most two preemptions. Three
  // threads: a systematic search takes minutes even with one preemption
  // (3.6 million interleavings for the smallest), so random schedules.
  const auto random = random_schedules(200000);
  return runnel_model::run_models(
      argc, argv,
      {
          passes<send_vs_close_then_recv<weaken::none, false>>("try_send vs close, then recv", bounded(2)),
          passes<send_vs_close_then_recv<weaken::none, true>>("send vs close, then recv", bounded(2)),
          passes<full_send_withdraws_after_close<weaken::none>>("full: try_send vs close, then recv", bounded(2)),
          passes<send_recv_close<weaken::none>>("send x3, recv, close (random)", random),
          passes<late_send_wakes_receiver<weaken::none>>("try_send, recv, close (random)", random),
          passes<close_wakes_receivers<weaken::none>>("close wakes two blocked receivers (random)", random),
          passes<close_wakes_senders<weaken::none>>("close wakes two blocked senders (random)", random),
          passes<try_ops_vs_close<weaken::none>>("try_send x2, try_recv, close (random)", random),

          // Tests of the tests: each must be caught.
          caught<send_vs_close_then_recv<weaken::rmw_release, false>>("RMWs without release: 2 threads", bounded(2),
                                                                      rl::test_result_user_assert_failed),
          caught<send_vs_close_then_recv<weaken::seq_cst_loads, false>>(
              "seq_cst loads relaxed: 2 threads", bounded(2), rl::test_result_user_assert_failed),
          caught<try_ops_vs_close<weaken::rmw_release>>("RMWs without release: try ops (random)", random,
                                                        rl::test_result_user_assert_failed),
          caught<try_ops_vs_close<weaken::seq_cst_loads>>("seq_cst loads relaxed: try ops (random)", random,
                                                          rl::test_result_user_assert_failed),
          caught<send_recv_close<weaken::rmw_release>>("RMWs without release: blocking (random)", random,
                                                       rl::test_result_user_assert_failed),
      });
}
