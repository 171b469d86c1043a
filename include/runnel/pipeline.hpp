// runnel::pipeline: producers, stages and consumers as plain function
// objects, wired by bounded channels and run as tasks of a thread_pool.
//
//   runnel::thread_pool pool;
//   int next = 0;
//   auto run = runnel::pipeline{pool}
//       .source([&]() -> std::optional<int> {              // nullopt ends
//         if (next == 1000) return std::nullopt;
//         return next++; })
//       .stage([](int x) { return x * x; },                 // T -> U
//              {.workers = 4, .ordered = true})
//       .stage([](int x) -> std::optional<int> {             // T -> optional<U>
//         if (x % 3 == 0) return std::nullopt;               //   filters
//         return x; })
//       .sink([](int x) { std::printf("%d\n", x); })         // called serially
//       .run();
//   run.wait();        // rethrows the first error when there is no handler
//
// Entry points: pipeline{pool}.source(gen), .from(receiver) or
// .from_merged(rx1, rx2, ...) (several channels, fair turns); then any
// number of .stage(fn, options); then .sink(fn, options) or .to(sender); then
// .run(). .on_error(handler) may appear anywhere before run(). Several
// pipelines may share one pool.
//
// Execution. Every node (source, stage, sink) runs as pool tasks woken by
// its channels: a task takes a batch, processes it, and yields; an empty
// input or a full output parks the node on that channel until the next send
// or receive re-schedules it. No worker ever blocks on a channel, so any
// pipeline finishes on any pool, even a 1-worker one. A node with
// workers = N runs its function on up to N messages at once (the function
// must then be safe to call concurrently); a source, and any node with
// workers = 1, is called serially. .ordered = true keeps a parallel stage's
// outputs in input order, with a reorder window of about 2 * workers * batch
// messages. A serial node (workers = 1) that is idle may be run by its
// upstream stage's task right after that task pushed it a batch ("fusion":
// no pool post; same order, counts and backpressure; see
// pipeline/nodes.hpp). The source does the same with the node after it,
// serial or parallel, adaptively: it runs that node's first lane (and the
// serial chain fused after it) in its own task, holding the other lanes
// idle, while that measures faster than handing the batches to other
// workers. It times a message of both schedules (over windows of 0.5 ms,
// the fastest of 3), hands off only when that is at least 1/8 faster (a cheap
// stage costs less to run than to move to another core; a tie keeps the
// work on one core), and re-probes the other schedule after 8 to 256
// windows, so a stage that grows heavier spreads again. On a one-worker
// pool it always fuses. Order, counts and backpressure are the same on
// every schedule. Results are passed on before a task parks or
// yields, so a lone message never waits for a batch to fill.
//
// Backpressure. Each node's output channel holds `capacity` messages; a full
// channel parks its producer, and a source is not called while its output is
// full. Memory is bounded by capacities, batches and the reorder windows.
//
// Stage functions. T -> U, or T -> std::optional<U> (an empty optional drops
// the message: "filtered"). A message the pipeline owns is never copied:
// a function taking it by value (`T m`, `auto m`) or by T&& gets it moved in,
// and after an exception the handler sees what the function left behind; a
// function taking `const T&` or `T&` gets the pipeline's own message, which
// the handler then sees whole.
//
// Errors. With .on_error(handler) an exception thrown by a stage or sink
// function is given to the handler (stage_failure: node index and name, the
// exception, the message) and the run goes on; handler calls are serialised.
// A generator that throws is reported the same way without a message, and is
// called again. Without a handler, or when the handler throws, the first
// exception cancels the run and wait() rethrows it.
//
// End of a run. A natural end (generator returned nullopt, or the .from()
// channel closed) drains every message through every node before wait()
// returns; a .to() channel is then closed if the pipeline held its last
// sender. cancel() stops promptly: messages held by the pipeline are counted
// as discarded, not processed. Nothing vanishes uncounted: after the run,
//   produced == delivered + filtered + failed + discarded.
// If the receivers of a .to() channel close it, the message that could not
// be sent is discarded and the run is cancelled.
// A message counted as discarded or failed is destroyed under a
// runnel::message_fate saying so (pipeline/message_fate.hpp), so a type
// whose destructor settles something can tell it from a processed one.
//
// Types. stage_options, stage_failure, error_handler, stage_stats and
// pipeline_stats (namespace runnel) are declared in pipeline_types.hpp,
// which this header includes.
//
// Threads. run(), cancel() and stats() may be called from anywhere. wait()
// blocks, so it is for threads outside the pool (on a worker of the
// pipeline's pool it throws std::logic_error); wait_for(timeout) and
// wait_until(deadline) are its timed forms. Destroying an unfinished
// handle cancels the run and waits for it (on a pool worker it only cancels;
// the run then finishes on its own, keeping its state alive until then).
// The pool must outlive the run.
#pragma once

