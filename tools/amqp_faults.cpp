// amqp_faults: the at-least-once check of the RabbitMQ bridge under faults,
// on a 3-node cluster (examples/cluster/cluster.sh) and a quorum queue.
//
//   amqp_faults [--rounds 10] [--messages 100000] [--consumers 3] ...
//
// Producers (threads here, rabbitmq-c with publisher confirms) publish
// bodies "P SEQ", each (producer, sequence) once, and record which were
// attempted and which the broker confirmed. Consumers are child processes of
// this program (`amqp_faults consume ...`), each a runnel::amqp::client with
// its own connection, given all three node addresses (each starting at a
// different node); their pipeline's sink appends "P SEQ REDELIVERED EPOCH
// TIME_MS" to a per-process log with one write(2) BEFORE the delivery is
// acked (the sink returning acks it), so a SIGKILL never loses a logged line.
//
// Faults, in rounds (each round injects every kind once, in random order, at
// random moments): SIGKILL of a consumer process (restarted at once);
// rabbitmqctl close_all_connections on a random node; SIGKILL of a random
// node's Erlang VM (restarted 1-2 s later, in the background; the next node
// kill waits for it); a memory alarm (set_vm_memory_high_watermark 0 on a
// random node for 1-2 s, then 0.4), which blocks every publisher in the
// cluster; a network cut of one node: iptables DROP rules on its AMQP port
// (both directions; never the distribution ports, so the cluster is not
// partitioned) for at least 2.5 heartbeats (2 s) and until every consumer
// that was connected to it consumes on another node, at most 15 s. The whole
// run lives in a network namespace of its own (unshare(CLONE_NEWNET) before
// anything starts; every child inherits it), so the rules never touch the
// host's; where that or iptables is not permitted, network_cut is SKIPPED
// (said loudly) and the other kinds run.
//
// Then: producers stop, the queue is drained, consumers are stopped with
// SIGTERM (each must exit within 40 s: else it "hung"), and the logs are
// checked: every confirmed id processed at least once (lost = 0); nothing
// processed that was never attempted; duplicates counted, and whether every
// repeat was marked redelivered; the queue and its dead-letter queue empty;
// every consumer a network cut silenced consumed on another node before the
// cut was lifted (the heartbeat noticed the silence). Exit status 0 only
// when all of that holds. A one-screen summary goes to
// stdout and the figures to --json.
//
// --throughput 1,2,4 measures instead (no faults): a filled queue drained by
// that many consumer processes, quorum and classic.
//
// --mutant buffered-log makes the consumers log through a stdio buffer that
// a SIGKILL throws away (acked, never logged): lost > 0, exit status 1.
// --mutant no-heartbeat runs the consumers with heartbeat=0: a cut consumer
// never notices the silence, so it is still on the cut node when the cut is
// lifted: exit status 1.
#include <runnel/amqp.hpp>
#include <runnel/pipeline.hpp>
#include <runnel/thread_pool.hpp>

#include <CLI/CLI.hpp>
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <fcntl.h>
#include <net/if.h>
#include <nlohmann/json.hpp>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#ifndef RUNNEL_CLUSTER_SCRIPT
#define RUNNEL_CLUSTER_SCRIPT "examples/cluster/cluster.sh"
#endif

namespace {

using clock_type = std::chrono::steady_clock;  // CLOCK_MONOTONIC: one clock for all processes here

long long now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(clock_type::now().time_since_epoch()).count();
}

void sleep_ms(long long ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

// The heartbeat (seconds) of the consumers and producers: a silent peer is
// noticed after 2 of them (rabbitmq-c's AMQP_STATUS_HEARTBEAT_TIMEOUT), so a
// cut must last longer than that.
constexpr int heartbeat_s = 2;

// ---------------------------------------------------------------- consumer

volatile std::sig_atomic_t stop_requested = 0;
extern "C" void on_term(int) { stop_requested = 1; }

struct consumer_args {
  std::string url, queue, log, stats;
  unsigned prefetch = 100;
  std::string mutant;
};

int run_consumer(const consumer_args& a) {
  std::signal(SIGTERM, on_term);
  std::signal(SIGINT, on_term);
  const int fd = ::open(a.log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) {
    std::perror("amqp_faults consume: open log");
    return 3;
  }
  // The mutant: lines wait in a user-space buffer a SIGKILL throws away.
  FILE* buffered = nullptr;
  if (a.mutant == "buffered-log") {
    buffered = ::fdopen(fd, "a");
    static char buf[1 << 20];
    std::setvbuf(buffered, buf, _IOFBF, sizeof buf);
  }
  try {
    auto opts = runnel::amqp::connection_options::from_url(a.url);
    opts.reconnect_max_ms = 1000;
    runnel::amqp::client client{opts};
    runnel::thread_pool pool{{.threads = 1, .name_prefix = "faults"}};
    auto run = runnel::pipeline{pool}
                   .from(client.consume({.queue = a.queue, .prefetch = a.prefetch}))
                   .sink([&](runnel::amqp::delivery d) {
                     char line[128];
                     const int n = std::snprintf(line, sizeof line, "%s %d %llu %lld\n", d.body.c_str(),
                                                 d.redelivered ? 1 : 0,
                                                 static_cast<unsigned long long>(d.epoch()), now_ms());
                     if (buffered != nullptr) {
                       std::fwrite(line, 1, static_cast<std::size_t>(n), buffered);
                     } else if (::write(fd, line, static_cast<std::size_t>(n)) != n) {
                       throw std::runtime_error("log write failed");  // not acked: goes to the failure policy
                     }
                     // d destroyed on return: acked, after the line is in the kernel.
                   })
                   .run();
    std::uint64_t reconnects_seen = 0;
    while (stop_requested == 0) {
      if (run.wait_for(std::chrono::milliseconds(100))) break;  // the client ended (an error): report it
      // The mutant leak-fd: a descriptor lost per reconnect (the resource
      // check must fail).
      if (a.mutant == "leak-fd")
        for (const auto r = client.stats().reconnects; reconnects_seen < r; ++reconnects_seen)
          if (::open("/dev/null", O_RDONLY | O_CLOEXEC) < 0) std::perror("open /dev/null");
    }
    client.close();
    run.wait();
    if (buffered != nullptr) std::fflush(buffered);
    const auto s = client.stats();
    std::ofstream(a.stats) << nlohmann::json{{"delivered", s.delivered},   {"redelivered", s.redelivered},
                                             {"acked", s.acked},           {"nacked", s.nacked},
                                             {"reconnects", s.reconnects}, {"stale", s.stale},
                                             {"unacked_peak", s.unacked_peak}}
                                  .dump()
                           << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "amqp_faults consume: %s\n", e.what());
    return 2;
  }
}

// ---------------------------------------------------------------- producer

// One producer: its own connection, publisher confirms, batches of `batch`
// messages each waited for; a fault (or 15 s without all confirms) drops the
// connection and the unconfirmed ids stay "attempted". Ids are never reused.
struct producer {
  int id = 0;
  std::vector<runnel::amqp::endpoint> endpoints;
  std::string queue;
  unsigned batch = 100;
  double rate = 500;  // messages per second
  std::atomic<bool>* stop = nullptr;

  // state[seq]: 1 attempted, 2 confirmed. Read by the checker after join().
  std::vector<std::uint8_t> state;
  std::atomic<std::uint64_t> attempted{0}, confirmed{0};  // progress gauges for the summary line
  std::uint64_t reconnects = 0, nacked = 0;
  long long blocked_ms = 0;

  // Publishes until `n` messages are confirmed (no faults expected).
  void run_until(std::uint64_t n) {
    limit = n;
    run();
  }
  std::uint64_t limit = 0;  // run_until: stop once this many are confirmed

