// runnel::scaling: argument parsing (every error path), the program's exit
// codes, and its outputs read back: JSON parsed, CSV split into equal rows,
// SVG checked as well-formed XML with one series per implementation. A tiny
// run of a linked-in job checks counts and, with --ordered, delivery order in
// every implementation. No timing is asserted.
#include <catch2/catch.hpp>

#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "runnel/scaling.hpp"
#include "scaling_support.hpp"

namespace sc = runnel::scaling;

namespace {

using scaling_support::slurp;
using scaling_support::uneven_work;

sc::options parse(std::vector<std::string> args, std::size_t cpus = 2) {
  args.insert(args.begin(), "scaling_test");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  return sc::parse_args(static_cast<int>(argv.size()), argv.data(), cpus);
}

std::string usage_message(std::vector<std::string> args, std::size_t cpus = 2) {
  try {
    parse(std::move(args), cpus);
  } catch (const sc::usage_error& e) {
    return e.what();
  }
  return "(no usage_error)";
}


// A temporary directory removed (with the files the test wrote) at the end.
struct temp_dir {
  std::string path;
  std::vector<std::string> files;
  temp_dir() {
    char tmpl[] = "/tmp/runnel_scaling_XXXXXX";
    const char* p = mkdtemp(tmpl);
    REQUIRE(p != nullptr);
    path = p;
  }
  std::string file(const std::string& name) {
    files.push_back(path + "/" + name);
    return files.back();
  }
  ~temp_dir() {
    for (const auto& f : files) std::remove(f.c_str());
    rmdir(path.c_str());
  }
};

// A minimal well-formedness check of an XML document: one root, balanced and
// properly nested tags, quoted attributes, only the five predefined entities
// (and numeric ones). Collects the data-implementation attribute of every
// <g class="series">. Returns an empty string when well-formed, else why not.
struct xml_check {
  std::vector<std::string> series;
  std::string error;
  std::size_t roots = 0;

  static bool entity_ok(const std::string& s, std::size_t amp) {
    const std::size_t semi = s.find(';', amp);
    if (semi == std::string::npos) return false;
    const std::string e = s.substr(amp + 1, semi - amp - 1);
    if (e == "amp" || e == "lt" || e == "gt" || e == "quot" || e == "apos") return true;
    return e.size() > 1 && e[0] == '#';
  }
  bool text_ok(const std::string& s) {
    for (std::size_t i = 0; i < s.size(); ++i) {
      if (s[i] == '<') return false;
      if (s[i] == '&' && !entity_ok(s, i)) return false;
    }
    return true;
  }

  explicit xml_check(const std::string& doc) {
    check(doc);
    if (error.empty() && roots != 1) error = "expected one root element, found " + std::to_string(roots);
  }