#include <chrono>
#include <cstddef>
#include <exception>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "channel.hpp"
#include "detail/deadline.hpp"
#include "pipeline/nodes.hpp"
#include "pipeline/merge_node.hpp"
#include "pipeline/message_fate.hpp"
#include "pipeline_types.hpp"
#include "thread_pool.hpp"

namespace runnel {

// A running (or finished) pipeline.
class pipeline_handle {
 public:
  pipeline_handle() noexcept = default;
  explicit pipeline_handle(std::shared_ptr<detail::pipeline_state> s) noexcept : st_(std::move(s)) {}
  pipeline_handle(pipeline_handle&&) noexcept = default;
  pipeline_handle& operator=(pipeline_handle&& o) noexcept {
    if (this != &o) {
      stop();
      st_ = std::move(o.st_);
    }
    return *this;
  }
  ~pipeline_handle() { stop(); }

  // Waits until every node has finished; rethrows the exception that ended
  // the run, if any. Not on a worker of the pipeline's pool.
  void wait() {
    check_waitable("wait");
    if (std::exception_ptr e = st_->wait()) std::rethrow_exception(e);
  }

  // As wait(), giving up after `timeout`: true when the run has finished
  // (rethrowing its exception, as wait() does), false on time-out. Any
  // length works: a huge timeout (hours::max()) waits for ever instead of
  // overflowing. Not on a worker of the pipeline's pool.
  template <class Rep, class Period>
  bool wait_for(std::chrono::duration<Rep, Period> timeout) {
    return wait_until(detail::deadline_after(timeout));
  }

  // As wait_for(), with a deadline of any clock (steady_clock is exact;
  // another clock's deadline is converted once into a timeout).
  template <class Clock, class Duration>
  bool wait_until(std::chrono::time_point<Clock, Duration> deadline) {
    check_waitable("wait_for/wait_until");
    std::exception_ptr e;
    if (!st_->wait_until(detail::to_steady_deadline(deadline), e)) return false;
    if (e) std::rethrow_exception(e);
    return true;
  }

  // Stops the run promptly; messages still held are discarded (counted).
  void cancel() noexcept {
    if (st_) st_->cancel();
  }

  bool done() const { return st_ && st_->finished(); }

  // Per-node counters and queue depths; consistent totals once done().
  pipeline_stats stats() const { return st_ ? st_->stats() : pipeline_stats{}; }

 private:
  // `what` names the call the user made (wait, wait_for, wait_until).
  void check_waitable(const char* what) const {
    if (!st_)
      throw std::logic_error(std::string("runnel::pipeline_handle::") + what +
                             ": the handle is empty (default-constructed or moved-from)");
    if (st_->pool.is_worker())
      throw std::logic_error(std::string("runnel::pipeline_handle::") + what +
                             ": called on a worker of the pipeline's pool would block a worker the pipeline needs");
  }

  void stop() noexcept {
    if (!st_) return;
    if (!st_->finished()) {
      st_->cancel();
      if (!st_->pool.is_worker()) (void)st_->wait();
    }
    st_.reset();
  }

  std::shared_ptr<detail::pipeline_state> st_;
};

// A complete pipeline, ready to run.
class [[nodiscard("a pipeline does nothing until run() is called on it")]] pipeline_plan {
 public:
  explicit pipeline_plan(std::shared_ptr<detail::pipeline_state> s) noexcept : st_(std::move(s)) {}

