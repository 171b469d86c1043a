// RabbitMQ bridge throughput against its peers, one run each, on a private
// broker this program starts (tests/amqp/broker.sh).
//
// Each case: preload N 64-byte messages (transient) into a fresh queue, then
// consume -> W rounds of a 64-bit LCG on the body -> publish an 8-byte
// result to another queue -> ack. Speed is N divided by the time from the
// first delivery to the last ack. Groups:
//   amqp/W=0        broker-bound: runnel vs every peer
//   amqp/W=heavy    W calibrated to ~20 us a message: runnel vs the C loop
//   amqp/W=0,1KiB   1 KiB bodies passed through unchanged: runnel_sealed
//                   (consume_options::open + publish_options::seal) vs
//                   unsealed (the same pipeline, plain), preloaded through
//                   the bridge so the sealed inputs carry their header
//   seal/1KiB       sealer::seal and sealer::open of a 1 KiB body alone
//                   (us_per_KiB: µs of CPU a seal + open; shown with the
//                   unit "s" of an inverted rate)
// Peers: rabbitmq_c_loop, the obvious hand-written single-thread program
// (consume, compute, publish, ack multiple every 64; no publisher confirms);
// rabbitmq_c_loop_confirms, the same loop with runnel's guarantee (confirms,
// pipelined; inputs acked multiple only up to confirmed results);
// pika_threadpool, pika with a ThreadPoolExecutor(2) and acks via
// add_callback_threadsafe; pika_2proc, two single-threaded pika processes with
// a connection each. runnel publishes with confirms and acks only confirmed
// results. "amqp/idle" reports the CPU use of an idle runnel consumer.
// Every row counts the CPU a message of the client, of the broker and both;
// the rows are printed at the end, runnel's with the bounds of its ratios
// (see bounds_reporter), followed by the ratio table and a table of the
// targets (W = 0: >= 1.0x rabbitmq_c_loop, >= 20x pika_threadpool; heavy W:
// >= 1.7x rabbitmq_c_loop) beside the ratios reached and their bounds.
//
//   amqp_bench [--smoke] [Google Benchmark flags]   (N: RUNNEL_AMQP_BENCH_N,
//   default 200000; --smoke: 2000 and no pika peers)
#include <runnel/amqp.hpp>
#include <runnel/pipeline.hpp>
#include <runnel/thread_pool.hpp>
#include <dirent.h>
#include <sched.h>
#include <sys/resource.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "amqp/bridge_bench.hpp"
#include "bench_support.hpp"