  void check(const std::string& doc) {
    std::vector<std::string> stack;
    std::size_t i = 0;
    auto fail = [&](const std::string& why) { error = why + " at offset " + std::to_string(i); };
    while (i < doc.size() && error.empty()) {
      const std::size_t lt = doc.find('<', i);
      const std::string text = doc.substr(i, lt == std::string::npos ? std::string::npos : lt - i);
      if (!text_ok(text)) return fail("bad character data");
      if (stack.empty() && text.find_first_not_of(" \t\r\n") != std::string::npos) return fail("text outside root");
      if (lt == std::string::npos) break;
      i = lt;
      if (doc.compare(i, 2, "<?") == 0) {
        const std::size_t end = doc.find("?>", i);
        if (end == std::string::npos) return fail("unterminated declaration");
        i = end + 2;
        continue;
      }
      if (doc.compare(i, 4, "<!--") == 0) {
        const std::size_t end = doc.find("-->", i);
        if (end == std::string::npos) return fail("unterminated comment");
        i = end + 3;
        continue;
      }
      const std::size_t gt = doc.find('>', i);
      if (gt == std::string::npos) return fail("unterminated tag");
      std::string tag = doc.substr(i + 1, gt - i - 1);
      i = gt + 1;
      if (!tag.empty() && tag[0] == '/') {
        if (stack.empty() || stack.back() != tag.substr(1)) return fail("mismatched </" + tag.substr(1) + ">");
        stack.pop_back();
        continue;
      }
      const bool empty = !tag.empty() && tag.back() == '/';
      if (empty) tag.pop_back();
      std::size_t p = 0;
      while (p < tag.size() && tag[p] != ' ' && tag[p] != '\n') ++p;
      const std::string name = tag.substr(0, p);
      if (name.empty()) return fail("empty tag name");
      std::string cls, impl;
      // Attributes: name="value" separated by white space.
      for (;;) {
        while (p < tag.size() && (tag[p] == ' ' || tag[p] == '\n')) ++p;
        if (p == tag.size()) break;
        const std::size_t eq = tag.find('=', p);
        if (eq == std::string::npos || eq + 1 >= tag.size() || tag[eq + 1] != '"') return fail("unquoted attribute");
        const std::size_t close = tag.find('"', eq + 2);
        if (close == std::string::npos) return fail("unterminated attribute");
        const std::string an = tag.substr(p, eq - p), av = tag.substr(eq + 2, close - eq - 2);
        if (!text_ok(av)) return fail("bad attribute value");
        if (an == "class") cls = av;
        if (an == "data-implementation") impl = av;
        p = close + 1;
      }
      if (cls == "series") series.push_back(impl);
      if (stack.empty()) ++roots;
      if (!empty) stack.push_back(name);
    }
    if (error.empty() && !stack.empty()) error = "unclosed <" + stack.back() + ">";
  }
};

// Splits CSV lines into fields (double-quoted fields may hold commas and "").
std::vector<std::vector<std::string>> read_csv(const std::string& text) {
  std::vector<std::vector<std::string>> rows;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    std::vector<std::string> fields(1);
    bool quoted = false;
    for (std::size_t i = 0; i < line.size(); ++i) {
      const char c = line[i];
      if (quoted) {
        if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
          fields.back() += '"';
          ++i;
        } else if (c == '"') {
          quoted = false;
        } else {
          fields.back() += c;
        }
      } else if (c == '"') {
        quoted = true;
      } else if (c == ',') {
        fields.emplace_back();
      } else {
        fields.back() += c;
      }
    }
    REQUIRE_FALSE(quoted);
    rows.push_back(fields);
  }
  return rows;
}

// The linked-in job: the result carries its sequence number so the consumer
// can check order; violations and deliveries are tallied outside the copies.
struct tally {
  std::atomic<std::uint64_t> delivered{0};
  std::atomic<std::uint64_t> out_of_order{0};
};

struct in_order_consumer {
  tally* t;
  std::uint64_t expected = 0;
  void operator()(std::uint64_t seq) {
    // Relaxed: counters read after the runs are joined.
    if (seq != expected) t->out_of_order.fetch_add(1, std::memory_order_relaxed);
    expected = seq + 1;
    t->delivered.fetch_add(1, std::memory_order_relaxed);
  }
};


int run_job(std::vector<std::string> args, tally& t, bool throw_at_7 = false) {
  args.insert(args.begin(), "scaling_test");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  return sc::run_main(
      static_cast<int>(argv.size()), argv.data(), "tiny <job> & co",
      [](std::uint64_t seq) { return seq; },
      [throw_at_7](std::uint64_t v) {
        if (throw_at_7 && v == 7) throw std::runtime_error("stage failed on 7");
        return uneven_work(v);
      },
      in_order_consumer{&t});
}

std::set<std::string> expected_implementations() {
  std::set<std::string> s{"loop", "runnel", "mutex+threads"};
  if (sc::have_tbb) s.insert("tbb");
  return s;
}

// Options for calling one implementation directly.
sc::options small_run(std::uint64_t messages, std::size_t batch, std::size_t capacity) {
  sc::options o;
  o.messages = messages;
  o.batch = batch;
  o.capacity = capacity;
  return o;
}

// The affinity mask of the calling thread, as ascending CPU ids (empty if
// it cannot be read). Called from the runs' threads: no Catch assertions.
std::vector<int> thread_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cpus;
  if (sched_getaffinity(0, sizeof set, &set) != 0) return cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  return cpus;
}

// Every affinity mask seen by the threads that called a job's functions.
struct mask_log {
  std::mutex m;
  std::set<std::vector<int>> masks;
  void record() {
    auto cpus = thread_cpus();
    std::lock_guard lock(m);
    masks.insert(std::move(cpus));
  }
};