  pipeline_plan& on_error(error_handler h) {
    state("runnel::pipeline_plan::on_error").on_error = std::move(h);
    return *this;
  }

  // Starts every node; the plan is consumed.
  [[nodiscard("destroying the handle cancels the run and discards its messages; keep it and call wait()")]] pipeline_handle run() {
    auto s = std::move(st_);
    if (!s) throw std::logic_error("runnel::pipeline_plan::run: this pipeline was already run");
    s->start();
    return pipeline_handle(std::move(s));
  }

 private:
  detail::pipeline_state& state(const char* who) const {
    if (!st_) throw std::logic_error(std::string(who) + ": this pipeline was already run");
    return *st_;
  }
  std::shared_ptr<detail::pipeline_state> st_;
};

namespace detail {

// ---- compile-time checks of the builder ---------------------------------
// A static_assert message cannot name types in C++20, but both g++ and
// clang print the asserted expression with its types filled in. So a
// mismatch asserts on a name that reads as the diagnosis, e.g.
//   upstream_sends<std::string>::stage_takes<Parsed>::fits  (false)
// and the builder stops there, before the call's result type is needed
// (which would add a screen of invoke_result errors).

// What a callable takes, to name it in a diagnostic: the parameter of a
// function (pointer) or of a lone non-template operator() (message_param,
// pipeline/nodes.hpp); for anything else (generic lambda, overloads)
// the callable's own type.
template <class F> struct param_of { using type = F; };
template <class F>
  requires requires { &F::operator(); } && (!std::is_void_v<typename message_param<decltype(&F::operator())>::type>)
struct param_of<F> { using type = typename message_param<decltype(&F::operator())>::type; };
template <class F>
  requires(!std::is_void_v<typename message_param<F>::type>)
struct param_of<F> { using type = typename message_param<F>::type; };
template <class F> using param_of_t = typename param_of<F>::type;

// Always false; asserted only on the failing path, for its name.
template <class Sent>
struct upstream_sends {
  template <class Taken> struct stage_takes { static constexpr bool fits = false; };
  template <class Taken> struct sink_takes { static constexpr bool fits = false; };
  template <class Carried> struct to_channel_of { static constexpr bool fits = false; };
};
// What a builder that has already reported a mismatch sends on: every later
// check passes silently, so one mistake gives one error.
struct after_mismatch {};
template <class Returned> struct source_returns { static constexpr bool fits = false; };
template <class F> struct source_cannot_be_called_without_arguments { static constexpr bool fits = false; };

template <class F, class T>
inline constexpr bool accepts_message = std::is_invocable_v<F&, T&> || std::is_invocable_v<F&, T&&>;

// A stage object that builds its own node instead of being called a message
// at a time (runnel::process_stage): F::node_type<T> derives from node_base,
// has an out_port (output_port<out_type>) and fusable_lane(), and is
// constructed as (state, F, options, input_port<T>, index).
template <class F, class T>
concept builds_own_node = requires { typename F::template node_type<T>; };

// who: the call the user made, e.g. "runnel::pipeline::stage".
inline void check_options(const stage_options& o, bool source, const char* who) {
  const std::string w(who);
  if (o.workers == 0) throw std::invalid_argument(w + ": stage_options::workers must be at least 1");
  if (source && o.workers != 1)
    throw std::invalid_argument(w + ": a source is called serially; stage_options::workers must be 1");
  if (o.batch == 0) throw std::invalid_argument(w + ": stage_options::batch must be at least 1");
  if (o.capacity == 0) throw std::invalid_argument(w + ": stage_options::capacity must be at least 1");
}

// The channel behind a node's output. The ring's own length check names the
// ring; the user set stage_options::capacity, so the message says that.
template <class T>
std::shared_ptr<channel_state<T>> make_node_channel(std::size_t capacity, const char* who) {
  try {
    return std::make_shared<channel_state<T>>(capacity, true);
  } catch (const std::length_error&) {
    throw std::length_error(std::string(who) + ": stage_options::capacity " + std::to_string(capacity) +
                            " of the node before it is too large (storage size overflows)");
  }
}
}  // namespace detail

// A pipeline under construction whose last node produces T.
template <class T>
class [[nodiscard("a pipeline needs .sink() or .to() and then .run()")]] pipeline_flow {
 public:
  pipeline_flow(std::shared_ptr<detail::pipeline_state> s, detail::output_port<T>* port,
                receiver<T> from) noexcept
      : st_(std::move(s)), port_(port), from_(std::move(from)) {}