namespace {

using clock_type = std::chrono::steady_clock;

std::size_t n_messages() {
  if (runnel_bench::smoke) return 2000;
  const char* v = std::getenv("RUNNEL_AMQP_BENCH_N");
  return v != nullptr ? static_cast<std::size_t>(std::atol(v)) : 200000;
}

using runnel_bench::heavy_w;
using runnel_bench::work;
runnel_test::broker& the_broker() { return runnel_bench::the_broker("amqp_bench"); }

unsigned bench_prefetch() {
  const char* v = std::getenv("RUNNEL_AMQP_BENCH_PREFETCH");
  return v != nullptr ? static_cast<unsigned>(std::atoi(v)) : 256;
}

// Fresh in/out queues with N preloaded inputs.
std::pair<std::string, std::string> preload(std::size_t n) {
  static int k = 0;
  const std::string in = "bench-in-" + std::to_string(++k), out = "bench-out-" + std::to_string(k);
  runnel_test::raw r(the_broker().port());
  r.persistent_ = false;
  r.fresh_queue(in);
  r.fresh_queue(out);
  const std::string pad(56, 'x');
  r.publish_n(in, n, [&pad](std::size_t i) {
    char id[16];
    std::snprintf(id, sizeof id, "%08zu", i);
    return std::string(id, 8) + pad;
  });
  return {in, out};
}

// CPU seconds (user + system) used so far by the broker's Erlang VM.
double broker_cpu() {
  static const std::string pid = [] {
    std::string out = the_broker().ctl("eval 'os:getpid().'");
    std::string digits;
    for (char ch : out)
      if (ch >= '0' && ch <= '9') digits += ch;
    return digits;
  }();
  FILE* f = std::fopen(("/proc/" + pid + "/stat").c_str(), "r");
  if (f == nullptr) return 0;
  char buf[4096];
  const std::size_t len = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[len] = '\0';
  // Fields after the command name (which ends with the last ')'): utime is
  // the 12th, stime the 13th.
  const char* p = std::strrchr(buf, ')');
  if (p == nullptr) return 0;
  unsigned long utime = 0, stime = 0;
  if (std::sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) != 2) return 0;
  return static_cast<double>(utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

bool check_out(benchmark::State& state, const std::string& out, std::size_t n) {
  runnel_test::raw r(the_broker().port());
  // A peer without confirms may finish before the broker routed its last
  // results: give them a moment.
  std::uint32_t got = 0;
  for (int i = 0; i < 100 && (got = r.ready(out)) != n; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  if (got != n) {
    state.SkipWithError(("output holds " + std::to_string(got) + " of " + std::to_string(n)).c_str());
    return false;
  }
  return true;
}

// CPU seconds (user + system) of this process (RUSAGE_SELF) or of its
// waited-for children (RUSAGE_CHILDREN: the pika peers).
double own_cpu(int who) {
  rusage r{};
  ::getrusage(who, &r);
  auto sec = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6; };
  return sec(r.ru_utime) + sec(r.ru_stime);
}

// Context switches (voluntary + involuntary) of every thread of the client
// side so far: each thread that sleeps and is woken again counts one, so the
// count a message says how many hand-offs slept.
double own_switches(int who) {
  rusage r{};
  ::getrusage(who, &r);
  return static_cast<double>(r.ru_nvcsw + r.ru_nivcsw);
}

// Involuntary context switches only: a thread preempted, or one that called
// sched_yield and gave its core away (the pool's idle search yields).
double own_involuntary_switches(int who) {
  rusage r{};
  ::getrusage(who, &r);
  return static_cast<double>(r.ru_nivcsw);
}

// CPU already spent by the broker and by the client side when a timed run
// starts. The client is this process, or (pika) the children it waits for;
// not both, since this process also runs rabbitmqctl now and then.
struct cpu_mark {
  explicit cpu_mark(int who = RUSAGE_SELF) : who(who) {}
  int who;
  double broker = broker_cpu();
  double client = own_cpu(who);
  double switches = own_switches(who);
  double involuntary = own_involuntary_switches(who);
};

// The CPUs this process (and the broker it started, which inherits its
// affinity) may run on.
double cpu_count() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) != 0) return std::max(1u, std::thread::hardware_concurrency());
  return static_cast<double>(CPU_COUNT(&set));
}

// CPU µs the work of one message (W rounds on a 64-byte body) costs this
// thread, measured over enough messages to be read off the thread's CPU
// clock (so other load on the machine does not inflate it).
double work_cpu_us(std::uint64_t w) {
  const std::size_t reps = w > 100 ? 500 : 200000;
  std::string body(64, 'x');
  auto now = [] {
    timespec t{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return static_cast<double>(t.tv_sec) * 1e6 + static_cast<double>(t.tv_nsec) / 1e3;
  };
  const double t0 = now();
  std::uint64_t sum = 0;
  for (std::size_t i = 0; i < reps; ++i) {
    std::memcpy(body.data(), &i, sizeof i);
    sum += work(body.data(), body.size(), w);
  }
  benchmark::DoNotOptimize(sum);
  return (now() - t0) / static_cast<double>(reps);
}

// Besides the rate, a message's CPU: the client's (this process, or the pika
// children), the broker's (its Erlang VM, from /proc), their total, and of
// the client's the part the work W itself costs (w_cpu_us); ncpu, the CPUs
// both share. cpu_bound_msg_s = ncpu / total: where broker and client share
// the CPUs, no client of that cost can pass it. The summary at the end
// (bounds_reporter) adds, for runnel's rows, the bound a client costing
// nothing but W could reach.
void report(benchmark::State& state, std::size_t n, double seconds, const cpu_mark& m, std::uint64_t w) {
  state.SetIterationTime(seconds);
  const double msgs = static_cast<double>(n);
  const double broker_us = 1e6 * (broker_cpu() - m.broker) / msgs;
  const double client_us = 1e6 * (own_cpu(m.who) - m.client) / msgs;
  const double cores = cpu_count();
  state.counters["items_per_second"] = msgs / seconds;
  state.counters["broker_us_per_msg"] = broker_us;
  state.counters["client_us_per_msg"] = client_us;
  state.counters["total_us_per_msg"] = broker_us + client_us;
  state.counters["w_cpu_us"] = work_cpu_us(w);
  state.counters["ncpu"] = cores;
  state.counters["switches_per_msg"] = (own_switches(m.who) - m.switches) / msgs;
  state.counters["invol_per_msg"] = (own_involuntary_switches(m.who) - m.involuntary) / msgs;
  if (broker_us + client_us > 0) state.counters["cpu_bound_msg_s"] = cores * 1e6 / (broker_us + client_us);
}

// CPU seconds each kind of this process's threads has run so far, from
// /proc/self/task/<tid>/schedstat (nanoseconds on the CPU, exact, unlike the
// tick-based rusage split): the bridge's I/O thread (runnel-amqp), the pool's
// workers (runnel-<n>) and the rest (the bench's own thread).
struct thread_cpu {
  double io = 0, pool = 0, other = 0;
};
thread_cpu thread_cpu_now() {
  thread_cpu t;
  DIR* d = ::opendir("/proc/self/task");
  if (d == nullptr) return t;
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const std::string dir = std::string("/proc/self/task/") + e->d_name;
    char comm[32] = {0};
    unsigned long long ns = 0;
    if (FILE* f = std::fopen((dir + "/comm").c_str(), "r")) {
      if (std::fgets(comm, sizeof comm, f) == nullptr) comm[0] = '\0';
      std::fclose(f);
    }
    if (FILE* f = std::fopen((dir + "/schedstat").c_str(), "r")) {
      if (std::fscanf(f, "%llu", &ns) != 1) ns = 0;
      std::fclose(f);
    }
    const std::string name(comm, std::strcspn(comm, "\n"));
    const double sec = static_cast<double>(ns) / 1e9;
    if (name == "runnel-amqp") t.io += sec;
    else if (name.rfind("runnel-", 0) == 0) t.pool += sec;
    else t.other += sec;
  }
  ::closedir(d);
  return t;
}

