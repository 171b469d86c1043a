// Results of a runnel::scaling benchmark: the latency histogram each run
// fills, the per-(implementation, cores) summary, and the plain-text table,
// JSON and CSV writers. Part of the runnel::scaling target.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <ostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "options.hpp"

namespace runnel::scaling {

// Latencies in nanoseconds, log-linear buckets: exact below 32 ns, then 16
// buckets per power of two (a reported percentile is within about 3 % of
// the true value). Fixed size, so recording never allocates.
class latency_histogram {
 public:
  static constexpr std::size_t exact = 32;
  static constexpr std::size_t sub_bits = 4;
  static constexpr std::size_t buckets = exact + (64 - 5) * (1u << sub_bits);

  void record(std::uint64_t ns) noexcept {
    ++counts_[index(ns)];
    ++total_;
  }
  void merge(const latency_histogram& o) noexcept {
    for (std::size_t i = 0; i < buckets; ++i) counts_[i] += o.counts_[i];
    total_ += o.total_;
  }
  std::uint64_t count() const noexcept { return total_; }

  // The q-quantile (0 < q <= 1) in ns: the middle of the bucket holding the
  // ceil(q * count)-th smallest value; 0 when empty.
  double quantile(double q) const noexcept {
    if (total_ == 0) return 0;
    const auto rank = std::max<std::uint64_t>(1, static_cast<std::uint64_t>(std::ceil(q * static_cast<double>(total_))));
    std::uint64_t seen = 0;
    for (std::size_t i = 0; i < buckets; ++i) {
      seen += counts_[i];
      if (seen >= rank) return middle(i);
    }
    return middle(buckets - 1);
  }

  static std::size_t index(std::uint64_t ns) noexcept {
    if (ns < exact) return static_cast<std::size_t>(ns);
    const auto e = static_cast<std::size_t>(std::bit_width(ns)) - 1;  // >= 5
    const auto sub = static_cast<std::size_t>(ns >> (e - sub_bits)) & ((1u << sub_bits) - 1);
    return exact + (e - 5) * (1u << sub_bits) + sub;
  }
  static double lower(std::size_t i) noexcept {
    if (i < exact) return static_cast<double>(i);
    const std::size_t e = (i - exact) / (1u << sub_bits) + 5;
    const std::size_t sub = (i - exact) % (1u << sub_bits);
    return std::ldexp(static_cast<double>((1u << sub_bits) + sub), static_cast<int>(e - sub_bits));
  }
  static double middle(std::size_t i) noexcept {
    if (i < exact) return static_cast<double>(i);
    const std::size_t e = (i - exact) / (1u << sub_bits) + 5;
    return lower(i) + std::ldexp(0.5, static_cast<int>(e - sub_bits));
  }