  pipeline_flow& on_error(error_handler h) {
    state("runnel::pipeline_flow::on_error").on_error = std::move(h);
    return *this;
  }

  // Adds a stage: fn is T -> U, or T -> std::optional<U> to filter.
  template <class F>
  auto stage(F fn, stage_options opts = {}) {
    if constexpr (std::is_same_v<T, detail::after_mismatch>) {
      return pipeline_flow<detail::after_mismatch>(nullptr, nullptr, {});
    } else if constexpr (detail::builds_own_node<F, T>) {
      using Node = typename F::template node_type<T>;
      using U = typename Node::out_type;
      detail::check_options(opts, false, "runnel::pipeline::stage");
      auto& s = state("runnel::pipeline::stage");
      auto node = std::make_unique<Node>(s, std::move(fn), opts, take_input("runnel::pipeline::stage"), s.nodes.size());
      auto* port = &node->out_port;
      node->index = s.nodes.size();
      link_downstream(*node);
      s.nodes.push_back(std::move(node));
      return pipeline_flow<U>(std::move(st_), port, receiver<U>{});
    } else if constexpr (!detail::accepts_message<F, T>) {
      static_assert(detail::upstream_sends<T>::template stage_takes<detail::param_of_t<F>>::fits,
                    "runnel: the stage cannot be called with the message type the node before it "
                    "sends (upstream_sends<sent type>::stage_takes<parameter type> names both)");
      return pipeline_flow<detail::after_mismatch>(nullptr, nullptr, {});
    } else {
      using R = detail::call_result_t<F, T>;
      static_assert(!std::is_void_v<R>, "runnel: a stage must return a value; use sink() for a consumer");
      using U = typename detail::unwrap_optional<R>::type;
      static_assert(!std::is_reference_v<U>, "runnel: a stage must return a value, not a reference");
      detail::check_options(opts, false, "runnel::pipeline::stage");
      auto& s = state("runnel::pipeline::stage");
      auto node = std::make_unique<detail::stage_node<T, U, F>>(s, std::move(fn), opts,
                                                                take_input("runnel::pipeline::stage"),
                                                                s.nodes.size());
      auto* port = &node->out_port;
      node->index = s.nodes.size();
      link_downstream(*node);
      s.nodes.push_back(std::move(node));
      return pipeline_flow<U>(std::move(st_), port, receiver<U>{});
    }
  }

  // Ends the pipeline with a consumer (its result, if any, is ignored).
  template <class F>
  pipeline_plan sink(F fn, stage_options opts = {}) {
    if constexpr (std::is_same_v<T, detail::after_mismatch>) {
      return pipeline_plan(nullptr);
    } else if constexpr (!detail::accepts_message<F, T>) {
      static_assert(detail::upstream_sends<T>::template sink_takes<detail::param_of_t<F>>::fits,
                    "runnel: the sink cannot be called with the message type the node before it "
                    "sends (upstream_sends<sent type>::sink_takes<parameter type> names both)");
      return pipeline_plan(nullptr);
    } else {
      detail::check_options(opts, false, "runnel::pipeline::sink");
      auto& s = state("runnel::pipeline::sink");
      auto node = std::make_unique<detail::stage_node<T, void, F>>(
          s, std::move(fn), opts, take_input("runnel::pipeline::sink"), s.nodes.size());
      node->index = s.nodes.size();
      link_downstream(*node);
      s.nodes.push_back(std::move(node));
      return pipeline_plan(std::move(st_));
    }
  }

  // A channel of another type than the last node sends: a compile error that
  // names both (without this overload, "no matching function").
  template <class U>
  pipeline_plan to(sender<U>) {
    if constexpr (!std::is_same_v<T, detail::after_mismatch>) {
      static_assert(detail::upstream_sends<T>::template to_channel_of<U>::fits,
                    "runnel: to() needs a sender of the type the last node sends "
                    "(upstream_sends<sent type>::to_channel_of<channel type> names both)");
    }
    return pipeline_plan(nullptr);
  }

