// Test fixture for the RabbitMQ bridge: one throwaway broker per test program
// (started by broker.sh on free loopback ports, data in a temp dir, stopped
// with the epmd it started when the program exits), plus a plain rabbitmq-c
// connection for setting up and inspecting queues from the test's thread.
#pragma once

#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace runnel_test {

class broker {
 public:
  // The broker of this program, started on first use; nullptr (after a loud
  // message) only when rabbitmq-server is not installed.
  static broker* get() {
    static broker b;
    return b.port_ > 0 ? &b : nullptr;
  }

  int port() const { return port_; }
  std::string url(const std::string& query = "") const {
    return "amqp://guest:guest@127.0.0.1:" + std::to_string(port_) + "/%2f" + (query.empty() ? "" : "?" + query);
  }
  // The node's state directory (certificates in dir()/tls when started with
  // RUNNEL_BROKER_TLS=1).
  const std::string& dir() const { return dir_; }
  // A value broker.sh wrote to dir()/env (TLS_PORT, ...); "" when absent.
  std::string env_value(const std::string& key) const {
    std::string v = run("grep ^" + key + "= " + dir_ + "/env");
    if (v.empty()) return v;
    v = v.substr(v.find('=') + 1);
    while (!v.empty() && (v.back() == '\n' || v.back() == '\r')) v.pop_back();
    return v;
  }
  // The pid of the node's Erlang VM (broker.sh writes it to dir()/beam.pid),
  // for tests that freeze the broker with SIGSTOP; 0 when unknown.
  long vm_pid() const { return std::atol(run("cat " + dir_ + "/beam.pid 2>/dev/null").c_str()); }
  // rabbitmqctl against this node; returns its output.
  std::string ctl(const std::string& args) const {
    return run(std::string("bash ") + RUNNEL_BROKER_SCRIPT + " ctl " + dir_ + " " + args);
  }

  broker(const broker&) = delete;
  broker& operator=(const broker&) = delete;

 private:
  broker() {
    // RUNNEL_TEST_BROKER_DIR: use a node already started with
    // `broker.sh start DIR` (saves its start-up while iterating); it is left
    // running.
    if (const char* d = std::getenv("RUNNEL_TEST_BROKER_DIR")) {
      const std::string env = run(std::string("grep ^AMQP_PORT= ") + d + "/env");
      port_ = std::atoi(env.c_str() + env.find('=') + 1);
      dir_ = d;
      keep_ = true;
      return;
    }
    char tmpl[] = "/tmp/runnel-broker-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir_ = tmpl;
    if (std::system("command -v rabbitmq-server >/dev/null 2>&1") != 0) {
      std::fprintf(stderr, "\n*** rabbitmq-server is not installed: SKIPPING every broker test ***\n\n");
      return;
    }
    // This program's pid: the node is stopped even if the program dies
    // without running this destructor (a signal, a test timeout).
    const std::string out =
        run(std::string("bash ") + RUNNEL_BROKER_SCRIPT + " start " + dir_ + " " + std::to_string(::getpid()));
    port_ = std::atoi(out.c_str());
    if (port_ <= 0) throw std::runtime_error("the test broker did not start: " + out);
  }
  ~broker() {
    if (!dir_.empty() && !keep_) run(std::string("bash ") + RUNNEL_BROKER_SCRIPT + " stop " + dir_);
  }

  static std::string run(const std::string& cmd) {
    std::string out;
    FILE* p = ::popen(cmd.c_str(), "r");
    if (p == nullptr) return out;
    char buf[4096];
    while (std::fgets(buf, sizeof buf, p) != nullptr) out += buf;
    ::pclose(p);
    return out;
  }

  std::string dir_;
  int port_ = 0;
  bool keep_ = false;
};

struct got_message {
  std::string body;
  std::map<std::string, std::string> headers;
  std::string message_id;
  bool redelivered = false;
};