  void run() {
    std::size_t next_ep = static_cast<std::size_t>(id);
    const auto start = clock_type::now();
    std::uint64_t sent = 0;
    while (!stop->load()) {
      amqp_connection_state_t conn = amqp_new_connection();
      amqp_socket_t* sock = amqp_tcp_socket_new(conn);
      const auto& ep = endpoints[next_ep++ % endpoints.size()];
      timeval tv{3, 0};
      bool ok = sock != nullptr && amqp_socket_open_noblock(sock, ep.host.c_str(), ep.port, &tv) == AMQP_STATUS_OK;
      if (ok) {
        amqp_set_rpc_timeout(conn, &tv);
        ok = amqp_login(conn, "/", 0, 131072, heartbeat_s, AMQP_SASL_METHOD_PLAIN, "guest", "guest").reply_type ==
             AMQP_RESPONSE_NORMAL;
      }
      if (ok) ok = amqp_channel_open(conn, 1) != nullptr && amqp_get_rpc_reply(conn).reply_type == AMQP_RESPONSE_NORMAL;
      if (ok) ok = amqp_confirm_select(conn, 1) != nullptr && amqp_get_rpc_reply(conn).reply_type == AMQP_RESPONSE_NORMAL;
      std::uint64_t next_tag = 1;
      while (ok && !stop->load()) {
        if (limit > 0 && confirmed.load() >= limit) return (void)amqp_destroy_connection(conn);
        // Pace to the rate.
        const double due_s = static_cast<double>(sent) / rate;
        const double el_s = std::chrono::duration<double>(clock_type::now() - start).count();
        if (due_s > el_s) sleep_ms(static_cast<long long>((due_s - el_s) * 1000) + 1);
        const std::uint64_t n = batch;
        const std::uint64_t seq0 = state.size(), tag0 = next_tag;
        state.resize(seq0 + n, 1);
        for (std::uint64_t i = 0; i < n && ok; ++i) {
          char body[48];
          const int len = std::snprintf(body, sizeof body, "%d %llu", id, static_cast<unsigned long long>(seq0 + i));
          amqp_basic_properties_t props{};
          props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG;
          props.delivery_mode = 2;
          ok = amqp_basic_publish(conn, 1, amqp_empty_bytes, amqp_cstring_bytes(queue.c_str()), 0, 0, &props,
                                  amqp_bytes_t{static_cast<std::size_t>(len), body}) == AMQP_STATUS_OK;
          ++next_tag;
        }
        sent += n;
        attempted.fetch_add(n);
        // Wait for every confirm of the batch.
        std::uint64_t settled_upto = tag0 - 1;  // tags <= this are settled (acks/nacks come in order here)
        const auto t_wait = clock_type::now();
        const auto deadline = t_wait + std::chrono::seconds(15);
        while (ok && settled_upto + 1 < next_tag) {
          if (clock_type::now() > deadline) { ok = false; break; }
          amqp_frame_t f;
          timeval wt{0, 200000};
          const int st = amqp_simple_wait_frame_noblock(conn, &f, &wt);
          if (st == AMQP_STATUS_TIMEOUT) continue;
          if (st != AMQP_STATUS_OK || f.frame_type != AMQP_FRAME_METHOD) { ok = st == AMQP_STATUS_OK; continue; }
          const auto mid = f.payload.method.id;
          if (mid == AMQP_BASIC_ACK_METHOD || mid == AMQP_BASIC_NACK_METHOD) {
            std::uint64_t tag = 0;
            bool multiple = false;
            if (mid == AMQP_BASIC_ACK_METHOD) {
              const auto* m = static_cast<amqp_basic_ack_t*>(f.payload.method.decoded);
              tag = m->delivery_tag;
              multiple = m->multiple != 0;
            } else {
              const auto* m = static_cast<amqp_basic_nack_t*>(f.payload.method.decoded);
              tag = m->delivery_tag;
              multiple = m->multiple != 0;
            }
            const std::uint64_t from = multiple ? std::max(settled_upto + 1, tag0) : tag;
            for (std::uint64_t t = from; t <= tag; ++t) {
              if (t < tag0) continue;
              const std::uint64_t seq = seq0 + (t - tag0);
              if (mid == AMQP_BASIC_ACK_METHOD) {
                if (state[seq] != 2) confirmed.fetch_add(1);
                state[seq] = 2;
              } else {
                ++nacked;
              }
            }
            settled_upto = std::max(settled_upto, tag);
          } else if (mid == AMQP_CHANNEL_CLOSE_METHOD || mid == AMQP_CONNECTION_CLOSE_METHOD) {
            ok = false;
          }
        }
        blocked_ms += std::chrono::duration_cast<std::chrono::milliseconds>(clock_type::now() - t_wait).count();
      }
      amqp_destroy_connection(conn);  // closes the socket; no close handshake after a fault
      if (!stop->load()) {
        ++reconnects;
        sleep_ms(200);
      }
    }
  }
};

// ---------------------------------------------------------------- harness

std::string script = RUNNEL_CLUSTER_SCRIPT;
std::string cluster_dir;

// Runs a shell command; its exit status, its output (stdout and stderr) in *out.
int shell(const std::string& cmd, std::string* out = nullptr) {
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return -1;
  std::string text;
  char buf[512];
  while (std::fgets(buf, sizeof buf, p) != nullptr) text += buf;
  const int st = ::pclose(p);
  if (out != nullptr) *out = text;
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

// Runs the cluster script with args; returns its exit status (its output in *out).
int cluster(const std::vector<std::string>& args, std::string* out = nullptr) {
  std::string cmd = "bash '" + script + "'";
  for (const auto& a : args) cmd += " '" + a + "'";
  return shell(cmd, out);
}

// Starts the cluster script with args in the background; its output goes to
// `log`. The caller waits for the pid.
pid_t cluster_async(const std::vector<std::string>& args, const std::string& log) {
  std::vector<std::string> a{"/bin/bash", script};
  a.insert(a.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& s : a) argv.push_back(s.data());
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int o = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (o >= 0) {
      ::dup2(o, 1);
      ::dup2(o, 2);
    }
    ::execv("/bin/bash", argv.data());
    ::_exit(127);
  }
  return pid;
}

int ctl(int node, const std::vector<std::string>& args, std::string* out = nullptr) {
  std::vector<std::string> a{"ctl", cluster_dir, std::to_string(node)};
  a.insert(a.end(), args.begin(), args.end());
  return cluster(a, out);
}

// A fault injected through rabbitmqctl. The CLI is an Erlang VM of its own
// and times out now and then on this loaded machine, most often while a
// killed node rejoins the cluster; such a miss says nothing about the client
// under test, but a fault that was never injected must not pass silently.
// So: up to 3 attempts a second apart, each failure printed with what the
// CLI said, and the caller counts retries (reported) and final failures
// (which fail the run).
bool fault_ctl(int node, const std::vector<std::string>& args, int& retries) {
  for (int attempt = 1;; ++attempt) {
    std::string out;
    if (ctl(node, args, &out) == 0) return true;
    std::string cmd;
    for (const auto& a : args) cmd += " " + a;
    std::fprintf(stderr, "amqp_faults: attempt %d of rabbitmqctl%s on node %d failed:\n%s\n", attempt, cmd.c_str(),
                 node, out.c_str());
    if (attempt == 3) return false;
    ++retries;
    sleep_ms(1000);
  }
}

struct consumer_proc {
  pid_t pid = -1;
  int index = 0;
  int incarnation = 0;
  std::string log, out, stats;
};

std::string self_exe() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string("amqp_faults");
}

// ---------------------------------------------------------------- network cut

// Moves this process (before it starts any thread or child) into a network
// namespace of its own with its loopback up; the cluster, the consumers and
// the producers all inherit it, so the iptables rules of a network cut never
// reach the host's namespace. False (and why) where that is not permitted.
bool enter_private_netns(std::string& why) {
  // The namespace we are in, to go back to if the new one cannot be used
  // (a namespace without its loopback would strand the whole run).
  const int home = ::open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
  if (::unshare(CLONE_NEWNET) != 0) {
    why = std::string("unshare(CLONE_NEWNET): ") + std::strerror(errno);
    if (home >= 0) ::close(home);
    return false;
  }
  const int s = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
  bool ok = s >= 0 && ::ioctl(s, SIOCGIFFLAGS, &ifr) == 0;
  if (ok) {
    ifr.ifr_flags = static_cast<short>(ifr.ifr_flags | IFF_UP);
    ok = ::ioctl(s, SIOCSIFFLAGS, &ifr) == 0;
  }
  if (!ok) {
    why = std::string("bringing up lo in the new namespace: ") + std::strerror(errno);
    if (home < 0 || ::setns(home, CLONE_NEWNET) != 0) {
      std::fprintf(stderr, "amqp_faults: cannot return to the original network namespace: %s\n", std::strerror(errno));
      std::exit(3);
    }
  }
  if (s >= 0) ::close(s);
  if (home >= 0) ::close(home);
  return ok;
}