  // Ends the pipeline in a user's channel (for a consumer outside the pool).
  // The pipeline holds a sender until its last node is done.
  pipeline_plan to(sender<T> tx) {
    if (!tx.valid())
      throw std::invalid_argument("runnel::pipeline::to: the sender is empty (default-constructed or moved-from)");
    state("runnel::pipeline::to");
    if (port_ == nullptr) {
      // from(rx).to(tx): move the messages with an identity stage.
      return stage([](T& v) noexcept -> T { return std::move(v); }).to(std::move(tx));
    }
    port_->ch = pipeline_access<T>::state(tx);
    port_->external = std::move(tx);
    port_->is_external = true;
    return pipeline_plan(std::move(st_));
  }

 private:
  detail::pipeline_state& state(const char* who) const {
    if (!st_)
      throw std::logic_error(std::string(who) +
                             ": this pipeline builder was already used (each builder call consumes it; "
                             "chain the calls)");
    return *st_;
  }

  // A serial node after an internal channel may be run by its upstream's
  // lanes in their own tasks (fusion, pipeline/nodes.hpp).
  template <class Node>
  void link_downstream(Node& node) noexcept {
    if (port_ == nullptr) return;
    port_->downstream = node.fusable_lane();
    port_->downstream_node = &node;
    if constexpr (requires { node.source_fusable_lanes(); }) port_->downstream_lanes = node.source_fusable_lanes();
  }

  detail::input_port<T> take_input(const char* who) {
    detail::input_port<T> in;
    if (port_ != nullptr) {
      port_->ch = detail::make_node_channel<T>(port_->capacity_hint, who);
      in.ch = port_->ch;
    } else {
      in.ch = pipeline_access<T>::state(from_);
      in.external = std::move(from_);
      in.is_external = true;
    }
    return in;
  }

  std::shared_ptr<detail::pipeline_state> st_;
  detail::output_port<T>* port_;     // the last node's output, or nullptr after from()
  receiver<T> from_;  // valid after from() until the first node takes it
};

// Entry point: runnel::pipeline{pool}.source(gen) / .from(rx) ...
class pipeline {
 public:
  explicit pipeline(thread_pool& pool) : st_(std::make_shared<detail::pipeline_state>(pool)) {}

  pipeline& on_error(error_handler h) {
    state("runnel::pipeline::on_error").on_error = std::move(h);
    return *this;
  }

  // gen: () -> std::optional<T>, called serially; nullopt ends the stream.
  // Only opts.capacity, .batch and .name apply.
  template <class Gen>
  auto source(Gen gen, stage_options opts = {}) {
    if constexpr (!std::is_invocable_v<Gen&>) {
      static_assert(detail::source_cannot_be_called_without_arguments<Gen>::fits,
                    "runnel: a source must be callable with no arguments: () -> std::optional<T>");
      return pipeline_flow<detail::after_mismatch>(nullptr, nullptr, {});
    } else if constexpr (!detail::unwrap_optional<std::invoke_result_t<Gen&>>::filters) {
      static_assert(detail::source_returns<std::invoke_result_t<Gen&>>::fits,
                    "runnel: a source must return std::optional<T> (nullopt ends the stream)");
      return pipeline_flow<detail::after_mismatch>(nullptr, nullptr, {});
    } else {
      return make_source(std::move(gen), std::move(opts));
    }
  }

  // Messages come from a user's channel (filled by threads outside the
  // pool); the run ends naturally when that channel is closed and drained.
  template <class T>
  pipeline_flow<T> from(receiver<T> rx) {
    if (!rx.valid())
      throw std::invalid_argument("runnel::pipeline::from: the receiver is empty (default-constructed or moved-from)");
    state("runnel::pipeline::from");
    return pipeline_flow<T>(std::move(st_), nullptr, std::move(rx));
  }