// Makes an implementation that may reorder do so, without relying on timing
// to fail: the stage holds message 0 back until message 1 has been consumed.
// An implementation that keeps order cannot consume 1 first, so message 0
// is let go `grace` after message 1's stage returned (a correct run never
// depends on the grace; a reordering one has had it to consume 1 first).
struct hold_back_state {
  static constexpr auto grace = std::chrono::milliseconds(200);
  // Only a liveness bound: a run that never brings message 1 through (no
  // second thread) gives up instead of hanging, and the test fails on it.
  static constexpr auto give_up = std::chrono::seconds(60);
  std::atomic<bool> one_processed{false}, one_consumed{false}, gave_up{false};
  std::mutex m;
  std::vector<std::uint64_t> consumed;
};

struct hold_back_stage {
  hold_back_state* st;
  std::uint64_t operator()(std::uint64_t v) const {
    // seq_cst: a handful of flag reads and writes in a test.
    if (v == 1) st->one_processed.store(true);
    if (v != 0) return v;
    const auto start = std::chrono::steady_clock::now();
    std::optional<std::chrono::steady_clock::time_point> processed_at;
    while (!st->one_consumed.load()) {
      const auto now = std::chrono::steady_clock::now();
      if (!processed_at && st->one_processed.load()) processed_at = now;
      if (processed_at && now - *processed_at > hold_back_state::grace) break;
      if (now - start > hold_back_state::give_up) {
        st->gave_up.store(true);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return v;
  }
};

struct hold_back_consumer {
  hold_back_state* st;
  void operator()(std::uint64_t v) {
    {
      std::lock_guard lock(st->m);
      st->consumed.push_back(v);
    }
    if (v == 1) st->one_consumed.store(true);
  }
};

}  // namespace

TEST_CASE("the defaults run 1, 2, 4 ... up to the allowed CPUs, and the CPUs themselves", "[scaling][args]") {
  const auto o = parse({}, 6);
  CHECK(o.cores == std::vector<std::size_t>{1, 2, 4, 6});
  CHECK(parse({}, 1).cores == std::vector<std::size_t>{1});
  CHECK(parse({}, 8).cores == std::vector<std::size_t>{1, 2, 4, 8});
  CHECK(parse({"--cores", "all"}, 2).cores == std::vector<std::size_t>{1, 2});
  CHECK(o.messages == sc::default_messages);
  CHECK(o.seconds == 0);
  CHECK(o.repetitions == 3);
  CHECK(o.batch == 64);
  CHECK(o.capacity == 1024);
  CHECK_FALSE(o.ordered);
  CHECK_FALSE(o.peers);
}

TEST_CASE("every flag is read", "[scaling][args]") {
  const auto o = parse({"--cores", "4,1,2,2", "--oversubscribe", "--seconds", "0.5", "--ordered", "--batch", "8",
                        "--capacity", "16", "--repetitions", "5", "--json", "a.json", "--csv", "a.csv", "--plot",
                        "a.svg", "--peers"},
                       2);
  CHECK(o.cores == std::vector<std::size_t>{1, 2, 4});
  CHECK(o.seconds == 0.5);
  CHECK(o.messages == 0);
  CHECK(o.ordered);
  CHECK(o.batch == 8);
  CHECK(o.capacity == 16);
  CHECK(o.repetitions == 5);
  CHECK(o.json == "a.json");
  CHECK(o.csv == "a.csv");
  CHECK(o.plot == "a.svg");
  CHECK(o.peers);
  CHECK(o.oversubscribe);
  CHECK(parse({"--messages", "1234"}).messages == 1234);
}

TEST_CASE("every bad argument is a usage error that says what is wrong", "[scaling][args]") {
  using Catch::Matchers::Contains;
  CHECK_THAT(usage_message({"--bogus"}), Contains("--bogus"));
  CHECK_THAT(usage_message({"stray"}), Contains("stray"));
  CHECK_THAT(usage_message({"--cores"}), Contains("--cores"));
  CHECK_THAT(usage_message({"--cores", "0"}), Contains("--cores must be at least 1"));
  CHECK_THAT(usage_message({"--cores", "1,,2"}), Contains("'' is not a whole number"));
  CHECK_THAT(usage_message({"--cores", "1,"}), Contains("'' is not a whole number"));
  CHECK_THAT(usage_message({"--cores", "two"}), Contains("'two' is not a whole number"));
  CHECK_THAT(usage_message({"--cores", "1,2x"}), Contains("'2x' is not a whole number"));
  CHECK_THAT(usage_message({"--cores", "-1"}), Contains("--cores"));
  CHECK_THAT(usage_message({"--cores", "99999999999999999999999"}), Contains("not a whole number"));
  CHECK_THAT(usage_message({"--messages", "0"}), Contains("--messages must be at least 1"));
  CHECK_THAT(usage_message({"--messages", "1e3"}), Contains("'1e3' is not a whole number"));
  CHECK_THAT(usage_message({"--seconds", "0"}), Contains("not a positive number of seconds"));
  CHECK_THAT(usage_message({"--seconds", "-2"}), Contains("not a positive number of seconds"));
  CHECK_THAT(usage_message({"--seconds", "soon"}), Contains("not a positive number of seconds"));
  CHECK_THAT(usage_message({"--seconds", "nan"}), Contains("not a positive number of seconds"));
  CHECK_THAT(usage_message({"--seconds", "1s"}), Contains("not a positive number of seconds"));
  CHECK_THAT(usage_message({"--messages", "10", "--seconds", "1"}), Contains("excludes"));
  CHECK_THAT(usage_message({"--batch", "0"}), Contains("--batch must be at least 1"));
  CHECK_THAT(usage_message({"--capacity", "0"}), Contains("--capacity must be at least 1"));
  CHECK_THAT(usage_message({"--repetitions", "0"}), Contains("--repetitions must be at least 1"));
  CHECK_THAT(usage_message({"--amqp", "amqp://127.0.0.1"}), Contains("requires --queue"));
  CHECK_THAT(usage_message({"--queue", "q"}), Contains("requires --amqp"));
  CHECK_THAT(usage_message({"--amqp", "amqp://127.0.0.1", "--queue", "q"}),
             Contains("not built with the RabbitMQ bridge"));
}

TEST_CASE("scaling: --cores beyond the allowed CPUs is refused unless --oversubscribe", "[scaling][args]") {
  using Catch::Matchers::Contains;
  const std::string m = usage_message({"--cores", "1,3"}, 2);
  CHECK_THAT(m, Contains("--cores 3 is more than the 2 CPUs"));
  CHECK_THAT(m, Contains("--oversubscribe"));
  CHECK(usage_message({"--cores", "2"}, 2) == "(no usage_error)");
  CHECK(parse({"--cores", "1,3", "--oversubscribe"}, 2).cores == std::vector<std::size_t>{1, 3});
}

TEST_CASE("scaling: --help is not an error and the program exits 0 for help and 2 for a usage error", "[scaling][args]") {
  try {
    parse({"--help"});
    FAIL("no help_requested");
  } catch (const sc::help_requested& h) {
    CHECK_THAT(h.text, Catch::Matchers::Contains("--cores"));
    CHECK_THAT(h.text, Catch::Matchers::Contains("--oversubscribe"));
  }
  tally t;
  CHECK(run_job({"--help"}, t) == 0);
  CHECK(run_job({"--cores", "0"}, t) == 2);
  CHECK(run_job({"--amqp", "amqp://127.0.0.1", "--queue", "q"}, t) == 2);
  CHECK(t.delivered == 0);
}

TEST_CASE("the latency histogram's percentiles are within its bucket width", "[scaling][report]") {
  sc::latency_histogram h;
  CHECK(h.quantile(0.5) == 0);
  for (std::uint64_t v = 1; v <= 1000; ++v) h.record(v * 1000);  // 1 us .. 1 ms
  CHECK(h.count() == 1000);
  CHECK(std::abs(h.quantile(0.50) - 500'000) <= 500'000 / 16.0);
  CHECK(std::abs(h.quantile(0.99) - 990'000) <= 990'000 / 16.0);
  CHECK(std::abs(h.quantile(0.999) - 999'000) <= 999'000 / 16.0);
  sc::latency_histogram small;
  for (std::uint64_t v : {3, 3, 7, 31}) small.record(v);
  CHECK(small.quantile(0.5) == 3);
  CHECK(small.quantile(0.75) == 7);
  CHECK(small.quantile(1.0) == 31);
  h.merge(small);
  CHECK(h.count() == 1004);
  CHECK(h.quantile(0.001) == 3);
  // Every bucket's range starts where the previous one ends.
  for (std::size_t i = 1; i < sc::latency_histogram::buckets; ++i) {
    const double lo = sc::latency_histogram::lower(i);
    REQUIRE(sc::latency_histogram::index(static_cast<std::uint64_t>(lo)) == i);
    REQUIRE(sc::latency_histogram::index(static_cast<std::uint64_t>(lo) - 1) == i - 1);
  }
}

TEST_CASE("ratios are computed against the 1-core row and the loop, and left empty without them",
          "[scaling][report]") {
  sc::report rep;
  rep.title = "made up";
  rep.cpus = 4;
  auto row = [](std::string impl, std::size_t cores, std::vector<double> rates) {
    sc::result_row r;
    r.implementation = std::move(impl);
    r.cores = cores;
    r.rates = std::move(rates);
    r.cpu_seconds.assign(r.rates.size(), 0.5);
    r.counts.assign(r.rates.size(), 100);
    return r;
  };
  rep.rows = {row("loop", 1, {200}), row("x", 1, {90, 100, 130}), row("x", 4, {300, 360, 340}),
              row("y", 2, {50, 70})};
  sc::summarise(rep);
  const auto& x1 = rep.rows[1];
  const auto& x4 = rep.rows[2];
  const auto& y2 = rep.rows[3];
  CHECK(x1.median == 100);
  CHECK(x1.min == 90);
  CHECK(x1.max == 130);
  CHECK(x1.speedup == 1);
  CHECK(x1.vs_loop == 0.5);
  CHECK(x4.median == 340);
  CHECK(x4.speedup == Approx(3.4));
  CHECK(x4.efficiency == Approx(0.85));
  CHECK(x4.vs_loop == Approx(1.7));
  CHECK(y2.median == 60);  // even count: mean of the middle two
  CHECK(std::isnan(y2.speedup));
  CHECK(std::isnan(y2.efficiency));
  const auto j = sc::to_json(rep);
  CHECK(j["results"][3]["speedup"].is_null());
  CHECK(j["results"][3]["vs_loop"] == Approx(0.3));
  std::ostringstream csv;
  sc::write_csv(rep, csv);
  const auto rows = read_csv(csv.str());
  REQUIRE(rows.size() == 5);
  CHECK(rows[4][0] == "y");
  CHECK(rows[4][6].empty());  // speedup
  std::ostringstream svg;
  sc::write_svg(rep, svg);
  const xml_check x(svg.str());
  CHECK(x.error.empty());
  CHECK(x.series == std::vector<std::string>{"loop", "x", "y"});
}

TEST_CASE("names with XML and CSV specials are escaped", "[scaling][report]") {
  sc::report rep;
  rep.title = "a <b> & \"c\"";
  rep.cpus = 2;
  sc::result_row r;
  r.implementation = "q\"uo,te<&>";
  r.cores = 1;
  r.rates = {10};
  rep.rows = {r};
  sc::summarise(rep);
  std::ostringstream svg, csv;
  sc::write_svg(rep, svg);
  const xml_check x(svg.str());
  CHECK(x.error.empty());
  REQUIRE(x.series.size() == 1);
  CHECK(x.series[0] == "q&quot;uo,te&lt;&amp;&gt;");
  sc::write_csv(rep, csv);
  const auto rows = read_csv(csv.str());
  REQUIRE(rows.size() == 2);
  CHECK(rows[1].size() == rows[0].size());
  CHECK(rows[1][0] == "q\"uo,te<&>");
}

TEST_CASE("a tiny run of a linked-in job writes a table, JSON, CSV and an SVG that read back", "[scaling][run]") {
  temp_dir dir;
  const std::string json = dir.file("r.json"), csv = dir.file("r.csv"), svg = dir.file("r.svg");
  tally t;
  const bool ordered = GENERATE(false, true);
  std::vector<std::string> args{"--cores", "1,2", "--oversubscribe", "--messages", "700", "--repetitions", "2",
                                "--batch", "4", "--capacity", "8", "--peers", "--json", json, "--csv", csv,
                                "--plot", svg};
  if (ordered) args.push_back("--ordered");
  REQUIRE(run_job(args, t) == 0);

  const auto impls = expected_implementations();
  const std::size_t rows_expected = impls.size() + (impls.size() - 1);  // the loop only on 1 core
  CHECK(t.delivered == 700 * 2 * rows_expected);
  if (ordered) CHECK(t.out_of_order == 0);

  const auto j = nlohmann::json::parse(slurp(json));
  CHECK(j["title"] == "tiny <job> & co");
  CHECK(j["options"]["ordered"] == ordered);
  REQUIRE(j["results"].size() == rows_expected);
  std::set<std::string> seen;
  for (const auto& r : j["results"]) {
    seen.insert(r["implementation"].get<std::string>());
    CHECK(r["messages"] == 700);
    const auto& m = r["messages_per_second"];
    CHECK(m["repetitions"].size() == 2);
    CHECK(m["min"].get<double>() > 0);
    CHECK(m["min"].get<double>() <= m["median"].get<double>());
    CHECK(m["median"].get<double>() <= m["max"].get<double>());
    CHECK(r["latency_ns"]["p50"].get<double>() > 0);
    CHECK(r["latency_ns"]["p50"].get<double>() <= r["latency_ns"]["p99"].get<double>());
    CHECK(r["latency_ns"]["p99"].get<double>() <= r["latency_ns"]["p999"].get<double>());
    if (r["cores"] == 1) CHECK(r["speedup"] == 1.0);
    if (r["implementation"] == "loop") CHECK(r["vs_loop"] == 1.0);
    CHECK(r["efficiency"].get<double>() == Approx(r["speedup"].get<double>() / r["cores"].get<double>()));
  }
  CHECK(seen == impls);

  const auto rows = read_csv(slurp(csv));
  REQUIRE(rows.size() == rows_expected + 1);
  CHECK(rows[0][0] == "implementation");
  for (const auto& r : rows) CHECK(r.size() == 13);

  const xml_check x(slurp(svg));
  CHECK(x.error.empty());
  CHECK(std::set<std::string>(x.series.begin(), x.series.end()) == impls);
  CHECK(x.series.size() == impls.size());
}

TEST_CASE("a run by time delivers every message it generated", "[scaling][run]") {
  tally t;
  REQUIRE(run_job({"--cores", "1", "--seconds", "0.05", "--repetitions", "1", "--peers"}, t) == 0);
  CHECK(t.delivered > 0);
}

TEST_CASE("an exception from the stage fails the run with status 1", "[scaling][run]") {
  tally t;
  CHECK(run_job({"--cores", "1", "--messages", "100", "--repetitions", "1"}, t, true) == 1);
  CHECK(run_job({"--cores", "1", "--messages", "100", "--repetitions", "1", "--peers"}, t, true) == 1);
}

TEST_CASE("every implementation delivers each message once, in order when asked, on 1 to 3 cores",
          "[scaling][run]") {
  sc::options o = small_run(20000, 4, 16);
  o.ordered = GENERATE(false, true);
  const std::size_t cores = GENERATE(1, 2, 3);
  tally t;
  const sc::job<std::uint64_t (*)(std::uint64_t), std::uint64_t (*)(std::uint64_t), in_order_consumer> j{
      [](std::uint64_t seq) { return seq; }, uneven_work, in_order_consumer{&t}};
  std::vector<sc::run_sample> samples;
  samples.push_back(sc::run_loop(o, j));
  samples.push_back(sc::run_runnel(o, cores, j));
  samples.push_back(sc::run_mutex_threads(o, cores, j));
#ifdef RUNNEL_SCALING_HAVE_TBB
  samples.push_back(sc::run_tbb(o, cores, j));
#endif
  for (const auto& s : samples) {
    CHECK(s.messages == 20000);
    CHECK(s.latency.count() == 20000);
  }
  CHECK(t.delivered == 20000 * samples.size());
  if (o.ordered) CHECK(t.out_of_order == 0);
}

TEST_CASE("an exception from a user function reaches the caller of every implementation", "[scaling][run]") {
  sc::options o = small_run(500, 4, 16);
  const std::size_t cores = GENERATE(1, 2);
  tally t;
  auto throwing = [](std::uint64_t v) -> std::uint64_t {
    if (v == 123) throw std::runtime_error("stage failed on 123");
    return v;
  };
  const sc::job<std::uint64_t (*)(std::uint64_t), decltype(throwing), in_order_consumer> j{
      [](std::uint64_t seq) { return seq; }, throwing, in_order_consumer{&t}};
  CHECK_THROWS_WITH(sc::run_loop(o, j), "stage failed on 123");
  CHECK_THROWS_WITH(sc::run_runnel(o, cores, j), "stage failed on 123");
  CHECK_THROWS_WITH(sc::run_mutex_threads(o, cores, j), "stage failed on 123");
#ifdef RUNNEL_SCALING_HAVE_TBB
  CHECK_THROWS_WITH(sc::run_tbb(o, cores, j), "stage failed on 123");
#endif
  struct throwing_consumer {
    void operator()(std::uint64_t v) {
      if (v == 77) throw std::runtime_error("consumer failed on 77");
    }
  };
  const sc::job<std::uint64_t (*)(std::uint64_t), std::uint64_t (*)(std::uint64_t), throwing_consumer> k{
      [](std::uint64_t seq) { return seq; }, uneven_work, throwing_consumer{}};
  CHECK_THROWS_WITH(sc::run_loop(o, k), "consumer failed on 77");
  CHECK_THROWS_WITH(sc::run_runnel(o, cores, k), "consumer failed on 77");
  CHECK_THROWS_WITH(sc::run_mutex_threads(o, cores, k), "consumer failed on 77");
#ifdef RUNNEL_SCALING_HAVE_TBB
  CHECK_THROWS_WITH(sc::run_tbb(o, cores, k), "consumer failed on 77");
#endif
}

TEST_CASE("an output file that cannot be written fails with status 1", "[scaling][run]") {
  tally t;
  CHECK(run_job({"--cores", "1", "--messages", "50", "--repetitions", "1", "--json", "/nonexistent/dir/r.json"},
                t) == 1);
}

TEST_CASE("with two cores every implementation lets a held-back message be overtaken, unless --ordered",
          "[scaling][run]") {
  sc::options o = small_run(2, 1, 4);
  o.ordered = GENERATE(false, true);
  const std::vector<std::uint64_t> expected = o.ordered ? std::vector<std::uint64_t>{0, 1}
                                                        : std::vector<std::uint64_t>{1, 0};
  std::vector<std::string> impls{"runnel", "mutex+threads"};
  if (sc::have_tbb) impls.emplace_back("tbb");
  for (const auto& impl : impls) {
    INFO(impl << (o.ordered ? ", ordered" : ", unordered"));
    hold_back_state st;
    const sc::job<std::uint64_t (*)(std::uint64_t), hold_back_stage, hold_back_consumer> j{
        [](std::uint64_t seq) { return seq; }, hold_back_stage{&st}, hold_back_consumer{&st}};
    const auto s = sc::run_one(impl, o, 2, j);
    CHECK(s.messages == 2);
    CHECK_FALSE(st.gave_up);
    CHECK(st.consumed == expected);
  }
}

TEST_CASE("the mutex+threads peer runs every thread on the first `cores` allowed CPUs", "[scaling][run]") {
  const std::vector<int> allowed = runnel::detail::affinity_cpus();
  const std::vector<int> before = thread_cpus();
  const std::size_t cores = GENERATE(1, 2, 3);
  const std::vector<int> expected(allowed.begin(),
                                  allowed.begin() + static_cast<std::ptrdiff_t>(std::min(cores, allowed.size())));
  sc::options o = small_run(3000, 4, 16);
  mask_log gen, stage, sink;
  auto generate = [&gen](std::uint64_t seq) {
    gen.record();
    return seq;
  };
  auto process = [&stage](std::uint64_t v) {
    stage.record();
    return v;
  };
  auto consume = [&sink](std::uint64_t) { sink.record(); };
  const sc::job<decltype(generate), decltype(process), decltype(consume)> j{generate, process, consume};
  CHECK(sc::run_mutex_threads(o, cores, j).messages == 3000);
  const std::set<std::vector<int>> one{expected};
  CHECK(gen.masks == one);
  CHECK(stage.masks == one);
  CHECK(sink.masks == one);
  CHECK(thread_cpus() == before);  // the caller's own mask is left alone
}