// The four DROP rules that silence one node's AMQP port (both directions,
// both chains), and nothing else: its distribution port stays open, so the
// cluster itself is not partitioned. op is "-I" (insert) or "-D" (delete
// exactly that rule). Returns how many of the four succeeded.
int cut_rules(const char* op, int port, std::string& err) {
  int ok = 0;
  for (const char* chain : {"INPUT", "OUTPUT"})
    for (const char* dir : {"--dport", "--sport"}) {
      std::string out;
      const std::string cmd = std::string("iptables -w ") + op + " " + chain + " -p tcp " + dir + " " +
                              std::to_string(port) + " -j DROP";
      if (shell(cmd, &out) == 0) ++ok;
      else err += cmd + ": " + out;
    }
  return ok;
}

// The TCP sockets of this network namespace: inode -> (remote port, state),
// from /proc/net/tcp (every address here is 127.0.0.1).
struct tcp_socket {
  int remote_port = 0;
  int state = 0;  // 1 = ESTABLISHED
};
std::map<unsigned long, tcp_socket> tcp_sockets() {
  std::map<unsigned long, tcp_socket> m;
  std::ifstream in("/proc/net/tcp");
  std::string line;
  std::getline(in, line);  // the header
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string sl, local, remote, st, txrx, tr, retr, uid, timeout;
    unsigned long inode = 0;
    if (!(f >> sl >> local >> remote >> st >> txrx >> tr >> retr >> uid >> timeout >> inode) || inode == 0) continue;
    const auto colon = remote.find(':');
    if (colon == std::string::npos) continue;
    m[inode] = {static_cast<int>(std::stoul(remote.substr(colon + 1), nullptr, 16)),
                static_cast<int>(std::stoul(st, nullptr, 16))};
  }
  return m;
}

// The inodes of the sockets process pid holds open.
std::set<unsigned long> socket_inodes(pid_t pid) {
  std::set<unsigned long> s;
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    char buf[64];
    const ssize_t n = ::readlink(it->path().c_str(), buf, sizeof buf - 1);
    if (n <= 0) continue;
    const std::string target(buf, static_cast<std::size_t>(n));
    if (target.rfind("socket:[", 0) == 0) s.insert(std::stoul(target.substr(8)));
  }
  return s;
}

// The remote port of process pid's established connection to one of
// `ports` (0: none); with established_only = false, any socket of it to one
// of them (a connection being opened or closed counts too).
int connected_port(pid_t pid, const std::set<int>& ports, bool established_only = true) {
  const auto socks = tcp_sockets();
  for (const auto inode : socket_inodes(pid)) {
    const auto it = socks.find(inode);
    if (it != socks.end() && ports.count(it->second.remote_port) != 0 && (!established_only || it->second.state == 1))
      return it->second.remote_port;
  }
  return 0;
}

// The epoch of the last complete line of a consumer log (0: none yet) and
// the log's size.
std::pair<std::uint64_t, std::uint64_t> last_epoch(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return {0, 0};
  const auto size = static_cast<std::uint64_t>(in.tellg());
  const std::uint64_t from = size > 4096 ? size - 4096 : 0;
  in.seekg(static_cast<std::streamoff>(from));
  std::string tail(size - from, '\0');
  in.read(tail.data(), static_cast<std::streamsize>(tail.size()));
  const auto end = tail.rfind('\n');
  if (end == std::string::npos) return {0, size};
  const auto begin = tail.rfind('\n', end == 0 ? 0 : end - 1);
  std::istringstream line(tail.substr(begin == std::string::npos || begin >= end ? 0 : begin + 1));
  unsigned p = 0;
  unsigned long long seq = 0, epoch = 0;
  int redelivered = 0;
  if (line >> p >> seq >> redelivered >> epoch) return {epoch, size};
  return {0, size};
}

struct harness {
  std::string work;  // logs here
  std::string queue = "faults";
  std::vector<runnel::amqp::endpoint> endpoints;
  unsigned prefetch = 100;
  std::string mutant;
  std::vector<consumer_proc> consumers;
  std::vector<std::string> all_logs;
  int unexpected_exits = 0;
  std::vector<std::string> exit_notes;

  std::string url_from(int first) const {
    std::string u = "amqp://guest:guest@";
    for (std::size_t i = 0; i < endpoints.size(); ++i) {
      const auto& e = endpoints[(static_cast<std::size_t>(first) + i) % endpoints.size()];
      if (i) u += ",";
      u += e.host + ":" + std::to_string(e.port);
    }
    // The mutant no-heartbeat: heartbeats off, so a silent peer is never
    // noticed (rabbitmq-c's heartbeat timeout never fires).
    return u + "/%2f?heartbeat=" + std::to_string(mutant == "no-heartbeat" ? 0 : heartbeat_s) + "&connect_timeout=3";
  }

  void spawn(consumer_proc& c) {
    ++c.incarnation;
    const std::string base = work + "/c" + std::to_string(c.index) + "." + std::to_string(c.incarnation);
    c.log = base + ".log";
    c.out = base + ".out";
    c.stats = base + ".json";
    all_logs.push_back(c.log);
    const std::string exe = self_exe();
    // argv is built before fork(): the child of a threaded process only calls
    // async-signal-safe functions until exec.
    std::vector<std::string> args{exe, "consume", "--url", url_from(c.index), "--queue", queue, "--log", c.log,
                                  "--stats", c.stats, "--prefetch", std::to_string(prefetch)};
    if (!mutant.empty()) {
      args.push_back("--mutant");
      args.push_back(mutant);
    }
    std::vector<char*> argv;
    for (auto& s : args) argv.push_back(s.data());
    argv.push_back(nullptr);
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid == 0) {
      // Ends with the harness, whichever way it ends (spawn() runs on the
      // main thread, whose end is the process's).
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(1);  // it ended before prctl
      const int o = ::open(c.out.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (o >= 0) {
        ::dup2(o, 1);
        ::dup2(o, 2);
      }
      ::execv(exe.c_str(), argv.data());
      ::_exit(127);
    }
    c.pid = pid;
  }

  // Restarts any consumer that exited on its own (counted: the bridge ended).
  void reap() {
    for (auto& c : consumers) {
      int st = 0;
      if (c.pid > 0 && ::waitpid(c.pid, &st, WNOHANG) == c.pid) {
        ++unexpected_exits;
        std::ifstream in(c.out);
        std::string last, line;
        while (std::getline(in, line)) last = line;
        exit_notes.push_back("consumer " + std::to_string(c.index) + " exited (" +
                             (WIFEXITED(st) ? "status " + std::to_string(WEXITSTATUS(st))
                                            : "signal " + std::to_string(WTERMSIG(st))) +
                             "): " + last);
        spawn(c);
      }
    }
  }

  // Resource samples of one consumer process: the first and the latest.
  struct usage {
    long long rss_kb = 0, threads = 0, fds = 0, t = 0;
  };
  struct usage_span {
    int index = 0;
    usage first, last;
  };
  std::map<pid_t, usage_span> usage_by_pid;