  // Messages come from several channels of one type (Go's fan-in "merge";
  // a select over every receiver, in a loop, run as a pool task that parks
  // on all of them instead of blocking a worker). The inputs take turns: a
  // turn takes up to opts.batch messages from one input and ends early when
  // that input is empty, so none is starved while another is always ready,
  // and each input's messages keep their order. An input closed and drained
  // drops out; the run ends naturally when every input is. Only
  // opts.capacity, .batch and .name apply. At most 63 inputs.
  template <class T>
  pipeline_flow<T> from_merged(std::vector<receiver<T>> inputs, stage_options opts = {}) {
    const char* who = "runnel::pipeline::from_merged";
    if (inputs.empty()) throw std::invalid_argument(std::string(who) + ": needs at least one receiver");
    if (inputs.size() > detail::max_merge_inputs)
      throw std::invalid_argument(std::string(who) + ": at most " + std::to_string(detail::max_merge_inputs) +
                                  " receivers, got " + std::to_string(inputs.size()));
    for (const auto& rx : inputs)
      if (!rx.valid())
        throw std::invalid_argument(std::string(who) +
                                    ": a receiver is empty (default-constructed or moved-from)");
    detail::check_options(opts, true, who);
    auto& s = state(who);
    auto node = std::make_unique<detail::merge_node<T>>(s, std::move(inputs), opts);
    auto* port = &node->out_port;
    node->index = 0;
    s.nodes.push_back(std::move(node));
    return pipeline_flow<T>(std::move(st_), port, receiver<T>{});
  }

  // As above with default options: from_merged(rx1, rx2, ...).
  template <class T, class... More>
    requires(std::is_same_v<More, receiver<T>> && ...)
  pipeline_flow<T> from_merged(receiver<T> first, More... more) {
    std::vector<receiver<T>> inputs;
    inputs.reserve(1 + sizeof...(More));
    inputs.push_back(std::move(first));
    (inputs.push_back(std::move(more)), ...);
    return from_merged(std::move(inputs));
  }

 private:
  template <class Gen>
  auto make_source(Gen gen, stage_options opts) {
    using T = typename detail::unwrap_optional<std::invoke_result_t<Gen&>>::type;
    detail::check_options(opts, true, "runnel::pipeline::source");
    auto& s = state("runnel::pipeline::source");
    auto node = std::make_unique<detail::source_node<T, Gen>>(s, std::move(gen), opts);
    auto* port = &node->out_port;
    node->index = 0;
    s.nodes.push_back(std::move(node));
    return pipeline_flow<T>(std::move(st_), port, receiver<T>{});
  }

  detail::pipeline_state& state(const char* who) const {
    if (!st_)
      throw std::logic_error(std::string(who) +
                             ": this pipeline builder was already used (each builder call consumes it; "
                             "chain the calls)");
    return *st_;
  }
  std::shared_ptr<detail::pipeline_state> st_;
};

// Runs gen (() -> std::optional<T>) on the pool, sending into tx until it
// returns nullopt; then drops its sender (closing the channel if last).
template <class T, class Gen>
[[nodiscard("destroying the handle cancels the run; keep it and call wait()")]] pipeline_handle produce(thread_pool& pool, sender<T> tx, Gen gen, stage_options opts = {}) {
  if (!tx.valid())
    throw std::invalid_argument("runnel::produce: the sender is empty (default-constructed or moved-from)");
  detail::check_options(opts, true, "runnel::produce");
  return pipeline{pool}.source(std::move(gen), std::move(opts)).to(std::move(tx)).run();
}

// Runs fn over every message of rx with up to `workers` concurrent calls,
// until rx is closed and drained.
template <class T, class F>
[[nodiscard("destroying the handle cancels the run; keep it and call wait()")]] pipeline_handle consume(thread_pool& pool, receiver<T> rx, F fn, std::size_t workers = 1) {
  if (!rx.valid())
    throw std::invalid_argument("runnel::consume: the receiver is empty (default-constructed or moved-from)");
  stage_options o;
  o.workers = workers;
  detail::check_options(o, false, "runnel::consume");
  return pipeline{pool}.from(std::move(rx)).sink(std::move(fn), std::move(o)).run();
}

}  // namespace runnel