// One timed runnel run over n preloaded inputs: consume from `co.queue`
// -> `fn` on 2 workers -> publish with `po`, until every input is acked;
// reports the rate and CPU and returns the client's final stats.
template <class Fn>
runnel::amqp::client_stats run_bridge(benchmark::State& state, std::size_t n, const runnel::amqp::consume_options& co,
                                      const runnel::amqp::publish_options& po, std::uint64_t w, Fn fn) {
  const cpu_mark m0;
  const thread_cpu t0 = thread_cpu_now();
  runnel::thread_pool pool({.threads = 2, .pin = false});
  runnel::amqp::client c{runnel::amqp::connection_options::from_url(
      "amqp://guest:guest@127.0.0.1:" + std::to_string(the_broker().port()))};
  std::atomic<bool> started{false};
  // Messages through the stage: this thread sleeps until all n are (looking
  // at the acks every 20 ms, should some never reach the stage), then polls
  // the acks of the last few every millisecond. Polling every millisecond
  // all along cost this thread ~1.5 µs of CPU a message here (a wake-up a
  // millisecond), charged to the client though no peer pays it.
  std::atomic<std::size_t> processed{0};
  std::mutex done_m;
  std::condition_variable done_cv;
  clock_type::time_point first{};
  auto run = runnel::pipeline{pool}
                 .from(c.consume(co))
                 .stage([&](runnel::amqp::delivery d) {
                   if (!started.load(std::memory_order_relaxed) && !started.exchange(true)) first = clock_type::now();
                   fn(d);
                   // Relaxed: a count; the waiter reads it under done_m.
                   if (processed.fetch_add(1, std::memory_order_relaxed) + 1 == n) {
                     const std::lock_guard lock(done_m);
                     done_cv.notify_one();
                   }
                   return d;
                 }, {.workers = 2})
                 .to(c.publish(po))
                 .run();
  {
    std::unique_lock lock(done_m);
    // Relaxed: see above.
    while (processed.load(std::memory_order_relaxed) < n && c.stats().acked < n)
      done_cv.wait_for(lock, std::chrono::milliseconds(20));
  }
  while (c.stats().acked < n) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const auto last = clock_type::now();
  // Where the client's CPU went (the I/O thread ends in close()): µs a
  // message of the I/O thread, of the pool's workers, and of the rest (this
  // thread's start-up and its 1 ms polling of the stats above).
  const thread_cpu t1 = thread_cpu_now();
  c.close();
  run.wait();
  report(state, n, std::chrono::duration<double>(last - first).count(), m0, w);
  const double per = 1e6 / static_cast<double>(n);
  state.counters["io_us_per_msg"] = (t1.io - t0.io) * per;
  state.counters["pool_us_per_msg"] = (t1.pool - t0.pool) * per;
  state.counters["rest_us_per_msg"] = (t1.other - t0.other) * per;
  const runnel::amqp::client_stats st = c.stats();
  state.counters["msgs_per_ack"] = static_cast<double>(n) / static_cast<double>(std::max<std::uint64_t>(1, st.ack_frames));
  return st;
}