  static usage sample(pid_t pid) {
    usage u;
    u.t = now_ms();
    std::ifstream st("/proc/" + std::to_string(pid) + "/status");
    std::string key;
    while (st >> key) {
      if (key == "VmRSS:") st >> u.rss_kb;
      else if (key == "Threads:") st >> u.threads;
    }
    std::error_code ec;
    for (auto it = std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec);
         !ec && it != std::filesystem::directory_iterator(); it.increment(ec))
      ++u.fds;
    return u;
  }
  void sample_all() {
    for (const auto& c : consumers) {
      // A consumer is sampled from its first logged line on: before it, a
      // process just spawned after a kill has not started its client's and
      // pool's threads yet, and its growth to them is start-up, not a leak.
      std::error_code ec;
      if (std::filesystem::file_size(c.log, ec) == 0 || ec) continue;
      const usage u = sample(c.pid);
      if (u.threads == 0) continue;  // gone
      auto [it, fresh] = usage_by_pid.try_emplace(c.pid, usage_span{c.index, u, u});
      if (!fresh) it->second.last = u;
    }
  }

  long long queue_depth(int node, const std::string& name) {
    std::string out;
    if (ctl(node, {"list_queues", "name", "messages"}, &out) != 0) return -1;
    std::istringstream in(out);
    std::string n;
    long long m = 0;
    while (in >> n) {
      if (n == name && (in >> m)) return m;
    }
    return -1;
  }
};

// Lines (newlines) in a file, counted from *offset on; *offset advances.
std::uint64_t count_new_lines(const std::string& path, std::uint64_t* offset) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return 0;
  in.seekg(static_cast<std::streamoff>(*offset));
  std::uint64_t n = 0;
  char buf[65536];
  while (in.read(buf, sizeof buf) || in.gcount() > 0) {
    const auto got = static_cast<std::size_t>(in.gcount());
    n += static_cast<std::uint64_t>(std::count(buf, buf + got, '\n'));
    *offset += got;
  }
  return n;
}

// --throughput: no faults. For each queue type and consumer count K, a fresh
// queue is filled with `n` confirmed messages, then K consumer processes
// drain it; msg/s = n over the time from the first message processed to the
// last (process start-up excluded), and each process's share.
nlohmann::json run_throughput(harness& h, const std::vector<int>& counts, std::uint64_t n) {
  nlohmann::json rows = nlohmann::json::array();
  std::printf("\n%-8s %9s %10s %8s  %s\n", "queue", "consumers", "msg/s", "vs 1", "shares");
  int case_no = 0;
  for (const std::string type : {"quorum", "classic"}) {
    double one = 0;
    for (const int k : counts) {
      ++case_no;
      h.queue = "tp." + type + "." + std::to_string(k);
      if (cluster({"declare", cluster_dir, h.queue, type, "50"}) != 0) throw std::runtime_error("declare failed");
      std::atomic<bool> stop{false};
      std::vector<std::unique_ptr<producer>> ps;
      std::vector<std::thread> ts;
      for (int i = 0; i < 2; ++i) {
        auto p = std::make_unique<producer>();
        p->id = i;
        p->endpoints = h.endpoints;
        p->queue = h.queue;
        p->rate = 1e9;
        p->batch = 200;
        p->stop = &stop;
        ps.push_back(std::move(p));
      }
      for (auto& p : ps) ts.emplace_back([&p, n] { p->run_until(n / 2); });
      for (auto& t : ts) t.join();
      std::uint64_t total = 0;
      for (auto& p : ps) total += p->confirmed.load();
      h.consumers.clear();
      h.consumers.resize(static_cast<std::size_t>(k));
      for (int i = 0; i < k; ++i) {
        h.consumers[static_cast<std::size_t>(i)].index = 300 * case_no + i;  // its own log files; starts at node i % 3 + 1
        h.spawn(h.consumers[static_cast<std::size_t>(i)]);
      }
      std::vector<std::uint64_t> offs(static_cast<std::size_t>(k), 0), lines(static_cast<std::size_t>(k), 0);
      std::uint64_t done = 0;
      const auto deadline = clock_type::now() + std::chrono::seconds(300);
      while (done < total && clock_type::now() < deadline) {
        sleep_ms(100);
        done = 0;
        for (int i = 0; i < k; ++i) {
          const auto j = static_cast<std::size_t>(i);
          lines[j] += count_new_lines(h.consumers[j].log, &offs[j]);
          done += lines[j];
        }
      }
      for (auto& c : h.consumers) ::kill(c.pid, SIGTERM);
      for (auto& c : h.consumers) ::waitpid(c.pid, nullptr, 0);
      long long t_first = -1, t_last = -1;
      for (auto& c : h.consumers) {
        std::ifstream in(c.log);
        std::string line;
        while (std::getline(in, line)) {
          const long long t = std::stoll(line.substr(line.rfind(' ') + 1));
          t_first = t_first < 0 ? t : std::min(t_first, t);
          t_last = std::max(t_last, t);
        }
      }
      const double secs = std::max(1e-3, static_cast<double>(t_last - t_first) / 1000.0);
      const double rate = static_cast<double>(done) / secs;
      if (k == counts.front()) one = rate;
      std::string shares;
      nlohmann::json share_json = nlohmann::json::array();
      for (auto l : lines) {
        const double sh = done ? 100.0 * static_cast<double>(l) / static_cast<double>(done) : 0.0;
        char b[16];
        std::snprintf(b, sizeof b, "%.0f%% ", sh);
        shares += b;
        share_json.push_back(sh);
      }
      std::printf("%-8s %9d %10.0f %7.2fx  %s%s\n", type.c_str(), k, rate, one > 0 ? rate / one : 0.0,
                  shares.c_str(), done < total ? " (TIMED OUT)" : "");
      std::fflush(stdout);
      rows.push_back({{"queue_type", type}, {"consumers", k}, {"messages", done}, {"msg_per_s", rate},
                      {"vs_first", one > 0 ? rate / one : 0.0}, {"shares_percent", share_json}});
      ctl(1, {"delete_queue", h.queue});
    }
  }
  return rows;
}

// Every way out of a fault or throughput run (a return, an exception, a
// SIGINT/SIGTERM/SIGHUP) stops the cluster's nodes and its epmd by pid
// (cluster.sh stop, which does nothing once they are stopped) and removes
// the temp directory (never a --keep one). The consumer processes end with
// the harness (PR_SET_PDEATHSIG, see spawn()).
void clean_up(const std::string& temp_dir) {
  cluster({"stop", cluster_dir});
  if (!temp_dir.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(temp_dir, ec);
  }
}

struct clean_up_at_exit {
  std::string temp_dir;  // empty: --keep
  ~clean_up_at_exit() { clean_up(temp_dir); }
};

// A signal's number, written by its handler (write(2) is async-signal-safe)
// and read by a thread that cleans up and ends the process.
int signal_pipe[2] = {-1, -1};
extern "C" void on_harness_signal(int sig) {
  const char c = static_cast<char>(sig);
  [[maybe_unused]] const auto n = ::write(signal_pipe[1], &c, 1);
}

void clean_up_on_signals(const std::string& temp_dir) {
  if (::pipe2(signal_pipe, O_CLOEXEC) != 0) return std::perror("amqp_faults: pipe2");
  std::thread([temp_dir] {
    char sig = 0;
    while (::read(signal_pipe[0], &sig, 1) != 1) {
    }
    std::fprintf(stderr, "amqp_faults: signal %d: stopping the cluster\n", sig);
    clean_up(temp_dir);
    std::_Exit(128 + sig);
  }).detach();
  for (const int sig : {SIGINT, SIGTERM, SIGHUP}) std::signal(sig, on_harness_signal);
}

