// libFuzzer harness: random operation sequences on mpmc_queue, spsc_queue or
// a channel, one thread, against a std::deque model (and a closed flag). On one thread every answer is exact: a push
// fails exactly when the model holds capacity() values, a pop fails exactly
// when it is empty, values come out in push order, and size_approx() is the
// model's size. Values are heap-owning (std::unique_ptr) so that ASan sees a
// lost, doubled or leaked value.
//
// Input: byte 0 picks the requested capacity (1..16, low 4 bits) and the
// object (bit 4: a channel; else bit 5: an spsc_queue, its producer and
// consumer calls interleaved on the one thread; else an mpmc_queue); then one
// byte an operation (the low 3 bits pick it, the rest is its count argument).
#include <runnel/channel.hpp>
#include <runnel/mpmc_queue.hpp>
#include <runnel/spsc_queue.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

using value = std::unique_ptr<std::uint32_t>;

// The channel: after close, sends fail handing the value back, receives
// drain what was accepted and then report closed.
void channel_ops(const std::uint8_t* data, std::size_t size, std::size_t requested) {
  auto [tx, rx] = runnel::make_channel<value>(requested);
  const std::size_t cap = tx.capacity();
  check(cap >= requested);
  std::deque<std::uint32_t> model;
  bool closed = false;
  std::uint32_t next = 0;
  auto expect_recv = [&](const std::optional<value>& v) {
    check(v.has_value() == !model.empty());
    if (v) {
      check(**v == model.front());
      model.pop_front();
    }
  };
  for (std::size_t i = 1; i < size; ++i) {
    switch (data[i] & 7u) {
      case 0:
      case 1: {  // try_send, or send where it cannot block
        if ((data[i] & 7u) == 1 && !closed && model.size() == cap) break;
        auto r = (data[i] & 7u) == 0 ? tx.try_send(std::make_unique<std::uint32_t>(next))
                                     : tx.send(std::make_unique<std::uint32_t>(next));
        const auto want = closed ? runnel::channel_status::closed
                          : model.size() == cap ? runnel::channel_status::full
                                                : runnel::channel_status::ok;
        check(r.status() == want);
        if (r.ok()) {
          check(!r.value().has_value());
          model.push_back(next++);
        } else {
          check(r.value().has_value() && **r.value() == next);  // handed back
        }
        break;
      }
      case 2: {  // try_recv
        auto r = rx.try_recv();
        const auto want = !model.empty() ? runnel::channel_status::ok
                          : closed       ? runnel::channel_status::closed
                                         : runnel::channel_status::empty;
        check(r.status() == want);
        expect_recv(r.value());
        break;
      }
      case 3: {  // recv where it cannot block
        if (model.empty() && !closed) break;
        expect_recv(rx.recv());
        break;
      }
      case 4:  // close, from either end; idempotent
        (data[i] & 8u) ? tx.close() : rx.close();
        closed = true;
        break;
      default:
        break;
    }
    check(tx.is_closed() == closed && rx.is_closed() == closed);
    check(rx.size_approx() == model.size());
  }
}

// The two rings: the same operations where they share them; ops 1 to 3 are
// each ring's own forms (mpmc: the linearizable try-operations; spsc:
// try_emplace and try_pop into a value).
template <class Queue>
void ring_ops(const std::uint8_t* data, std::size_t size, std::size_t requested) {
  constexpr bool spsc = std::is_same_v<Queue, runnel::spsc_queue<value>>;
  Queue q(requested);
  const std::size_t cap = q.capacity();
  check(cap >= requested && (spsc || cap >= 2) && (cap & (cap - 1)) == 0);  // mpmc keeps at least 2 cells
  std::deque<std::uint32_t> model;
  std::uint32_t next = 0;
  auto pop_expect = [&](std::uint32_t got) {
    check(!model.empty() && model.front() == got);
    model.pop_front();
  };

  for (std::size_t i = 1; i < size; ++i) {
    const unsigned op = data[i] & 7u;
    const std::size_t n = data[i] >> 3;  // 0..31
    switch (op) {
      case 0: {  // try_push
        value v = std::make_unique<std::uint32_t>(next);
        const bool ok = q.try_push(std::move(v));
        check(ok == (model.size() < cap));
        if (ok) model.push_back(next++);
        else check(v != nullptr && *v == next);  // a failed push leaves the value
        break;
      }
      case 1: {  // mpmc: try_push_linearizable; spsc: try_emplace
        value v = std::make_unique<std::uint32_t>(next);
        bool ok;
        if constexpr (spsc) ok = q.try_emplace(std::move(v));  // on false nothing was constructed from v
        else ok = q.try_push_linearizable(std::move(v));
        if (!ok) check(v != nullptr && *v == next);
        check(ok == (model.size() < cap));
        if (ok) model.push_back(next++);
        break;
      }
      case 2: {  // try_pop (optional)
        std::optional<value> v = q.try_pop();
        check(v.has_value() == !model.empty());
        if (v) pop_expect(**v);
        break;
      }
      case 3: {  // mpmc: try_pop_linearizable; spsc: try_pop into a value
        if constexpr (spsc) {
          value v = std::make_unique<std::uint32_t>(~0u);
          const bool ok = q.try_pop(v);
          check(ok == !model.empty());
          if (ok) pop_expect(*v);
          else check(*v == ~0u);  // out is unchanged
        } else {
          std::optional<value> v = q.try_pop_linearizable();
          check(v.has_value() == !model.empty());
          if (v) pop_expect(**v);
        }
        break;
      }
      case 4: {  // try_push_n
        std::vector<value> vs;
        for (std::size_t k = 0; k < n; ++k) vs.push_back(std::make_unique<std::uint32_t>(next + static_cast<std::uint32_t>(k)));
        const std::size_t room = cap - model.size();
        const std::size_t k = q.try_push_n(vs.begin(), vs.size());
        check(k == (n < room ? n : room));
        for (std::size_t j = 0; j < n; ++j) check((vs[j] == nullptr) == (j < k));  // a prefix moved
        for (std::size_t j = 0; j < k; ++j) model.push_back(next++);
        next += static_cast<std::uint32_t>(n - k);  // the rest are dropped here
        break;
      }
      case 5: {  // try_pop_n
        std::vector<value> out(n);
        const std::size_t k = q.try_pop_n(out.begin(), n);
        check(k == (n < model.size() ? n : model.size()));
        for (std::size_t j = 0; j < k; ++j) pop_expect(*out[j]);
        for (std::size_t j = k; j < n; ++j) check(out[j] == nullptr);
        break;
      }
      case 6: {  // blocking push/pop when they cannot block
        if (model.size() < cap) {
          q.push(std::make_unique<std::uint32_t>(next));
          model.push_back(next++);
        } else {
          pop_expect(*q.pop());
        }
        break;
      }
      default:
        break;
    }
    check(q.size_approx() == model.size());
    check(q.empty_approx() == model.empty());
  }
  // The rest is destroyed with the queue; ASan's leak check sees a loss.
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::size_t requested = (data[0] & 15u) + 1;
  if (data[0] & 16u) channel_ops(data, size, requested);
  else if (data[0] & 32u) ring_ops<runnel::spsc_queue<value>>(data, size, requested);
  else ring_ops<runnel::mpmc_queue<value>>(data, size, requested);
  return 0;
}