void bm_runnel(benchmark::State& state, std::uint64_t w) {
  const std::size_t n = n_messages();
  for (auto _ : state) {
    const auto [in, out] = preload(n);
    const auto st = run_bridge(state, n, {.queue = in, .prefetch = bench_prefetch()},
                               {.routing_key = out, .persistent = false}, w, [w](runnel::amqp::delivery& d) {
                                 const std::uint64_t x = work(d.body.data(), d.body.size(), w);
                                 d.body.assign(reinterpret_cast<const char*>(&x), sizeof x);
                               });
    state.counters["unacked_peak"] = static_cast<double>(st.unacked_peak);
    check_out(state, out, n);
  }
}

// Fresh in/out queues with N preloaded 1 KiB inputs, published through the
// bridge (sealed for `in` when s is set).
std::pair<std::string, std::string> preload_kib(std::size_t n, const std::shared_ptr<const runnel::amqp::sealer>& s) {
  static int k = 0;
  const std::string in = "bench-kin-" + std::to_string(++k), out = "bench-kout-" + std::to_string(k);
  {
    runnel_test::raw r(the_broker().port());
    r.fresh_queue(in);
    r.fresh_queue(out);
  }
  runnel::amqp::client c{runnel::amqp::connection_options::from_url(
      "amqp://guest:guest@127.0.0.1:" + std::to_string(the_broker().port()))};
  {
    auto tx = c.publish({.routing_key = in, .persistent = false, .seal = s});
    for (std::size_t i = 0; i < n; ++i) {
      runnel::amqp::outgoing o;
      o.body.assign(1024, static_cast<char>('a' + i % 26));
      (void)tx.send(std::move(o));
    }
  }
  while (c.stats().confirmed < n) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  c.close();
  return {in, out};
}

// 1 KiB bodies through consume -> stage (unchanged) -> publish, sealed or not.
void bm_kib(benchmark::State& state, bool sealed) {
  const std::size_t n = n_messages();
  static const auto key = std::make_shared<const runnel::amqp::sealer>(runnel::amqp::sealer::parse(
      "bench:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"));
  const auto s = sealed ? key : nullptr;
  for (auto _ : state) {
    const auto [in, out] = preload_kib(n, s);
    runnel::amqp::consume_options co{.queue = in, .prefetch = bench_prefetch()};
    co.open = s;
    const auto st = run_bridge(state, n, co, {.routing_key = out, .persistent = false, .seal = s}, 0,
                               [](runnel::amqp::delivery&) {});
    state.counters["unopened"] = static_cast<double>(st.unopened);
    check_out(state, out, n);
  }
}