int harness_main(int argc, char** argv) {
  CLI::App app{"at-least-once check of the RabbitMQ bridge under faults on a 3-node cluster"};
  app.require_subcommand(0, 1);
  consumer_args ca;
  auto* consume = app.add_subcommand("consume", "(internal) one consumer process");
  consume->add_option("--url", ca.url)->required();
  consume->add_option("--queue", ca.queue)->required();
  consume->add_option("--log", ca.log)->required();
  consume->add_option("--stats", ca.stats)->required();
  consume->add_option("--prefetch", ca.prefetch);
  consume->add_option("--mutant", ca.mutant);

  int rounds = 10, consumers_n = 3, producers_n = 2, drain_s = 120;
  std::uint64_t messages = 100000;
  double rate = 700;
  unsigned prefetch = 100, seed = 0;
  std::string json_path = "amqp_faults.json", mutant, queue_type = "quorum", keep_dir;
  std::string cluster_url;
  long long gap_ms = 1000;
  app.add_option("--rounds", rounds, "fault rounds: each injects every kind of fault once")->capture_default_str();
  app.add_option("--messages", messages, "messages to publish at least (publishing goes on until the rounds end)")
      ->capture_default_str();
  app.add_option("--rate", rate, "publish rate, messages/s over all producers")->capture_default_str();
  app.add_option("--consumers", consumers_n, "consumer processes")->capture_default_str();
  app.add_option("--producers", producers_n, "producer connections")->capture_default_str();
  app.add_option("--prefetch", prefetch, "consumer prefetch")->capture_default_str();
  app.add_option("--gap-ms", gap_ms, "mean pause between faults")->capture_default_str();
  app.add_option("--drain", drain_s, "seconds allowed for draining the queue at the end")->capture_default_str();
  app.add_option("--seed", seed, "random seed (0: from the clock)");
  app.add_option("--json", json_path, "where the JSON report goes")->capture_default_str();
  app.add_option("--mutant", mutant,
                 "buffered-log: consumers ack before their log is written; leak-fd: consumers lose a descriptor "
                 "per reconnect; no-heartbeat: consumers run with heartbeats off (each must fail)")
      ->check(CLI::IsMember({"buffered-log", "leak-fd", "no-heartbeat"}));
  app.add_option("--queue-type", queue_type, "quorum or classic")->check(CLI::IsMember({"quorum", "classic"}));
  app.add_option("--cluster-script", script, "examples/cluster/cluster.sh")->capture_default_str();
  app.add_option("--keep", keep_dir, "keep the logs in this directory (default: a temp dir, removed)");
  std::vector<int> throughput;
  std::uint64_t tp_messages = 30000;
  app.add_option("--throughput", throughput,
                 "no faults: drain a filled queue with each of these consumer counts, quorum and classic")
      ->delimiter(',');
  app.add_option("--throughput-messages", tp_messages, "messages per --throughput case")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (consume->parsed()) return run_consumer(ca);

  // The fault run lives in a network namespace of its own (entered before
  // any thread or child exists), where the network cut's iptables rules go;
  // where that is not permitted, network_cut is skipped, loudly, and the
  // other kinds run on the host's loopback.
  std::string cut_skipped;  // why network_cut cannot run here (empty: it runs)
  if (throughput.empty()) {
    if (!enter_private_netns(cut_skipped)) {
      cut_skipped = "no private network namespace here (" + cut_skipped + ")";
    } else if (std::string out; shell("iptables -w -L -n", &out) != 0) {
      cut_skipped = "iptables is not usable in the private network namespace: " + out;
    }
    if (!cut_skipped.empty()) {
      while (!cut_skipped.empty() && cut_skipped.back() == '\n') cut_skipped.pop_back();
      std::printf("amqp_faults: SKIPPED network_cut: %s; the other kinds of fault run\n", cut_skipped.c_str());
      if (mutant == "no-heartbeat") std::printf("amqp_faults: the no-heartbeat mutant cannot be caught without the cut\n");
    } else {
      std::printf("amqp_faults: in a private network namespace (network_cut: iptables DROP on one node's AMQP port)\n");
    }
    std::fflush(stdout);
  }

  if (seed == 0) seed = static_cast<unsigned>(now_ms());
  std::mt19937 rng(seed);
  auto uniform = [&](long long lo, long long hi) { return std::uniform_int_distribution<long long>(lo, hi)(rng); };
  std::signal(SIGPIPE, SIG_IGN);

  char tmpl[] = "/tmp/amqp_faults.XXXXXX";
  if (keep_dir.empty() && ::mkdtemp(tmpl) == nullptr) {
    std::perror("amqp_faults: mkdtemp");
    return 3;
  }
  const std::string top = keep_dir.empty() ? std::string(tmpl) : keep_dir;
  ::mkdir(top.c_str(), 0755);
  ::chmod(top.c_str(), 0755);  // the nodes run as user rabbitmq and need to reach cluster/
  cluster_dir = top + "/cluster";
  const clean_up_at_exit clean_up_guard{keep_dir.empty() ? top : std::string()};
  clean_up_on_signals(clean_up_guard.temp_dir);
  harness h;
  h.work = top + "/logs";
  ::mkdir(h.work.c_str(), 0755);
  h.prefetch = prefetch;
  h.mutant = mutant;
  const auto t_begin = clock_type::now();

  std::printf("amqp_faults: seed %u, starting a 3-node cluster under %s\n", seed, top.c_str());
  std::fflush(stdout);
  std::string out;
  if (cluster({"start", cluster_dir}, &out) != 0) {
    std::fprintf(stderr, "amqp_faults: the cluster did not start:\n%s\n", out.c_str());
    return 3;
  }
  {  // the line with the URL (the script prints nothing else on stdout)
    std::istringstream lines(out);
    std::string line;
    while (std::getline(lines, line))
      if (line.rfind("amqp://", 0) == 0) cluster_url = line;
  }
  h.endpoints = runnel::amqp::connection_options::from_url(cluster_url).endpoints;
  if (cluster({"declare", cluster_dir, h.queue, queue_type, "50"}, &out) != 0) {
    std::fprintf(stderr, "amqp_faults: declaring the queue failed:\n%s\n", out.c_str());
    return 3;
  }
  const double startup_s = std::chrono::duration<double>(clock_type::now() - t_begin).count();
  std::printf("amqp_faults: cluster up in %.1f s: %s\n", startup_s, cluster_url.c_str());
  std::fflush(stdout);

  if (!throughput.empty()) {
    int rc = 0;
    try {
      nlohmann::json j{{"throughput", run_throughput(h, throughput, tp_messages)}};
      std::ofstream(json_path) << j.dump(2) << "\n";
    } catch (const std::exception& e) {
      std::fprintf(stderr, "amqp_faults: %s\n", e.what());
      rc = 1;
    }
    return rc;
  }

  h.consumers.resize(static_cast<std::size_t>(consumers_n));
  for (int i = 0; i < consumers_n; ++i) {
    h.consumers[static_cast<std::size_t>(i)].index = i;
    h.spawn(h.consumers[static_cast<std::size_t>(i)]);
  }

  std::atomic<bool> stop_producers{false};
  std::vector<std::unique_ptr<producer>> producers;
  std::vector<std::thread> producer_threads;
  for (int i = 0; i < producers_n; ++i) {
    auto p = std::make_unique<producer>();
    p->id = i;
    p->endpoints = h.endpoints;
    p->queue = h.queue;
    p->rate = rate / producers_n;
    p->stop = &stop_producers;
    producers.push_back(std::move(p));
  }
  for (auto& p : producers) producer_threads.emplace_back([&p] { p->run(); });

  // ---- faults
  enum kind { consumer_kill, close_all, node_kill, mem_alarm, net_cut, kinds };
  const char* kind_name[kinds] = {"consumer_kill", "close_all_connections", "node_kill", "memory_alarm",
                                  "network_cut"};
  std::array<int, kinds> done{};
  std::vector<long long> node_kill_times;  // ms, when each node was killed
  std::vector<long long> fault_times;      // ms, when each fault began (any kind)
  std::vector<long long> node_restart_ms;
  int fault_failures = 0;
  int fault_retries = 0;
  auto progress = [&](const char* what) {
    std::uint64_t att = 0, conf = 0;
    for (auto& p : producers) att += p->attempted.load(), conf += p->confirmed.load();
    std::printf("  %6.1f s  %-22s attempted %llu confirmed %llu\n",
                std::chrono::duration<double>(clock_type::now() - t_begin).count(), what,
                static_cast<unsigned long long>(att), static_cast<unsigned long long>(conf));
    std::fflush(stdout);
  };
  // A killed node restarts in the background while other faults go on; the
  // next node kill waits for it (never two nodes down: the quorum queue
  // would stop, which is an outage, not a fault we test here).
  pid_t restarting = -1;
  int down_node = 0;
  clock_type::time_point restart_began{};
  auto await_restart = [&] {
    if (restarting < 0) return;
    int st = 0;
    ::waitpid(restarting, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
      // Show why (the logs directory goes away with the run), then try once
      // more in the foreground: a node that cannot come back is a failure.
      std::ifstream log(h.work + "/restart.log");
      std::stringstream text;
      text << log.rdbuf();
      std::fprintf(stderr, "amqp_faults: node %d did not restart:\n%s\n", down_node, text.str().c_str());
      std::string out;
      cluster({"kill", cluster_dir, std::to_string(down_node)});  // whatever half-started
      if (cluster({"start-node", cluster_dir, std::to_string(down_node)}, &out) == 0) {
        ++fault_retries;
      } else {
        ++fault_failures;
        std::fprintf(stderr, "amqp_faults: node %d did not restart on a second try:\n%s\n", down_node, out.c_str());
      }
    }
    node_restart_ms.push_back(
        std::chrono::duration_cast<std::chrono::milliseconds>(clock_type::now() - restart_began).count());
    restarting = -1;
    down_node = 0;
  };
  // A network cut of one node: its AMQP port silenced (iptables DROP, no
  // reset) for at least 2.5 heartbeats, and then until every consumer that
  // was connected to it has processed a message on a new connection (to
  // another node: none to the cut one can open), at most cut_max_ms. A
  // consumer that has not by then is a failure: it did not notice the
  // silence (the heartbeat) or did not fail over.
  constexpr long long cut_min_ms = 2500LL * heartbeat_s, cut_max_ms = 15000;
  std::vector<long long> cut_recovery;  // per cut that cut a consumer: its slowest consumer's recovery
  std::vector<long long> cut_lengths;   // ms, each cut from its rules in to its rules out
  int cut_unrecovered = 0;              // consumers not consuming elsewhere when a cut was lifted
  int cut_consumers = 0;                // consumers whose connection a cut silenced
  std::set<int> node_ports;
  for (const auto& e : h.endpoints) node_ports.insert(e.port);
  auto network_cut = [&](int node) {
    // The node to cut: the one a random consumer is connected to (so that
    // every cut silences a consumer), else the given one.
    std::vector<int> ports;
    for (const auto& c : h.consumers)
      if (const int p = connected_port(c.pid, node_ports); p != 0) ports.push_back(p);
    const int port = ports.empty() ? h.endpoints[static_cast<std::size_t>(node - 1)].port
                                   : ports[static_cast<std::size_t>(uniform(0, static_cast<long long>(ports.size()) - 1))];
    const long long min_ms = cut_min_ms + uniform(0, 1000);
    std::string err;
    const long long t0 = now_ms();
    if (cut_rules("-I", port, err) != 4) {
      std::fprintf(stderr, "amqp_faults: inserting the cut's rules failed:\n%s\n", err.c_str());
      ++fault_failures;
      std::string ignored;
      cut_rules("-D", port, ignored);
      return;
    }
    struct cut_consumer {
      pid_t pid;
      std::string log;
      std::uint64_t epoch_before, offset;
      long long still_connected_at;  // the last poll that saw its socket to the cut port
      long long recovered_at = -1;
      std::string partial;
    };
    std::vector<cut_consumer> cut;
    const std::set<int> cut_port{port};
    for (const auto& c : h.consumers)
      if (connected_port(c.pid, cut_port) != 0) {
        const auto [epoch, size] = last_epoch(c.log);
        cut.push_back({c.pid, c.log, epoch, size, t0, -1, {}});
      }
    cut_consumers += static_cast<int>(cut.size());
    for (;;) {
      const long long now = now_ms();
      bool all = true;
      for (auto& c : cut) {
        if (c.recovered_at >= 0) continue;
        all = false;
        if (connected_port(c.pid, cut_port, false) != 0) {
          c.still_connected_at = now;
          continue;
        }
        // Its connection to the cut node is gone: the first line after that
        // of a newer epoch is its first message on the new connection.
        std::ifstream in(c.log, std::ios::binary);
        in.seekg(static_cast<std::streamoff>(c.offset));
        std::string chunk((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        c.offset += chunk.size();
        c.partial += chunk;
        std::size_t start = 0;
        for (std::size_t nl; (nl = c.partial.find('\n', start)) != std::string::npos; start = nl + 1) {
          std::istringstream line(c.partial.substr(start, nl - start));
          unsigned pr = 0;
          unsigned long long seq = 0, epoch = 0;
          int redelivered = 0;
          long long t = 0;
          if (line >> pr >> seq >> redelivered >> epoch >> t && c.recovered_at < 0 && epoch > c.epoch_before &&
              t > c.still_connected_at)
            c.recovered_at = t;
        }
        c.partial.erase(0, start);
      }
      if ((all && now - t0 >= min_ms) || now - t0 >= cut_max_ms) break;
      sleep_ms(50);
    }
    // Recovery counts only before the first rule goes (each iptables call
    // takes a while on a loaded machine); the cut's length is the whole time
    // any of its rules was in.
    const long long t_lift = now_ms();
    err.clear();
    if (cut_rules("-D", port, err) != 4) {
      std::fprintf(stderr, "amqp_faults: deleting the cut's rules failed:\n%s\n", err.c_str());
      ++fault_failures;
    }
    cut_lengths.push_back(now_ms() - t0);
    long long worst = -1;
    int unrecovered = 0;
    for (const auto& c : cut) {
      if (c.recovered_at < 0 || c.recovered_at >= t_lift) ++unrecovered;
      else worst = std::max(worst, c.recovered_at - t0);
    }
    cut_unrecovered += unrecovered;
    if (unrecovered == 0 && worst >= 0) cut_recovery.push_back(worst);
    const std::string how = cut.empty() ? std::string("no consumer was connected to it")
                            : unrecovered == 0
                                ? "the slowest consuming elsewhere after " + std::to_string(worst) + " ms"
                                : std::to_string(unrecovered) + " NOT consuming elsewhere when it was lifted";
    std::printf("  network cut of port %d lifted after %.1f s (its rules gone after %.1f s): %zu consumer(s) cut, %s\n",
                port, static_cast<double>(t_lift - t0) / 1000.0, static_cast<double>(cut_lengths.back()) / 1000.0,
                cut.size(), how.c_str());
  };
  const auto t_faults = clock_type::now();
  for (int r = 0; r < rounds; ++r) {
    std::array<int, kinds> order{consumer_kill, close_all, node_kill, mem_alarm, net_cut};
    std::shuffle(order.begin(), order.end(), rng);
    for (int k : order) {
      if (k == net_cut && !cut_skipped.empty()) continue;
      sleep_ms(uniform(gap_ms / 2, gap_ms * 3 / 2));
      h.reap();
      if (k == node_kill) await_restart();
      int node = static_cast<int>(uniform(1, 3));
      if (node == down_node) node = node % 3 + 1;  // rabbitmqctl needs a running node
      fault_times.push_back(now_ms());
      switch (k) {
        case consumer_kill: {
          auto& c = h.consumers[static_cast<std::size_t>(uniform(0, consumers_n - 1))];
          ::kill(c.pid, SIGKILL);
          ::waitpid(c.pid, nullptr, 0);
          h.spawn(c);
          break;
        }
        case close_all:
          if (!fault_ctl(node, {"close_all_connections", "fault injection"}, fault_retries)) ++fault_failures;
          break;
        case node_kill: {
          node_kill_times.push_back(fault_times.back());
          cluster({"kill", cluster_dir, std::to_string(node)});
          sleep_ms(uniform(1000, 2000));
          down_node = node;
          restart_began = clock_type::now();
          restarting = cluster_async({"start-node", cluster_dir, std::to_string(node)}, h.work + "/restart.log");
          break;
        }
        case mem_alarm: {
          // One CLI call (each boots an Erlang VM, seconds here) raises the
          // alarm, holds it and clears it, on the node itself: the alarm lasts
          // just the pause, and is cleared even when the CLI loses the node
          // mid-call. An alarm of one node blocks the publishers of the
          // whole cluster; clearing it on that node ends it everywhere. A
          // retry after a failure sets and clears again.
          const std::string set_hold_clear =
              "try ok = vm_memory_monitor:set_vm_memory_high_watermark(0.0), timer:sleep(" +
              std::to_string(uniform(1000, 2000)) +
              ") after ok = vm_memory_monitor:set_vm_memory_high_watermark(0.4) end.";
          if (!fault_ctl(node, {"eval", set_hold_clear}, fault_retries)) ++fault_failures;
          break;
        }
        case net_cut:
          network_cut(node);
          break;
        default:
          break;
      }
      ++done[static_cast<std::size_t>(k)];
      progress(kind_name[k]);
      h.sample_all();
    }
  }
  await_restart();
  const double fault_phase_s = std::chrono::duration<double>(clock_type::now() - t_faults).count();

  // ---- stop producing (once --messages were attempted), drain
  auto attempted_now = [&] {
    std::uint64_t a = 0;
    for (auto& p : producers) a += p->attempted.load();
    return a;
  };
  while (attempted_now() < messages) {
    h.reap();
    sleep_ms(200);
  }
  stop_producers = true;
  for (auto& t : producer_threads) t.join();
  progress("producers done");
  const auto t_drain = clock_type::now();
  long long depth = -1;
  while (clock_type::now() - t_drain < std::chrono::seconds(drain_s)) {
    h.reap();
    depth = h.queue_depth(1, h.queue);
    if (depth == 0) break;
    sleep_ms(1000);
  }
  const long long dead_depth = h.queue_depth(1, h.queue + ".dead");
  const double drain_s_taken = std::chrono::duration<double>(clock_type::now() - t_drain).count();
  progress("drained");

  h.sample_all();
  // The longest-lived consumer process: its threads, descriptors and memory
  // from its first sample to its last (after the drain).
  harness::usage_span longest{};
  for (const auto& [pid, u] : h.usage_by_pid)
    if (u.last.t - u.first.t > longest.last.t - longest.first.t) longest = u;
  const double longest_s = static_cast<double>(longest.last.t - longest.first.t) / 1000.0;
  // ---- stop consumers: each must exit by itself within 40 s
  int hung = 0;
  for (auto& c : h.consumers) ::kill(c.pid, SIGTERM);
  for (auto& c : h.consumers) {
    int st = 0;
    bool exited = false;
    for (int i = 0; i < 400 && !exited; ++i) {
      if (::waitpid(c.pid, &st, WNOHANG) == c.pid) exited = true;
      else sleep_ms(100);
    }
    if (!exited) {
      ++hung;
      ::kill(c.pid, SIGKILL);
      ::waitpid(c.pid, &st, 0);
    } else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
      ++h.unexpected_exits;
      h.exit_notes.push_back("consumer " + std::to_string(c.index) + " ended badly at SIGTERM");
    }
  }
  cluster({"stop", cluster_dir});

  // ---- check
  struct seen {
    std::uint16_t count = 0, unflagged = 0;
  };
  std::vector<std::vector<seen>> ids(producers.size());
  for (std::size_t p = 0; p < producers.size(); ++p) ids[p].resize(producers[p]->state.size());
  std::uint64_t processed_lines = 0, phantom = 0, consumer_reconnects = 0;
  struct line_rec {
    long long t;
    std::uint64_t epoch;
  };
  std::vector<std::vector<line_rec>> per_log;  // for recovery times
  for (const auto& path : h.all_logs) {
    std::ifstream in(path);
    std::vector<line_rec> recs;
    unsigned p = 0;
    unsigned long long seq = 0, epoch = 0;
    int redelivered = 0;
    long long t = 0;
    std::uint64_t last_epoch = 0;
    bool first = true;
    while (in >> p >> seq >> redelivered >> epoch >> t) {
      ++processed_lines;
      if (p >= ids.size() || seq >= ids[p].size() || producers[p]->state[seq] == 0) {
        ++phantom;
        continue;
      }
      auto& s = ids[p][seq];
      ++s.count;
      if (!redelivered) ++s.unflagged;
      if (!first && epoch != last_epoch) ++consumer_reconnects;
      first = false;
      last_epoch = epoch;
      recs.push_back({t, epoch});
    }
    per_log.push_back(std::move(recs));
  }
  std::uint64_t attempted = 0, confirmed = 0, lost = 0, lost_unconfirmed = 0, duplicates = 0, dup_ids = 0,
                dup_unflagged = 0, max_count = 0;
  for (std::size_t p = 0; p < producers.size(); ++p) {
    for (std::size_t q = 0; q < ids[p].size(); ++q) {
      const auto st = producers[p]->state[q];
      const auto& s = ids[p][q];
      attempted += st >= 1;
      confirmed += st == 2;
      if (s.count == 0) (st == 2 ? lost : lost_unconfirmed) += 1;
      if (s.count > 1) {
        ++dup_ids;
        duplicates += s.count - 1u;
        if (s.unflagged > 1) dup_unflagged += s.unflagged - 1u;
      }
      max_count = std::max<std::uint64_t>(max_count, s.count);
    }
  }
  // Recovery from node loss, per kill at t0, up to the next fault (or 30 s):
  // - reconnect: the consumers whose connection the kill broke (a new epoch
  //   appears in their log) and the time from t0 to the first message of that
  //   new epoch; the kill's figure is the slowest of them;
  // - pause: the longest stretch without any message processed by any
  //   consumer, from t0 on (a quorum queue whose leader was on the killed
  //   node delivers nothing until a new leader is elected).
  std::vector<long long> all_times;
  for (const auto& recs : per_log)
    for (const auto& r : recs) all_times.push_back(r.t);
  std::sort(all_times.begin(), all_times.end());
  std::vector<long long> recovery, pauses;
  for (const long long t0 : node_kill_times) {
    const auto nf = std::upper_bound(fault_times.begin(), fault_times.end(), t0);
    const long long t_end = nf == fault_times.end() ? t0 + 30000 : std::min(*nf, t0 + 30000);
    long long worst = -1;
    for (const auto& recs : per_log) {
      auto it = std::upper_bound(recs.begin(), recs.end(), t0, [](long long t, const line_rec& r) { return t < r.t; });
      if (it == recs.end() || it == recs.begin()) continue;
      const std::uint64_t before = std::prev(it)->epoch;
      for (; it != recs.end() && it->t < t_end; ++it) {
        if (it->epoch != before) {
          worst = std::max(worst, it->t - t0);
          break;
        }
      }
    }
    if (worst >= 0) recovery.push_back(worst);
    long long prev = t0, pause = 0;
    for (auto it = std::upper_bound(all_times.begin(), all_times.end(), t0); it != all_times.end() && *it < t_end; ++it) {
      pause = std::max(pause, *it - prev);
      prev = *it;
    }
    pauses.push_back(pause);
  }
  std::sort(pauses.begin(), pauses.end());
  const long long pause_median = pauses.empty() ? -1 : pauses[pauses.size() / 2];
  const long long pause_worst = pauses.empty() ? -1 : pauses.back();
  std::sort(recovery.begin(), recovery.end());
  const long long rec_median = recovery.empty() ? -1 : recovery[recovery.size() / 2];
  const long long rec_worst = recovery.empty() ? -1 : recovery.back();
  std::uint64_t producer_reconnects = 0, nacked = 0;
  for (auto& p : producers) producer_reconnects += p->reconnects, nacked += p->nacked;

  int min_faults = -1;  // of the kinds that ran
  for (int k = 0; k < kinds; ++k)
    if (k != net_cut || cut_skipped.empty())
      min_faults = min_faults < 0 ? done[static_cast<std::size_t>(k)] : std::min(min_faults, done[static_cast<std::size_t>(k)]);
  std::vector<long long> cut_sorted = cut_recovery;
  std::sort(cut_sorted.begin(), cut_sorted.end());
  const long long cut_median = cut_sorted.empty() ? -1 : cut_sorted[cut_sorted.size() / 2];
  const long long cut_worst = cut_sorted.empty() ? -1 : cut_sorted.back();
  const long long cut_shortest = cut_lengths.empty() ? -1 : *std::min_element(cut_lengths.begin(), cut_lengths.end());
  const long long cut_longest = cut_lengths.empty() ? -1 : *std::max_element(cut_lengths.begin(), cut_lengths.end());
  // Resources of the longest-lived consumer, first sample (after the first
  // fault, once it has logged a line) to last (after the drain, connected and idle): no more threads, at
  // most 1 more descriptor (slack for a socket that outlives its connection),
  // RSS grown by at most 16 MiB (allocator slack, not a function of the
  // messages or faults).
  const bool resources_flat = longest.last.threads <= longest.first.threads &&
                              longest.last.fds <= longest.first.fds + 1 &&
                              longest.last.rss_kb <= longest.first.rss_kb + 16 * 1024;
  const bool pass = lost == 0 && phantom == 0 && depth == 0 && dead_depth == 0 && hung == 0 &&
                    fault_failures == 0 && h.unexpected_exits == 0 && dup_unflagged == 0 && resources_flat &&
                    cut_unrecovered == 0;
  const double total_s = std::chrono::duration<double>(clock_type::now() - t_begin).count();

  std::printf("\n== amqp_faults: %s queue on a 3-node cluster, %d consumer processes, %d producers, seed %u%s\n",
              queue_type.c_str(), consumers_n, producers_n, seed, mutant.empty() ? "" : (" MUTANT " + mutant).c_str());
  std::printf("messages   attempted %llu, confirmed %llu, processed lines %llu\n",
              static_cast<unsigned long long>(attempted), static_cast<unsigned long long>(confirmed),
              static_cast<unsigned long long>(processed_lines));
  std::printf("faults     ");
  for (int k = 0; k < kinds; ++k) {
    if (k == net_cut && !cut_skipped.empty()) std::printf("%s SKIPPED", kind_name[k]);
    else std::printf("%s %d", kind_name[k], done[static_cast<std::size_t>(k)]);
    std::printf("%s", k + 1 < kinds ? ", " : "\n");
  }
  std::printf("lost       %llu confirmed ids never processed (%llu unconfirmed ids never processed: allowed)\n",
              static_cast<unsigned long long>(lost), static_cast<unsigned long long>(lost_unconfirmed));
  std::printf("phantom    %llu processed ids never attempted\n", static_cast<unsigned long long>(phantom));
  std::printf("duplicates %llu extra deliveries of %llu ids (max %llu times one id); %llu repeats not marked "
              "redelivered\n",
              static_cast<unsigned long long>(duplicates), static_cast<unsigned long long>(dup_ids),
              static_cast<unsigned long long>(max_count), static_cast<unsigned long long>(dup_unflagged));
  std::printf("reconnects consumers %llu (epoch changes in the logs), producers %llu; consumer restarts after "
              "their own exit %d; publish nacks %llu\n",
              static_cast<unsigned long long>(consumer_reconnects), static_cast<unsigned long long>(producer_reconnects),
              h.unexpected_exits, static_cast<unsigned long long>(nacked));
  std::printf("recovery   node loss -> its consumers consuming again: median %lld ms, worst %lld ms (%zu of %zu "
              "kills cut a consumer); longest pause of all consumption after a kill: median %lld ms, worst %lld ms\n",
              rec_median, rec_worst, recovery.size(), node_kill_times.size(), pause_median, pause_worst);
  if (cut_skipped.empty())
    std::printf("           network cut -> its consumers consuming on another node, before the cut was lifted: "
                "median %lld ms, worst %lld ms (%d consumer connections cut in %zu cuts of %.1f-%.1f s, heartbeat "
                "%d s); NOT recovered before the lift: %d\n",
                cut_median, cut_worst, cut_consumers, cut_lengths.size(), static_cast<double>(cut_shortest) / 1000.0,
                static_cast<double>(cut_longest) / 1000.0, mutant == "no-heartbeat" ? 0 : heartbeat_s,
                cut_unrecovered);
  else
    std::printf("           network cut SKIPPED: %s\n", cut_skipped.c_str());
  std::printf("end        queue depth %lld, dead-letter depth %lld, hung consumers %d, consumers that exited on "
              "their own %d, failed fault commands %d (retried %d)\n",
              depth, dead_depth, hung, h.unexpected_exits, fault_failures, fault_retries);
  std::printf("time       %.0f s in all: cluster start %.0f s, faults %.0f s, drain %.0f s\n", total_s, startup_s,
              fault_phase_s, drain_s_taken);
  std::printf("resources  longest-lived of %d consumer processes (%.0f s): threads %lld -> %lld, fds %lld -> %lld, "
              "RSS %lld -> %lld KiB\n",
              static_cast<int>(h.usage_by_pid.size()), longest_s, longest.first.threads, longest.last.threads,
              longest.first.fds, longest.last.fds, longest.first.rss_kb, longest.last.rss_kb);
  std::printf("           %s (bound: threads +0, fds +1, RSS +16384 KiB)\n", resources_flat ? "flat" : "GREW");
  for (const auto& n : h.exit_notes) std::printf("note       %s\n", n.c_str());
  std::printf("result     %s\n", pass ? "PASS" : "FAIL");

  nlohmann::json j{{"queue_type", queue_type},
                   {"seed", seed},
                   {"mutant", mutant},
                   {"consumers", consumers_n},
                   {"producers", producers_n},
                   {"attempted", attempted},
                   {"confirmed", confirmed},
                   {"processed_lines", processed_lines},
                   {"lost", lost},
                   {"lost_unconfirmed", lost_unconfirmed},
                   {"phantom", phantom},
                   {"duplicates", duplicates},
                   {"duplicate_ids", dup_ids},
                   {"duplicates_not_redelivered", dup_unflagged},
                   {"max_deliveries_of_one_id", max_count},
                   {"consumer_reconnects", consumer_reconnects},
                   {"producer_reconnects", producer_reconnects},
                   {"consumer_exits", h.unexpected_exits},
                   {"exit_notes", h.exit_notes},
                   {"publish_nacks", nacked},
                   {"recovery_ms", recovery},
                   {"recovery_median_ms", rec_median},
                   {"recovery_worst_ms", rec_worst},
                   {"pause_after_node_kill_ms", pauses},
                   {"pause_median_ms", pause_median},
                   {"pause_worst_ms", pause_worst},
                   {"node_restart_ms", node_restart_ms},
                   {"network_cut",
                    {{"skipped", cut_skipped.empty() ? nlohmann::json(nullptr) : nlohmann::json(cut_skipped)},
                     {"heartbeat_s", mutant == "no-heartbeat" ? 0 : heartbeat_s},
                     {"cut_ms", cut_lengths},
                     {"consumer_connections_cut", cut_consumers},
                     {"recovery_ms", cut_recovery},
                     {"recovery_median_ms", cut_median},
                     {"recovery_worst_ms", cut_worst},
                     {"not_recovered_before_lift", cut_unrecovered}}},
                   {"queue_depth_end", depth},
                   {"dead_letter_depth_end", dead_depth},
                   {"hung_consumers", hung},
                   {"failed_fault_commands", fault_failures},
                   {"retried_fault_commands", fault_retries},
                   {"min_faults_of_a_kind", min_faults},
                   {"longest_lived_consumer",
                    {{"seconds", longest_s},
                     {"threads", {longest.first.threads, longest.last.threads}},
                     {"fds", {longest.first.fds, longest.last.fds}},
                     {"rss_kib", {longest.first.rss_kb, longest.last.rss_kb}}}},
                   {"seconds", {{"total", total_s}, {"cluster_start", startup_s}, {"faults", fault_phase_s}, {"drain", drain_s_taken}}},
                   {"pass", pass}};
  for (int k = 0; k < kinds; ++k)
    j["faults"][kind_name[k]] = k == net_cut && !cut_skipped.empty() ? nlohmann::json("skipped")
                                                                      : nlohmann::json(done[static_cast<std::size_t>(k)]);
  std::ofstream(json_path) << j.dump(2) << "\n";
  return pass ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return harness_main(argc, argv);  // unwinds through its clean-up
  } catch (const std::exception& e) {
    std::fprintf(stderr, "amqp_faults: %s\n", e.what());
    return 3;
  }
}
