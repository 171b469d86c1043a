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
// pika_threadpool, pika with a ThreadPoolExecutor(2) and acks via
// add_callback_threadsafe; pika_2proc, two single-threaded pika processes with
// a connection each. runnel publishes with confirms and acks only confirmed
// results. "amqp/idle" reports the CPU use of an idle runnel consumer.
//
//   amqp_bench [--smoke] [Google Benchmark flags]   (N: RUNNEL_AMQP_BENCH_N,
//   default 200000; --smoke: 2000 and no pika peers)
#include <runnel/amqp.hpp>
#include <runnel/pipeline.hpp>
#include <runnel/thread_pool.hpp>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

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

// Besides the rate: the broker's and the client's CPU time a message, and
// the rate the two would allow if together they had every core of the
// machine and nothing else ran (cores / (broker + client CPU a message)).
// Where broker and client share the cores, no client of that CPU cost can
// pass that bound; the ratio rate / bound says how close a run came.
void report(benchmark::State& state, std::size_t n, double seconds, const cpu_mark& m) {
  state.SetIterationTime(seconds);
  const double msgs = static_cast<double>(n);
  const double broker_us = 1e6 * (broker_cpu() - m.broker) / msgs;
  const double client_us = 1e6 * (own_cpu(m.who) - m.client) / msgs;
  const double cores = static_cast<double>(std::max(1u, std::thread::hardware_concurrency()));
  state.counters["items_per_second"] = msgs / seconds;
  state.counters["broker_us_per_msg"] = broker_us;
  state.counters["client_us_per_msg"] = client_us;
  state.counters["switches_per_msg"] = (own_switches(m.who) - m.switches) / msgs;
  state.counters["invol_per_msg"] = (own_involuntary_switches(m.who) - m.involuntary) / msgs;
  if (broker_us + client_us > 0) state.counters["cpu_bound_msg_s"] = cores * 1e6 / (broker_us + client_us);
}

// One timed runnel run over n preloaded inputs: consume from `co.queue`
// -> `fn` on 2 workers -> publish with `po`, until every input is acked;
// reports the rate and CPU and returns the client's final stats.
template <class Fn>
runnel::amqp::client_stats run_bridge(benchmark::State& state, std::size_t n, const runnel::amqp::consume_options& co,
                                      const runnel::amqp::publish_options& po, Fn fn) {
  const cpu_mark m0;
  runnel::thread_pool pool({.threads = 2, .pin = false});
  runnel::amqp::client c{runnel::amqp::connection_options::from_url(
      "amqp://guest:guest@127.0.0.1:" + std::to_string(the_broker().port()))};
  std::atomic<bool> started{false};
  clock_type::time_point first{};
  auto run = runnel::pipeline{pool}
                 .from(c.consume(co))
                 .stage([&](runnel::amqp::delivery d) {
                   if (!started.load(std::memory_order_relaxed) && !started.exchange(true)) first = clock_type::now();
                   fn(d);
                   return d;
                 }, {.workers = 2})
                 .to(c.publish(po))
                 .run();
  while (c.stats().acked < n) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const auto last = clock_type::now();
  c.close();
  run.wait();
  report(state, n, std::chrono::duration<double>(last - first).count(), m0);
  const runnel::amqp::client_stats st = c.stats();
  state.counters["msgs_per_ack"] = static_cast<double>(n) / static_cast<double>(std::max<std::uint64_t>(1, st.ack_frames));
  return st;
}

void bm_runnel(benchmark::State& state, std::uint64_t w) {
  const std::size_t n = n_messages();
  for (auto _ : state) {
    const auto [in, out] = preload(n);
    const auto st = run_bridge(state, n, {.queue = in, .prefetch = bench_prefetch()},
                               {.routing_key = out, .persistent = false}, [w](runnel::amqp::delivery& d) {
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
    const auto st = run_bridge(state, n, co, {.routing_key = out, .persistent = false, .seal = s},
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

void bm_c_loop(benchmark::State& state, std::uint64_t w) {
  const std::size_t n = n_messages();
  for (auto _ : state) {
    const auto [in, out] = preload(n);
    const cpu_mark m0;
    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t* sock = amqp_tcp_socket_new(conn);
    amqp_socket_open(sock, "127.0.0.1", the_broker().port());
    amqp_login(conn, "/", 0, 131072, 30, AMQP_SASL_METHOD_PLAIN, "guest", "guest");
    amqp_channel_open(conn, 1);
    amqp_basic_qos(conn, 1, 0, 256, 0);
    amqp_basic_consume(conn, 1, amqp_cstring_bytes(in.c_str()), amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
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
    report(state, n, std::chrono::duration<double>(last - first).count(), m0);
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
    report(state, n, last - first, m0);
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

void register_all() {
  auto reg = [](const std::string& name, auto fn) {
    benchmark::RegisterBenchmark(name.c_str(), fn)->Iterations(1)->UseManualTime()->Unit(benchmark::kMillisecond);
  };
  reg("amqp/W=0:runnel", [](benchmark::State& s) { bm_runnel(s, 0); });
  reg("amqp/W=0:rabbitmq_c_loop", [](benchmark::State& s) { bm_c_loop(s, 0); });
  if (!runnel_bench::smoke) {
    reg("amqp/W=0:pika_threadpool", [](benchmark::State& s) { bm_pika(s, "pool", 1); });
    reg("amqp/W=0:pika_2proc", [](benchmark::State& s) { bm_pika(s, "proc", 2); });
  }
  reg("amqp/W=heavy:runnel", [](benchmark::State& s) { bm_runnel(s, heavy_w()); });
  reg("amqp/W=heavy:rabbitmq_c_loop", [](benchmark::State& s) { bm_c_loop(s, heavy_w()); });
  reg("amqp/W=0,1KiB:runnel_sealed", [](benchmark::State& s) { bm_kib(s, true); });
  reg("amqp/W=0,1KiB:unsealed", [](benchmark::State& s) { bm_kib(s, false); });
  benchmark::RegisterBenchmark("seal/1KiB:runnel_seal_open", bm_seal_kib);
  reg("amqp/idle:runnel", bm_idle);
}

}  // namespace

int main(int argc, char** argv) {
  std::printf("N = %zu messages, heavy W = %llu LCG rounds (~20 us)\n", n_messages(),
              static_cast<unsigned long long>(heavy_w()));
  return runnel_bench::run_main(argc, argv, register_all);
}