// The cost of sealing alone: seal + open of one 1 KiB message.
void bm_seal_kib(benchmark::State& state) {
  const runnel::amqp::sealer s = runnel::amqp::sealer::parse(
      "bench:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0");
  runnel::amqp::message m;
  m.routing_key = "bench-out";
  for (auto _ : state) {
    m.body.assign(1024, 'x');
    s.seal(m);
    s.open(m);
    benchmark::DoNotOptimize(m.body.data());
  }
  state.counters["us_per_KiB"] = benchmark::Counter(static_cast<double>(state.iterations()) * 1e-6,
                                                    benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// The C peers' connection to the bench broker: logged in as guest, channel 1
// (in confirm mode when `confirms`), QoS 256, consuming `queue` with manual acks.
amqp_connection_state_t c_loop_connect(const std::string& queue, bool confirms) {
  amqp_connection_state_t conn = amqp_new_connection();
  amqp_socket_t* sock = amqp_tcp_socket_new(conn);
  amqp_socket_open(sock, "127.0.0.1", the_broker().port());
  amqp_login(conn, "/", 0, 131072, 30, AMQP_SASL_METHOD_PLAIN, "guest", "guest");
  amqp_channel_open(conn, 1);
  if (confirms) amqp_confirm_select(conn, 1);
  amqp_basic_qos(conn, 1, 0, 256, 0);
  amqp_basic_consume(conn, 1, amqp_cstring_bytes(queue.c_str()), amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
  return conn;
}

void bm_c_loop(benchmark::State& state, std::uint64_t w) {
  const std::size_t n = n_messages();
  for (auto _ : state) {
    const auto [in, out] = preload(n);
    const cpu_mark m0;
    amqp_connection_state_t conn = c_loop_connect(in, false);
    amqp_basic_properties_t props{};
    props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG;
    props.delivery_mode = 1;
    clock_type::time_point first{};
    std::uint64_t last_tag = 0;
    for (std::size_t i = 0; i < n; ++i) {
      amqp_envelope_t env;
      amqp_maybe_release_buffers(conn);
      if (amqp_consume_message(conn, &env, nullptr, 0).reply_type != AMQP_RESPONSE_NORMAL) {
        state.SkipWithError("consume failed");
        break;
      }
      if (i == 0) first = clock_type::now();
      const std::uint64_t x = work(static_cast<const char*>(env.message.body.bytes), env.message.body.len, w);
      amqp_bytes_t result{sizeof x, const_cast<std::uint64_t*>(&x)};
      amqp_basic_publish(conn, 1, amqp_empty_bytes, amqp_cstring_bytes(out.c_str()), 0, 0, &props, result);
      last_tag = env.delivery_tag;
      if ((i + 1) % 64 == 0) amqp_basic_ack(conn, 1, last_tag, 1);
      amqp_destroy_envelope(&env);
    }
    amqp_basic_ack(conn, 1, last_tag, 1);
    const auto last = clock_type::now();
    amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
    report(state, n, std::chrono::duration<double>(last - first).count(), m0, w);
    check_out(state, out, n);
  }
}

// (a') The same single-thread loop with the guarantee runnel gives: the
// channel is in confirm mode, publishes are pipelined (never one confirm
// awaited per message), and an input is acked (multiple = true, once at
// least 64 more are settled) only up to the last input whose result the
// broker confirmed. Confirms arrive between deliveries; the loop reads them
// where rabbitmq-c hands back a non-delivery frame.
void bm_c_loop_confirms(benchmark::State& state, std::uint64_t w) {
  const std::size_t n = n_messages();
  for (auto _ : state) {
    const auto [in, out] = preload(n);
    const cpu_mark m0;
    amqp_connection_state_t conn = c_loop_connect(in, true);
    amqp_basic_properties_t props{};
    props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG;
    props.delivery_mode = 1;
    clock_type::time_point first{};
    // input_of[s]: the delivery tag of the input whose result went out as
    // publish sequence number s (1-based, as the broker counts confirms).
    std::vector<std::uint64_t> input_of(n + 1, 0);
    std::vector<bool> single(n + 1, false);  // confirmed singly, above the watermark
    std::uint64_t published = 0, confirmed = 0, acked_tag = 0, ack_frames = 0;
    bool failed = false;
    auto ack_confirmed = [&](std::uint64_t batch) {
      if (confirmed == 0 || input_of[confirmed] < acked_tag + batch) return;
      acked_tag = input_of[confirmed];
      amqp_basic_ack(conn, 1, acked_tag, 1);
      ++ack_frames;
    };
    // Reads the next non-delivery frame: a confirm (advance the watermark
    // and ack what it covers) or anything else (a failure here).
    auto read_confirm = [&] {
      amqp_frame_t f;
      if (amqp_simple_wait_frame(conn, &f) != AMQP_STATUS_OK || f.frame_type != AMQP_FRAME_METHOD ||
          f.payload.method.id != AMQP_BASIC_ACK_METHOD) {
        failed = true;
        return;
      }
      const auto* a = static_cast<const amqp_basic_ack_t*>(f.payload.method.decoded);
      if (a->multiple) {
        confirmed = std::max<std::uint64_t>(confirmed, a->delivery_tag);
      } else if (a->delivery_tag <= n) {
        single[a->delivery_tag] = true;
      }
      while (confirmed < n && single[confirmed + 1]) ++confirmed;
      ack_confirmed(64);
    };
    for (std::size_t i = 0; i < n && !failed;) {
      amqp_envelope_t env;
      amqp_maybe_release_buffers(conn);
      const amqp_rpc_reply_t r = amqp_consume_message(conn, &env, nullptr, 0);
      if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
        read_confirm();
        continue;
      }
      if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        failed = true;
        break;
      }
      if (i++ == 0) first = clock_type::now();
      const std::uint64_t x = work(static_cast<const char*>(env.message.body.bytes), env.message.body.len, w);
      amqp_bytes_t result{sizeof x, const_cast<std::uint64_t*>(&x)};
      amqp_basic_publish(conn, 1, amqp_empty_bytes, amqp_cstring_bytes(out.c_str()), 0, 0, &props, result);
      input_of[++published] = env.delivery_tag;
      amqp_destroy_envelope(&env);
    }
    while (!failed && confirmed < published) read_confirm();
    if (!failed) ack_confirmed(1);
    const auto last = clock_type::now();
    amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
    if (failed) {
      state.SkipWithError("consume or confirm failed");
      continue;
    }
    report(state, n, std::chrono::duration<double>(last - first).count(), m0, w);
    state.counters["msgs_per_ack"] = static_cast<double>(n) / static_cast<double>(std::max<std::uint64_t>(1, ack_frames));
    check_out(state, out, n);
  }
}

// Runs `procs` pika peers; each prints "first last count".
void bm_pika(benchmark::State& state, const char* mode, int procs) {
  const std::size_t n = n_messages();
  for (auto _ : state) {
    const auto [in, out] = preload(n);
    const cpu_mark m0(RUSAGE_CHILDREN);
    std::vector<FILE*> ps;
    for (int i = 0; i < procs; ++i) {
      const std::string cmd = std::string("/usr/bin/python3 ") + RUNNEL_BENCH_DIR + "/amqp/pika_peer.py " + mode + " " +
                              std::to_string(the_broker().port()) + " " + in + " " + out + " 0 " +
                              std::to_string(n);
      ps.push_back(::popen(cmd.c_str(), "r"));
    }
    double first = 1e300, last = 0;
    std::size_t done = 0;
    for (FILE* p : ps) {
      double f = 0, l = 0;
      unsigned long k = 0;
      if (std::fscanf(p, "%lf %lf %lu", &f, &l, &k) == 3) {
        first = std::min(first, f);
        last = std::max(last, l);
        done += k;
      }
      ::pclose(p);
    }
    if (done != n) {
      state.SkipWithError(("pika peer handled " + std::to_string(done) + " of " + std::to_string(n)).c_str());
      continue;
    }
    report(state, n, last - first, m0, 0);
    check_out(state, out, n);
  }
}

// CPU used by a client consuming from an empty queue (its I/O thread
// sleeps in poll) with an idle pool, over 2 s.
void bm_idle(benchmark::State& state) {
  for (auto _ : state) {
    const auto [in, out] = preload(0);
    runnel::thread_pool pool({.threads = 2, .pin = false});
    runnel::amqp::client c{runnel::amqp::connection_options::from_url(
        "amqp://guest:guest@127.0.0.1:" + std::to_string(the_broker().port()))};
    auto run = runnel::pipeline{pool}
                   .from(c.consume({.queue = in, .prefetch = 256}))
                   .sink([](runnel::amqp::delivery) {})
                   .run();
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    rusage r0{}, r1{};
    ::getrusage(RUSAGE_SELF, &r0);
    const auto t0 = clock_type::now();
    std::this_thread::sleep_for(std::chrono::seconds(runnel_bench::smoke ? 1 : 2));
    ::getrusage(RUSAGE_SELF, &r1);
    const double wall = std::chrono::duration<double>(clock_type::now() - t0).count();
    auto sec = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6; };
    const double cpu = sec(r1.ru_utime) - sec(r0.ru_utime) + sec(r1.ru_stime) - sec(r0.ru_stime);
    c.close();
    run.wait();
    state.SetIterationTime(wall);
    state.counters["cpu_percent"] = 100.0 * cpu / wall;
  }
}