 private:
  std::array<std::uint64_t, buckets> counts_{};
  std::uint64_t total_ = 0;
};

// One timed run of one implementation.
struct run_sample {
  std::uint64_t messages = 0;  // delivered to the sink
  double seconds = 0;          // wall time from first generate to last consume
  double cpu_seconds = 0;      // process CPU time (all threads) over the run
  latency_histogram latency;
  double rate() const noexcept { return seconds > 0 ? static_cast<double>(messages) / seconds : 0; }
};

// All repetitions of one implementation on one core count, summarised.
struct result_row {
  std::string implementation;
  std::size_t cores = 0;
  std::vector<double> rates;        // messages/s of each repetition, in run order
  std::vector<double> cpu_seconds;  // of each repetition
  std::vector<std::uint64_t> counts;  // messages delivered in each repetition
  std::uint64_t messages = 0;       // delivered in the median-rate repetition
  double median = 0, min = 0, max = 0;  // messages/s
  double speedup = NAN;     // median / the same implementation's median on 1 core
  double vs_loop = NAN;     // median / the single-thread loop's median (with --peers)
  double efficiency = NAN;  // speedup / cores
  double p50_ns = 0, p99_ns = 0, p999_ns = 0;  // over all repetitions
  double cpu_median = 0;    // CPU seconds of the median-rate repetition
  latency_histogram latency;
};

struct report {
  std::string title;
  options opts;
  std::size_t cpus = 0;
  std::vector<result_row> rows;  // by core count, then implementation
  bool has_loop() const {
    return std::any_of(rows.begin(), rows.end(), [](const result_row& r) { return r.implementation == "loop"; });
  }
};

inline constexpr const char* loop_name = "loop";

// Fills the median/range, percentiles and the ratios of every row.
inline void summarise(report& rep) {
  for (auto& r : rep.rows) {
    if (r.rates.empty()) continue;
    std::vector<std::size_t> order(r.rates.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return r.rates[a] < r.rates[b]; });
    const std::size_t n = order.size();
    r.median = n % 2 == 1 ? r.rates[order[n / 2]] : (r.rates[order[n / 2 - 1]] + r.rates[order[n / 2]]) / 2;
    r.min = r.rates[order.front()];
    r.max = r.rates[order.back()];
    r.cpu_median = r.cpu_seconds.size() == n ? r.cpu_seconds[order[n / 2]] : 0;
    r.messages = r.counts.size() == n ? r.counts[order[n / 2]] : 0;
    r.p50_ns = r.latency.quantile(0.50);
    r.p99_ns = r.latency.quantile(0.99);
    r.p999_ns = r.latency.quantile(0.999);
  }
  double loop = NAN;
  for (const auto& r : rep.rows)
    if (r.implementation == loop_name) loop = r.median;
  for (auto& r : rep.rows) {
    for (const auto& base : rep.rows)
      if (base.implementation == r.implementation && base.cores == 1 && base.median > 0)
        r.speedup = r.median / base.median;
    r.efficiency = r.speedup / static_cast<double>(r.cores);
    if (loop > 0) r.vs_loop = r.median / loop;
  }
}

namespace detail {

inline std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}
// 1234567 -> "1.23M"
inline std::string si(double v) {
  if (!std::isfinite(v)) return "-";
  if (v >= 1e9) return fmt("%.3gG", v / 1e9);
  if (v >= 1e6) return fmt("%.3gM", v / 1e6);
  if (v >= 1e3) return fmt("%.3gk", v / 1e3);
  return fmt("%.3g", v);
}
inline std::string ratio(double v) { return std::isfinite(v) ? fmt("%.2f", v) : "-"; }
inline std::string micros(double ns) { return fmt("%.1f", ns / 1e3); }
inline std::string pad(std::string s, std::size_t w, bool left = false) {
  if (s.size() >= w) return s;
  return left ? s + std::string(w - s.size(), ' ') : std::string(w - s.size(), ' ') + s;
}

}  // namespace detail

// One line per row, fixed-width columns, for a terminal or a log.
inline void write_table(const report& rep, std::ostream& out) {
  const auto& o = rep.opts;
  out << rep.title << ": ";
  if (o.seconds > 0)
    out << o.seconds << " s a run";
  else
    out << o.messages << " messages a run";
  out << ", " << o.repetitions << (o.repetitions == 1 ? " repetition" : " repetitions") << ", "
      << (o.ordered ? "ordered" : "unordered") << ", batch " << o.batch << ", capacity " << o.capacity << ", "
      << rep.cpus << " allowed CPUs";
  if (!o.amqp_url.empty()) out << ", runnel fed from RabbitMQ queue " << o.queue;
  out << '\n';
  using detail::pad;
  out << pad("implementation", 16, true) << pad("cores", 6) << pad("msg/s", 10) << pad("[min - max]", 20)
      << pad("speed-up", 10) << pad("vs loop", 9) << pad("effic.", 8) << pad("p50 us", 10) << pad("p99 us", 10)
      << pad("p999 us", 10) << pad("CPU s", 8) << '\n';
  for (const auto& r : rep.rows) {
    out << pad(r.implementation, 16, true) << pad(std::to_string(r.cores), 6) << pad(detail::si(r.median), 10)
        << pad("[" + detail::si(r.min) + " - " + detail::si(r.max) + "]", 20) << pad(detail::ratio(r.speedup), 10)
        << pad(detail::ratio(r.vs_loop), 9) << pad(detail::ratio(r.efficiency), 8)
        << pad(detail::micros(r.p50_ns), 10) << pad(detail::micros(r.p99_ns), 10)
        << pad(detail::micros(r.p999_ns), 10) << pad(detail::fmt("%.2f", r.cpu_median), 8) << '\n';
  }
  out << "speed-up: over the same implementation on 1 core; vs loop: over the single-thread loop (--peers); "
         "latency: generate to consume, under full load\n";
  if (!o.amqp_url.empty())
    out << "runnel+amqp: the queue preloaded (untimed), then consume -> stage -> sink -> ack timed; latency: "
           "stage start to sink return (ack queued); the peers ran in-process\n";
}