// A plain single-threaded rabbitmq-c connection for the test itself.
class raw {
 public:
  explicit raw(int port) {
    c_ = amqp_new_connection();
    amqp_socket_t* s = amqp_tcp_socket_new(c_);
    if (amqp_socket_open(s, "127.0.0.1", port) != AMQP_STATUS_OK) throw std::runtime_error("raw: connect");
    if (amqp_login(c_, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest").reply_type !=
        AMQP_RESPONSE_NORMAL)
      throw std::runtime_error("raw: login");
    amqp_channel_open(c_, 1);
    ok("channel.open");
    amqp_confirm_select(c_, 1);
    ok("confirm.select");
  }
  ~raw() {
    amqp_channel_close(c_, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(c_, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(c_);
  }
  raw(const raw&) = delete;
  raw& operator=(const raw&) = delete;

  // Declares (durable) and purges.
  void fresh_queue(const std::string& q) {
    amqp_queue_declare(c_, 1, amqp_cstring_bytes(q.c_str()), 0, 1, 0, 0, amqp_empty_table);
    ok("queue.declare " + q);
    amqp_queue_purge(c_, 1, amqp_cstring_bytes(q.c_str()));
    ok("queue.purge " + q);
  }

  // Ready messages in q (passive declare).
  std::uint32_t ready(const std::string& q) {
    auto* r = amqp_queue_declare(c_, 1, amqp_cstring_bytes(q.c_str()), 1, 0, 0, 0, amqp_empty_table);
    ok("queue.declare passive " + q);
    return r->message_count;
  }

  // Publishes body(i) for i in [0, n) to queue q and waits for every confirm.
  void publish_n(const std::string& q, std::size_t n, const std::function<std::string(std::size_t)>& body) {
    amqp_basic_properties_t p{};
    p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG;
    p.delivery_mode = persistent_ ? 2 : 1;
    for (std::size_t i = 0; i < n; ++i) {
      const std::string b = body(i);
      amqp_bytes_t bytes{b.size(), const_cast<char*>(b.data())};
      if (amqp_basic_publish(c_, 1, amqp_empty_bytes, amqp_cstring_bytes(q.c_str()), 0, 0, &p, bytes) != 0)
        throw std::runtime_error("raw: publish");
      ++seq_;
    }
    while (confirmed_ < seq_) {
      amqp_frame_t f;
      if (amqp_simple_wait_frame(c_, &f) != AMQP_STATUS_OK) throw std::runtime_error("raw: wait confirm");
      if (f.frame_type == AMQP_FRAME_METHOD && f.payload.method.id == AMQP_BASIC_ACK_METHOD) {
        auto* a = static_cast<amqp_basic_ack_t*>(f.payload.method.decoded);
        confirmed_ = a->delivery_tag;
      } else if (f.frame_type == AMQP_FRAME_METHOD && f.payload.method.id == AMQP_BASIC_NACK_METHOD) {
        throw std::runtime_error("raw: publish nacked");
      }
      amqp_maybe_release_buffers(c_);
    }
  }

  // Takes (auto-ack) messages from q until `want` arrived or none came for
  // `idle_ms` milliseconds.
  std::vector<got_message> take(const std::string& q, std::size_t want, int idle_ms = 3000) {
    std::vector<got_message> out;
    amqp_channel_t ch = ++next_ch_;
    amqp_channel_open(c_, ch);
    ok("channel.open (take)");
    amqp_basic_consume(c_, ch, amqp_cstring_bytes(q.c_str()), amqp_empty_bytes, 0, 1, 0, amqp_empty_table);
    ok("basic.consume " + q);
    while (out.size() < want) {
      amqp_envelope_t env;
      timeval tv{idle_ms / 1000, (idle_ms % 1000) * 1000};
      amqp_maybe_release_buffers(c_);
      const amqp_rpc_reply_t r = amqp_consume_message(c_, &env, &tv, 0);
      if (r.reply_type != AMQP_RESPONSE_NORMAL) break;
      got_message m;
      m.body.assign(static_cast<char*>(env.message.body.bytes), env.message.body.len);
      m.redelivered = env.redelivered != 0;
      if (env.message.properties._flags & AMQP_BASIC_MESSAGE_ID_FLAG)
        m.message_id.assign(static_cast<char*>(env.message.properties.message_id.bytes),
                            env.message.properties.message_id.len);
      if (env.message.properties._flags & AMQP_BASIC_HEADERS_FLAG) {
        const amqp_table_t& t = env.message.properties.headers;
        for (int i = 0; i < t.num_entries; ++i) {
          const auto& e = t.entries[i];
          if (e.value.kind == AMQP_FIELD_KIND_UTF8)
            m.headers[std::string(static_cast<char*>(e.key.bytes), e.key.len)] =
                std::string(static_cast<char*>(e.value.value.bytes.bytes), e.value.value.bytes.len);
        }
      }
      amqp_destroy_envelope(&env);
      out.push_back(std::move(m));
    }
    amqp_channel_close(c_, ch, AMQP_REPLY_SUCCESS);
    return out;
  }

 private:
  void ok(const std::string& what) {
    if (amqp_get_rpc_reply(c_).reply_type != AMQP_RESPONSE_NORMAL) throw std::runtime_error("raw: " + what);
  }
  amqp_connection_state_t c_;
  std::uint64_t seq_ = 0, confirmed_ = 0;
 public:
  bool persistent_ = true;
  amqp_channel_t next_ch_ = 1;
};

// Two numeric columns of q's line in `rabbitmqctl list_queues name a b`;
// {-1, -1} when q is not listed.
inline std::pair<long, long> queue_columns(const broker& b, const std::string& q, const std::string& cols) {
  const std::string out = b.ctl("list_queues name " + cols);
  std::size_t pos = 0;
  while (pos < out.size()) {
    const std::size_t eol = out.find('\n', pos);
    const std::string line = out.substr(pos, eol == std::string::npos ? std::string::npos : eol - pos);
    char name[256];
    long r = -1, u = -1;
    if (std::sscanf(line.c_str(), "%255s %ld %ld", name, &r, &u) == 3 && q == name) return {r, u};
    if (eol == std::string::npos) break;
    pos = eol + 1;
  }
  return {-1, -1};
}

// "messages_ready messages_unacknowledged" of q, from rabbitmqctl.
inline std::pair<long, long> queue_counts(const broker& b, const std::string& q) {
  return queue_columns(b, q, "messages_ready messages_unacknowledged");
}

// Consumers of q at the broker.
inline long queue_consumers(const broker& b, const std::string& q) {
  return queue_columns(b, q, "consumers messages").first;
}

inline std::string unique_name(const std::string& base) {
  static int n = 0;
  return base + "-" + std::to_string(::getpid()) + "-" + std::to_string(++n);
}

}  // namespace runnel_test
