// The public value types of runnel::pipeline (options, failure report,
// statistics), kept apart from the node machinery so that both
// pipeline.hpp and pipeline/nodes.hpp can use them. Users include
// <runnel/pipeline.hpp>, which includes this header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <typeinfo>
#include <vector>

#include "channel.hpp"

namespace runnel {

// Options of one pipeline node. Designated initialisers:
//   .stage(fn, {.workers = 4, .ordered = true})
struct stage_options {
  // Concurrent invocations of the function (lanes). A source has exactly one.
  std::size_t workers = 1;
  // With workers > 1: deliver outputs in input order (bounded reordering).
  bool ordered = false;
  // Capacity of the channel that carries this node's output (backpressure).
  std::size_t capacity = 1024;
  // Messages taken from the input per batch; a lane runs a few batches, then
  // yields to other tasks of the pool.
  std::size_t batch = 64;
  // Shown in stats() and stage_failure; default "source", "stage 1", ...
  std::string name{};
};

// What an error handler learns about a failed message.
struct stage_failure {
  std::size_t stage = 0;          // node index: 0 is the source (or first stage)
  std::string_view stage_name{};
  std::exception_ptr error{};
  // The message whose processing threw, as the node's input type (nullptr
  // for a source, whose generator threw before producing one, or for a wrong
  // T). The handler may move from it; it is destroyed after the handler.
  template <class T>
  T* message() const noexcept {
    return message_type != nullptr && *message_type == typeid(T) ? static_cast<T*>(message_ptr)
                                                                : nullptr;
  }
  const std::type_info* message_type = nullptr;
  void* message_ptr = nullptr;
};

using error_handler = std::function<void(const stage_failure&)>;

struct stage_stats {
  std::string name;
  std::size_t workers = 0;
  std::uint64_t in = 0;         // messages taken (a source: produced)
  std::uint64_t out = 0;        // messages passed on (a sink: delivered)
  std::uint64_t filtered = 0;   // the function returned an empty optional
  std::uint64_t failed = 0;     // the function threw
  std::uint64_t discarded = 0;  // dropped by cancel (or a closed .to() channel)
  std::size_t queue_depth = 0;  // messages waiting in the input channel now
  std::uint64_t fused = 0;      // activations run in the upstream node's task
                                // instead of as a task of their own (fusion)
};

struct pipeline_stats {
  std::uint64_t produced = 0;   // first node's in
  std::uint64_t delivered = 0;  // last node's out
  std::uint64_t filtered = 0;
  std::uint64_t failed = 0;
  std::uint64_t discarded = 0;
  bool finished = false;
  bool cancelled = false;
  std::vector<stage_stats> stages;
};

template <class T>
struct pipeline_access {
  static const std::shared_ptr<detail::channel_state<T>>& state(const sender<T>& s) { return s.s_; }
  static const std::shared_ptr<detail::channel_state<T>>& state(const receiver<T>& r) { return r.s_; }
};

}  // namespace runnel