std::string load_average() {
  FILE* f = std::fopen("/proc/loadavg", "r");
  if (f == nullptr) return "?";
  char buf[128] = {};
  const bool ok = std::fgets(buf, sizeof buf, f) != nullptr;
  std::fclose(f);
  if (!ok) return "?";
  std::string s(buf);
  // The three averages only.
  std::size_t cut = 0;
  for (int fields = 0; cut < s.size() && fields < 3; ++cut)
    if (s[cut] == ' ') ++fields;
  return s.substr(0, cut > 0 ? cut - 1 : 0);
}

// Holds every row to the end of the run, then adds to runnel's rows of the
// 64-byte groups (amqp/W=0, amqp/W=heavy) the bound a client could reach
// in this run if it cost nothing but the work W itself and the CPUs were
// the broker's and its alone:
//   bound_msg_s   = ncpu / (w_cpu_us + broker_min_us)
//   bound_vs_loop = bound_msg_s / msg/s of rabbitmq_c_loop in the same group
//   bound_vs_pika = bound_msg_s / msg/s of pika_threadpool in the same group
// broker_min_us is the lowest broker CPU a message any client publishing
// with confirms (runnel, rabbitmq_c_loop_confirms) reached in these groups
// in this run: the broker's cost a message moves with the client's pace and
// batching (acks, confirms), so the lowest seen is the most generous
// estimate of what this traffic needs. No client of that traffic can pass
// bound_msg_s, so a target above bound_vs_* is out of reach in this run.
// On a shared machine the peer's rate was measured with part of the CPUs
// only, which makes bound_vs_* loose; share_bound_vs_* gives runnel the
// same CPU share the peer's client and broker used in its row instead:
//   share_bound_vs_loop = total CPU a message of rabbitmq_c_loop / (w_cpu_us + broker_min_us)
// (an estimate, not a proof: a peer that cannot use every CPU, e.g. one
// waiting on the broker, leaves a larger share to a client that can).
// Then prints the rows, the ratio table and a table of the targets, the
// ratios reached and both bounds.
class bounds_reporter : public runnel_bench::ratio_reporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    held_.push_back(runs);
    for (const Run& r : runs)
      if (r.run_type == Run::RT_Iteration)
        std::fprintf(stderr, "done %s%s\n", r.run_name.str().c_str(), r.error_occurred ? " (failed)" : "");
  }

  void Finalize() override {
    struct row {
      std::string group, impl;
      Run* run;
      double at(const char* k) const {
        const auto it = run->counters.find(k);
        return it == run->counters.end() ? 0.0 : it->second.value;
      }
    };
    std::vector<row> rows;
    for (auto& batch : held_) {
      for (Run& r : batch) {
        const bool aggregate = r.run_type == Run::RT_Aggregate;
        if (r.error_occurred || (r.repetitions > 1 ? !(aggregate && r.aggregate_name == "median") : aggregate)) continue;
        const std::string& name = r.run_name.function_name;
        const auto colon = name.rfind(':');
        if (colon == std::string::npos || !(name.rfind("amqp/W=0:", 0) == 0 || name.rfind("amqp/W=heavy:", 0) == 0))
          continue;
        rows.push_back({name.substr(0, colon), name.substr(colon + 1), &r});
      }
    }
    auto confirming = [](const std::string& impl) {
      return impl.rfind("runnel", 0) == 0 || impl.find("_confirms") != std::string::npos;
    };
    auto find = [&rows](const std::string& group, const std::string& impl) -> const row* {
      for (const row& x : rows)
        if (x.group == group && x.impl == impl) return &x;
      return nullptr;
    };
    double broker_min = 0;
    for (const row& x : rows)
      if (confirming(x.impl) && x.at("broker_us_per_msg") > 0 &&
          (broker_min == 0 || x.at("broker_us_per_msg") < broker_min))
        broker_min = x.at("broker_us_per_msg");
    for (row& x : rows) {
      if (x.impl.rfind("runnel", 0) != 0 || broker_min <= 0) continue;
      const double bound = x.at("ncpu") * 1e6 / (x.at("w_cpu_us") + broker_min);
      x.run->counters["broker_min_us"] = broker_min;
      x.run->counters["bound_msg_s"] = bound;
      for (const auto& [peer, key] : {std::pair{"rabbitmq_c_loop", "loop"}, std::pair{"pika_threadpool", "pika"}}) {
        const row* p = find(x.group, peer);
        if (p == nullptr || p->at("items_per_second") <= 0) continue;
        x.run->counters[std::string("bound_vs_") + key] = bound / p->at("items_per_second");
        x.run->counters[std::string("share_bound_vs_") + key] =
            p->at("total_us_per_msg") / (x.at("w_cpu_us") + broker_min);
      }
    }
    for (const auto& batch : held_) ratio_reporter::ReportRuns(batch);
    ratio_reporter::Finalize();
    if (rows.empty()) return;

    std::printf("\nCPU a message in this run (us; client = this process or the pika processes, broker = its Erlang VM)\n");
    std::printf("%-14s %-26s %10s %8s %8s %8s %8s %5s\n", "group", "impl", "msg/s", "client", "broker", "total",
                "W", "ncpu");
    for (const row& x : rows)
      std::printf("%-14s %-26s %10.0f %8.1f %8.1f %8.1f %8.2f %5.0f\n", x.group.c_str(), x.impl.c_str(),
                  x.at("items_per_second"), x.at("client_us_per_msg"), x.at("broker_us_per_msg"),
                  x.at("total_us_per_msg"), x.at("w_cpu_us"), x.at("ncpu"));

    std::printf("\ntargets: runnel msg/s / peer msg/s reached in this run, and the bounds of that ratio for a client\n"
                "costing nothing but W (the broker needing %.1f us a message, the least of any client with\n"
                "confirms here): 'all CPUs' = ncpu / (W + %.1f us) / peer msg/s (cannot be passed in this run);\n"
                "'same share' = peer's total CPU a message / (W + %.1f us) (runnel given the CPU share the peer\n"
                "got); load average %s\n",
                broker_min, broker_min, broker_min, load_average().c_str());
    std::printf("%-14s %-26s %7s %8s %9s %11s  %s\n", "group", "peer", "target", "reached", "all CPUs", "same share",
                "");
    struct target {
      const char* group;
      const char* peer;
      double ratio;
    };
    for (const target& t : {target{"amqp/W=0", "rabbitmq_c_loop", 1.0}, target{"amqp/W=0", "pika_threadpool", 20.0},
                            target{"amqp/W=0", "rabbitmq_c_loop_confirms", 0},
                            target{"amqp/W=heavy", "rabbitmq_c_loop", 1.7},
                            target{"amqp/W=heavy", "rabbitmq_c_loop_confirms", 0}}) {
      const row* ours = find(t.group, "runnel");
      const row* peer = find(t.group, t.peer);
      if (ours == nullptr || peer == nullptr || peer->at("items_per_second") <= 0 || broker_min <= 0) continue;
      const double reached = ours->at("items_per_second") / peer->at("items_per_second");
      const double w = ours->at("w_cpu_us");
      const double all = ours->at("ncpu") * 1e6 / (w + broker_min) / peer->at("items_per_second");
      const double share = peer->at("total_us_per_msg") / (w + broker_min);
      char tgt[16] = "-";
      if (t.ratio > 0) std::snprintf(tgt, sizeof tgt, "%.2f", t.ratio);
      const char* verdict = t.ratio <= 0          ? ""
                            : reached >= t.ratio  ? "met"
                            : t.ratio > all       ? "not met: beyond the bound"
                            : t.ratio > share     ? "not met: beyond the same-share bound"
                                                  : "not met: within both bounds";
      std::printf("%-14s %-26s %7s %8.2f %9.2f %11.2f  %s\n", t.group, t.peer, tgt, reached, all, share, verdict);
    }
    std::fflush(stdout);
  }

 private:
  std::vector<std::vector<Run>> held_;
};