// Ratios that could not be computed (no 1-core row, no loop) are null.
inline nlohmann::json to_json(const report& rep) {
  using nlohmann::json;
  auto num = [](double v) -> json { return std::isfinite(v) ? json(v) : json(nullptr); };
  const auto& o = rep.opts;
  json j;
  j["title"] = rep.title;
  j["allowed_cpus"] = rep.cpus;
  j["options"] = {{"cores", o.cores},           {"messages", o.messages},   {"seconds", o.seconds},
                  {"ordered", o.ordered},       {"batch", o.batch},         {"capacity", o.capacity},
                  {"repetitions", o.repetitions}, {"peers", o.peers},       {"oversubscribe", o.oversubscribe}};
  // The queue, never the URL (it may hold a password).
  if (!o.amqp_url.empty()) j["options"]["amqp_queue"] = o.queue;
  j["results"] = json::array();
  for (const auto& r : rep.rows) {
    j["results"].push_back({{"implementation", r.implementation},
                            {"cores", r.cores},
                            {"messages", r.messages},
                            {"messages_per_second", {{"median", r.median}, {"min", r.min}, {"max", r.max},
                                                     {"repetitions", r.rates}}},
                            {"speedup", num(r.speedup)},
                            {"vs_loop", num(r.vs_loop)},
                            {"efficiency", num(r.efficiency)},
                            {"latency_ns", {{"p50", r.p50_ns}, {"p99", r.p99_ns}, {"p999", r.p999_ns}}},
                            {"cpu_seconds", {{"median_run", r.cpu_median}, {"repetitions", r.cpu_seconds}}}});
  }
  return j;
}

inline void write_json(const report& rep, std::ostream& out) { out << to_json(rep).dump(2) << '\n'; }

// One header line and one line per row; empty fields for ratios that could
// not be computed. Implementation names are quoted.
inline void write_csv(const report& rep, std::ostream& out) {
  auto num = [](double v) { return std::isfinite(v) ? detail::fmt("%.6g", v) : std::string(); };
  out << "implementation,cores,messages,median_msgs_per_s,min_msgs_per_s,max_msgs_per_s,speedup,vs_loop,"
         "efficiency,p50_ns,p99_ns,p999_ns,cpu_seconds\n";
  for (const auto& r : rep.rows) {
    std::string name = "\"";
    for (char c : r.implementation) name += c == '"' ? std::string("\"\"") : std::string(1, c);
    name += '"';
    out << name << ',' << r.cores << ',' << r.messages << ',' << num(r.median) << ',' << num(r.min) << ','
        << num(r.max) << ',' << num(r.speedup) << ',' << num(r.vs_loop) << ',' << num(r.efficiency) << ','
        << num(r.p50_ns) << ',' << num(r.p99_ns) << ',' << num(r.p999_ns) << ',' << num(r.cpu_median) << '\n';
  }
}

}  // namespace runnel::scaling