void register_all() {
  auto reg = [](const std::string& name, auto fn) {
    benchmark::RegisterBenchmark(name.c_str(), fn)->Iterations(1)->UseManualTime()->Unit(benchmark::kMillisecond);
  };
  reg("amqp/W=0:runnel", [](benchmark::State& s) { bm_runnel(s, 0); });
  reg("amqp/W=0:rabbitmq_c_loop", [](benchmark::State& s) { bm_c_loop(s, 0); });
  reg("amqp/W=0:rabbitmq_c_loop_confirms", [](benchmark::State& s) { bm_c_loop_confirms(s, 0); });
  if (!runnel_bench::smoke) {
    reg("amqp/W=0:pika_threadpool", [](benchmark::State& s) { bm_pika(s, "pool", 1); });
    reg("amqp/W=0:pika_2proc", [](benchmark::State& s) { bm_pika(s, "proc", 2); });
  }
  reg("amqp/W=heavy:runnel", [](benchmark::State& s) { bm_runnel(s, heavy_w()); });
  reg("amqp/W=heavy:rabbitmq_c_loop", [](benchmark::State& s) { bm_c_loop(s, heavy_w()); });
  reg("amqp/W=heavy:rabbitmq_c_loop_confirms", [](benchmark::State& s) { bm_c_loop_confirms(s, heavy_w()); });
  reg("amqp/W=0,1KiB:runnel_sealed", [](benchmark::State& s) { bm_kib(s, true); });
  reg("amqp/W=0,1KiB:unsealed", [](benchmark::State& s) { bm_kib(s, false); });
  benchmark::RegisterBenchmark("seal/1KiB:runnel_seal_open", bm_seal_kib);
  reg("amqp/idle:runnel", bm_idle);
}

}  // namespace

int main(int argc, char** argv) {
  std::printf("N = %zu messages, heavy W = %llu LCG rounds (~20 us), %.0f CPUs, load average %s\n", n_messages(),
              static_cast<unsigned long long>(heavy_w()), cpu_count(), load_average().c_str());
  bounds_reporter reporter;
  return runnel_bench::run_main(argc, argv, register_all, reporter);
}
