// The connection core of the RabbitMQ bridge: one I/O thread owns the
// rabbitmq-c connection (which is not thread-safe) and does every socket
// operation; everybody else talks to it through queues and an eventfd.
//
// Threads and hand-offs
//   pool workers --(ops ring: ack / fail)----------------> I/O thread
//   pipeline     --(publish channels: results)-----------> I/O thread
//   user threads --(requests under a mutex: consume, close)-> I/O thread
//   I/O thread   --(consume channels: deliveries)--------> pipeline
// The I/O thread sleeps in poll() on the socket and an eventfd. A worker
// that queues an op, and a publish or consume channel whose waker (registered
// by the I/O thread on the channel) fires, write the eventfd only when the
// I/O thread announced it is going to sleep (`sleeping_`), so a busy stream
// pays no syscall per ack or per batch of results, and a sleep is ended by
// one write however many wake it. The I/O thread re-checks the ops ring and
// `channel_woke_` after that announcement (see sleep()).
//
// Reading. Over plain TCP the I/O thread reads the socket only when poll()
// said it is readable (the poll it sleeps in, or a zero-timeout one after
// two busy rounds in a row), and at least every read interval: rabbitmq-c's
// own non-blocking read of an empty socket costs a recv() and a poll(), and
// every round of the loop used to end with one, often two.
// Over TLS the library may hold decrypted bytes poll() cannot see, so there
// it reads until the library reports nothing more, as before.
//
// Epochs. Every (re)opened AMQP channel starts a new epoch; delivery tags
// are only meaningful within their epoch. Ops and results carry the epoch of
// their delivery; those of an older epoch are dropped (the broker requeued
// the message when the old channel died) and counted as stale.
//
// Acks go out when the broker confirmed the publish of a delivery's result
// (the channel is in confirm mode; confirms are pipelined, never awaited one
// by one), or when its delivery was settled without a result. They are
// coalesced by ack_window (multiple = true up to the contiguous watermark),
// and flushed when the I/O thread is about to sleep with nothing else in
// flight, or at the latest ack_linger after it first slept with acks
// waiting, so nothing waits for a batch to fill (see idle_acks()).
#pragma once

#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <future>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "../channel.hpp"
#include "../detail/asymmetric_fence.hpp"
#include "../mpmc_queue.hpp"
#include "../pool/cpu_set.hpp"
#include "ack_window.hpp"
#include "delivery.hpp"
#include "error.hpp"
#include "options.hpp"
#include "publish_buffer.hpp"
#include "seal.hpp"
#include "tls_socket.hpp"

namespace runnel::amqp {

// Counters of one client (monotonic unless noted).
struct client_stats {
  std::uint64_t delivered = 0;      // messages received from the broker
  std::uint64_t redelivered = 0;    // ... of which flagged redelivered
  std::uint64_t acked = 0;          // inputs acked
  std::uint64_t ack_frames = 0;     // basic.ack frames sent (a multiple one settles many inputs)
  std::uint64_t nacked = 0;         // inputs nacked (requeued)
  std::uint64_t retried = 0;        // failures republished for another attempt
  std::uint64_t dead_lettered = 0;  // failures past max_attempts, and sealed messages that did not open
  std::uint64_t unopened = 0;       // sealed messages that did not open (consume_options::open), dead-lettered
  std::uint64_t published = 0;      // publishes sent (results, retries, dead letters)
  std::uint64_t confirmed = 0;      // publishes confirmed by the broker
  std::uint64_t stale = 0;          // acks/results of an older connection epoch, dropped
  std::uint64_t reconnects = 0;
  std::uint64_t unacked = 0;        // gauge: deliveries of the current epoch not yet acked
  std::uint64_t unacked_peak = 0;   // highest value of unacked seen
  std::uint64_t blocks = 0;         // connection.blocked received (broker resource alarm)
  bool blocked = false;             // gauge: the broker blocks publishing now
};

namespace detail {

inline constexpr const char* attempt_header = "x-runnel-attempt";
inline constexpr const char* error_header = "x-runnel-error";
// Frames read per loop iteration before other work gets a turn.
inline constexpr int frames_per_round = 1024;
// Done deliveries gathered before a multiple ack goes out while busy.
inline constexpr std::size_t ack_batch = 64;
// How long done deliveries may wait for their ack while others are still in
// flight and the I/O thread sleeps (see sleep()).
inline constexpr auto ack_linger = std::chrono::milliseconds(2);
// Results taken from one publish channel per loop iteration.
inline constexpr std::size_t publishes_per_round = 512;

// An op queued by a worker to the I/O thread.
struct op {
  enum kind_t : std::uint8_t { ack, fail, requeue } kind = ack;
  std::uint32_t consumer = 0;
  std::uint64_t epoch = 0;
  std::uint64_t tag = 0;
  message msg{};       // fail: the message to retry or dead-letter
  std::string reason;  // fail: the error text
  bool final = false;  // fail: dead-letter now, no retry (a sealed message that did not open)
};

// A parked I/O thread registered on a channel; the channel's wake-up writes
// the eventfd.
struct channel_waker : runnel::detail::waker {
  class core* owner = nullptr;
  // True while registered in a channel's list (only one list at a time).
  // Written by the I/O thread (arm) and the notifier (disarm); acq_rel so
  // the I/O thread sees the disarm before re-arming.
  std::atomic<bool> armed{false};
};

class core : public std::enable_shared_from_this<core> {
 public:
  explicit core(connection_options o) : opts_(std::move(o)), ops_(16384) {
    efd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd_ < 0) throw error("runnel::amqp: eventfd failed");
  }
  ~core() {
    if (conn_ != nullptr) amqp_destroy_connection(conn_);
    ::close(efd_);
  }
  core(const core&) = delete;
  core& operator=(const core&) = delete;

  // ---- called by the client (user threads) ----------------------------------

  // Connects (throwing the first endpoint's error if none works), then
  // starts the I/O thread.
  void start() {
    std::string last;
    int code = 0;
    for (std::size_t i = 0; i < opts_.endpoints.size(); ++i) {
      try {
        connect(opts_.endpoints[(next_ep_ + i) % opts_.endpoints.size()]);
        next_ep_ = (next_ep_ + i) % opts_.endpoints.size();
        thread_ = std::thread([this] { run(); });
        return;
      } catch (const error& e) {
        last = e.what();
        code = e.reply_code();
      }
    }
    throw error(last, code);
  }

  receiver<delivery> consume(const consume_options& co) {
    if (co.queue.empty()) throw error("runnel::amqp: consume_options::queue is empty");
    if (co.prefetch == 0 || co.prefetch > 65535)
      throw error("runnel::amqp: consume_options::prefetch must be in [1, 65535], got " +
                  std::to_string(co.prefetch));
    if (co.on_failure.max_attempts == 0)
      throw error("runnel::amqp: failure_policy::max_attempts must be at least 1");
    request r;
    r.kind = request::consume;
    r.copts = co;
    return open_channel_end<receiver<delivery>>(r, co.capacity != 0 ? co.capacity : co.prefetch);
  }

  sender<delivery> publish(const publish_options& po) {
    if (po.capacity == 0) throw error("runnel::amqp: publish_options::capacity must be at least 1");
    request r;
    r.kind = request::publish;
    r.popts = po;
    return open_channel_end<sender<delivery>>(r, po.capacity);
  }

  void declare_queue(const std::string& name) {
    request r;
    r.kind = request::declare;
    r.copts.queue = name;
    submit(r);
  }

  // Graceful stop; rethrows a fatal error the I/O thread ended with.
  void close() {
    {
      std::lock_guard lock(req_m_);
      closing_requested_ = true;
    }
    wake();
    if (thread_.joinable()) thread_.join();
    std::lock_guard lock(req_m_);
    if (fatal_) {
      auto e = fatal_;
      fatal_ = nullptr;
      std::rethrow_exception(e);
    }
  }

  client_stats stats() const noexcept {
    client_stats s;
    // Relaxed: independent monotonic counters, read for display.
    s.delivered = c_delivered_.load(std::memory_order_relaxed);
    s.redelivered = c_redelivered_.load(std::memory_order_relaxed);
    s.acked = c_acked_.load(std::memory_order_relaxed);
    s.ack_frames = c_ack_frames_.load(std::memory_order_relaxed);
    s.nacked = c_nacked_.load(std::memory_order_relaxed);
    s.retried = c_retried_.load(std::memory_order_relaxed);
    s.dead_lettered = c_dead_.load(std::memory_order_relaxed);
    s.unopened = c_unopened_.load(std::memory_order_relaxed);
    s.published = c_published_.load(std::memory_order_relaxed);
    s.confirmed = c_confirmed_.load(std::memory_order_relaxed);
    s.stale = c_stale_.load(std::memory_order_relaxed);
    s.reconnects = c_reconnects_.load(std::memory_order_relaxed);
    s.unacked = c_unacked_.load(std::memory_order_relaxed);
    s.unacked_peak = c_unacked_peak_.load(std::memory_order_relaxed);
    s.blocks = c_blocks_.load(std::memory_order_relaxed);
    s.blocked = c_blocked_.load(std::memory_order_relaxed);
    return s;
  }

  // ---- called by deliveries (any thread) ------------------------------------

  void push(op&& o) noexcept {
    // The ring holds far more than the unacked deliveries that can exist
    // (prefetch per consumer plus those of stale epochs), so this loop only
    // spins if the I/O thread has fallen far behind.
    while (!ops_.try_push(std::move(o))) {
      wake_now();
      std::this_thread::yield();
    }
    wake();
  }

  void wake() noexcept {
    // Pairs with the I/O thread's fence between storing sleeping_ = true and
    // re-checking its queues (Dekker): either it sees our op, or we see it
    // sleeping. A full fence on both sides, not the asymmetric pair: the I/O
    // thread goes to sleep far more often than once per op here (a sleep per
    // burst of deliveries or results), and membarrier() on each of those
    // cost it a syscall and an interrupt of every running thread of the
    // process, against a fence after the op's own locked push.
    runnel::detail::full_fence();
    // Relaxed: ordered by the fences; the exchange decides who writes.
    if (sleeping_.load(std::memory_order_relaxed) && sleeping_.exchange(false, std::memory_order_relaxed))
      wake_now();
  }

  static void on_channel_wake(runnel::detail::waker* w) noexcept {
    auto* cw = static_cast<channel_waker*>(w);
    core& c = *cw->owner;
    // Release: the I/O thread's acquire load sees the waker out of the list.
    cw->armed.store(false, std::memory_order_release);
    // Release: the I/O thread that reads it (acquire) then sees the channel
    // change this wake-up announces. wake() then writes the eventfd only if
    // the I/O thread is asleep; awake, it sees channel_woke_ before it sleeps.
    c.channel_woke_.store(true, std::memory_order_release);
    c.wake();
  }

 private:
  struct request {
    enum kind_t { consume, publish, declare } kind = consume;
    consume_options copts;
    publish_options popts;
    std::shared_ptr<runnel::detail::channel_state<delivery>> ch;
    // The I/O thread's answer: `failed` is moved in (so that thread keeps no
    // reference to the exception) before done.set_value() publishes it, and
    // the caller rethrows it. Not done.set_exception(): that copies the
    // pointer and drops the I/O thread's copy after the caller may already
    // have read and released the exception, so the exception could be freed
    // on the I/O thread, ordered only by libstdc++'s uninstrumented
    // reference count (a ThreadSanitizer report, 1 run in ~8).
    std::exception_ptr failed;
    std::promise<void> done;

    void fail(std::exception_ptr e) {
      failed = std::move(e);
      done.set_value();
    }
  };

  struct consumer {
    consume_options opts;
    std::string tag;
    std::shared_ptr<runnel::detail::channel_state<delivery>> ch;  // we are its only sender
    std::unique_ptr<channel_waker> waker = std::make_unique<channel_waker>();
    std::deque<delivery> pending;  // received, not yet accepted by the channel
    bool cancelled = false;        // basic.cancel sent (closing) or pipeline gone
  };

  struct publisher {
    publish_options opts;
    std::shared_ptr<runnel::detail::channel_state<delivery>> ch;  // we are its only receiver
    std::unique_ptr<channel_waker> waker = std::make_unique<channel_waker>();
  };

  // A publish waiting for its confirm.
  struct unconfirmed {
    std::uint64_t seq = 0;
    bool has_input = false;
    std::uint32_t consumer = 0;
    std::uint64_t epoch = 0, tag = 0;
    enum kind_t : std::uint8_t { result, retry, dead_letter } kind = result;
    bool confirmed = false;
    // For a publish without an input (kept to republish after a reconnect).
    std::string exchange, routing_key;
    message msg;
    bool persistent = true;
  };

  // ---- requests ---------------------------------------------------------------

  void submit(request& r) {
    auto fut = r.done.get_future();
    {
      std::lock_guard lock(req_m_);
      if (closing_requested_ || finished_) throw error("runnel::amqp: the client is closed");
      requests_.push_back(&r);
    }
    wake();
    fut.get();
    if (r.failed) std::rethrow_exception(std::move(r.failed));  // the I/O thread's error
  }

  // A new channel of `capacity` between the pipeline and the I/O thread:
  // hands it to the I/O thread with request r and returns the user's end
  // once the I/O thread has taken the other (throwing its error).
  template <class End>
  End open_channel_end(request& r, std::size_t capacity) {
    auto ch = std::make_shared<runnel::detail::channel_state<delivery>>(capacity, true);
    End end(ch);
    r.ch = std::move(ch);
    submit(r);
    return end;
  }

  void wake_now() noexcept {
    const std::uint64_t one = 1;
    [[maybe_unused]] const auto n = ::write(efd_, &one, sizeof one);
  }

  // ---- connect ---------------------------------------------------------------

  std::string where(const endpoint& ep) const { return ep.host + ":" + std::to_string(ep.port); }

  static std::string bytes_str(amqp_bytes_t b) {
    return b.len == 0 ? std::string{} : std::string(static_cast<const char*>(b.bytes), b.len);
  }

  // Turns a failed RPC reply into an error (and answers a close).
  error reply_error(const std::string& what, amqp_rpc_reply_t r) {
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION) {
      if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        auto* m = static_cast<amqp_channel_close_t*>(r.reply.decoded);
        const int code = m->reply_code;
        std::string text = bytes_str(m->reply_text);
        amqp_channel_close_ok_t ok{};
        amqp_send_method(conn_, chan_, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        channel_open_ = false;
        return error(what + ": broker closed the channel: " + std::to_string(code) + " " + text, code);
      }
      if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
        auto* m = static_cast<amqp_connection_close_t*>(r.reply.decoded);
        const int code = m->reply_code;
        std::string text = bytes_str(m->reply_text);
        amqp_connection_close_ok_t ok{};
        amqp_send_method(conn_, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
        connected_ = false;
        return error(what + ": broker closed the connection: " + std::to_string(code) + " " + text, code);
      }
      return error(what + ": unexpected broker reply");
    }
    if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
      connected_ = false;
      return error(what + ": " + amqp_error_string2(r.library_error));
    }
    return error(what + ": no reply");
  }

  void check(const std::string& what) {
    const amqp_rpc_reply_t r = amqp_get_rpc_reply(conn_);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) throw reply_error(what, r);
  }

  // Opens connection, channel and confirm mode; throws error on failure.
  void connect(const endpoint& ep) {
    if (conn_ != nullptr) amqp_destroy_connection(conn_);
    conn_ = amqp_new_connection();
    connected_ = false;
    amqp_socket_t* sock = new_socket(conn_, opts_.tls);
    timeval tv{opts_.connect_timeout_s, 0};
    const int st = amqp_socket_open_noblock(sock, ep.host.c_str(), ep.port, &tv);
    if (st != AMQP_STATUS_OK)
      throw error("runnel::amqp: cannot connect to " + where(ep) + ": " +
                  (opts_.tls.enabled ? tls_connect_failure(st, ep.host) : amqp_error_string2(st)));
    amqp_set_handshake_timeout(conn_, &tv);
    amqp_set_rpc_timeout(conn_, &tv);
    // Advertise consumer_cancel_notify so a deleted queue cancels our
    // consumer visibly instead of leaving it silent, and connection.blocked
    // so a resource alarm is announced (we then stop publishing, see blocked_).
    amqp_table_entry_t cap[3];
    cap[0].key = amqp_cstring_bytes("consumer_cancel_notify");
    cap[0].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    cap[0].value.value.boolean = 1;
    cap[1].key = amqp_cstring_bytes("publisher_confirms");
    cap[1].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    cap[1].value.value.boolean = 1;
    cap[2].key = amqp_cstring_bytes("connection.blocked");
    cap[2].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    cap[2].value.value.boolean = 1;
    amqp_table_entry_t props[1];
    props[0].key = amqp_cstring_bytes("capabilities");
    props[0].value.kind = AMQP_FIELD_KIND_TABLE;
    props[0].value.value.table.num_entries = 3;
    props[0].value.value.table.entries = cap;
    amqp_table_t client_props{1, props};
    const bool external = opts_.tls.enabled && opts_.tls.external_login;
    const amqp_rpc_reply_t r =
        external ? amqp_login_with_properties(conn_, opts_.vhost.c_str(), 0, opts_.frame_max, opts_.heartbeat_s,
                                              &client_props, AMQP_SASL_METHOD_EXTERNAL,
                                              // RabbitMQ takes the name from the certificate and
                                              // ignores this identity (rabbitmq-c wants it non-empty).
                                              opts_.user.empty() ? "runnel" : opts_.user.c_str())
                 : amqp_login_with_properties(conn_, opts_.vhost.c_str(), 0, opts_.frame_max, opts_.heartbeat_s,
                                              &client_props, AMQP_SASL_METHOD_PLAIN, opts_.user.c_str(),
                                              opts_.password.c_str());
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
      const std::string what = "runnel::amqp: login to " + where(ep) +
                               (external ? std::string(" with the client certificate (EXTERNAL)")
                                         : " as user '" + opts_.user + "'") +
                               " on vhost '" + opts_.vhost + "' failed";
      // The peer hung up before connection.start: not a wrong password but
      // the wrong protocol, or (TLS 1.3) the broker refusing our certificate
      // after the handshake.
      if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && amqp_get_server_properties(conn_)->num_entries == 0)
        throw error(what + ": " + login_hangup_reason(opts_.tls));
      if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
          (r.library_error == AMQP_STATUS_CONNECTION_CLOSED || r.library_error == AMQP_STATUS_SOCKET_CLOSED ||
           r.library_error == AMQP_STATUS_SOCKET_ERROR))
        throw error(what + " (access refused: wrong user or password?)", 403);
      throw reply_error(what, r);
    }
    connected_ = true;
    sock_ready_ = true;  // the login may have left bytes unread
    last_read_ = std::chrono::steady_clock::now();
    open_channel();
  }

  void open_channel() {
    ++chan_;
    if (chan_ > 1000) chan_ = 1;
    amqp_channel_open(conn_, chan_);
    check("runnel::amqp: channel.open");
    amqp_confirm_select(conn_, chan_);
    check("runnel::amqp: confirm.select");
    channel_open_ = true;
    // A new channel numbers deliveries and publishes from 1 again.
    epoch_.fetch_add(1, std::memory_order_release);  // release: deliveries read it via their own copy
    window_.reset();
    next_seq_ = 1;
    partial_.reset();
    set_unacked();
  }

  // ---- the I/O loop ------------------------------------------------------------

  void run() noexcept {
    // Seen in top -H, perf and /proc/<pid>/task beside the pool's runnel-<n>.
    runnel::detail::name_current_thread("runnel-amqp");
    try {
      loop();
    } catch (...) {
      std::lock_guard lock(req_m_);
      fatal_ = std::current_exception();
    }
    finish();
  }

  std::uint64_t epoch() const noexcept { return epoch_.load(std::memory_order_relaxed); }

  void loop() {
    for (;;) {
      bool busy = false;
      if (connected_ && channel_open_) {
        try {
          // Acq_rel: taking the flag before looking at the channels (a wake
          // after this is seen by sleep()); acquire: what it announced.
          channel_woke_.exchange(false, std::memory_order_acq_rel);
          busy |= take_requests();
          busy |= take_ops();
          busy |= take_publishes();
          busy |= read_frames();
          busy |= feed_consumers();
          flush_acks(false);
        } catch (const error& e) {
          if (!connected_ || !channel_open_) {
            last_error_ = e.what();
            last_code_ = e.reply_code();
          } else {
            throw;
          }
        }
        if (closing_ && close_done()) {
          shutdown_connection();
          return;
        }
        if (!connected_ || !channel_open_) {
          lost();
          continue;
        }
      } else {
        if (closing_requested()) {
          closing_ = true;
          return;
        }
        reconnect();
        continue;
      }
      if (!busy) sleep();
      else peek_socket();
    }
  }

  bool closing_requested() {
    std::lock_guard lock(req_m_);
    return closing_requested_;
  }

  // Requests from user threads; also notices close().
  bool take_requests() {
    std::vector<request*> rs;
    bool start_close = false;
    {
      std::lock_guard lock(req_m_);
      rs.swap(requests_);
      start_close = closing_requested_ && !closing_;
    }
    for (request* r : rs) {
      std::exception_ptr failed;
      try {
        if (r->kind == request::consume) add_consumer(*r);
        else if (r->kind == request::publish) add_publisher(*r);
        else declare_request(r->copts.queue);
      } catch (...) {
        failed = std::current_exception();
      }
      if (!failed) {
        r->done.set_value();
        continue;
      }
      // Handed over after the handler has ended, so that this thread keeps
      // no reference to the exception: the caller that reads it is the one
      // that frees it (a free here, after the caller's read, would be
      // ordered only by libstdc++'s reference count, which ThreadSanitizer
      // does not see).
      r->fail(std::move(failed));
      if (!channel_open_ && connected_) {
        // A refused request closed the channel: open a new one and restore
        // the consumers that were fine (a new epoch).
        open_channel();
        restore();
      }
    }
    // After the requests: every one is answered even if this throws.
    if (start_close) begin_close();
    return !rs.empty();
  }

  void declare(const std::string& q) {
    amqp_queue_declare(conn_, chan_, amqp_cstring_bytes(q.c_str()), 0, 1, 0, 0, amqp_empty_table);
    check("runnel::amqp: declaring queue '" + q + "'");
    remember_declared(q);
  }

  void remember_declared(const std::string& q) {
    if (std::find(declared_.begin(), declared_.end(), q) == declared_.end()) declared_.push_back(q);
  }

  // True when a request failed because the connection failed under it (an
  // RPC timed out, the socket closed, the broker forced the connection shut,
  // as close_all_connections and a node going down do), not because the
  // broker refused it (a channel closed with 404, 403, ...). Such a request
  // has not been answered: it is kept and carried out by restore() on the
  // next connection, as after any reconnect; the I/O loop sees the lost
  // connection and reconnects under the usual policy.
  bool cut_off(const error& e) const noexcept {
    return !connected_ && (e.reply_code() == 0 || e.reply_code() == AMQP_CONNECTION_FORCED);
  }

  // Called in the catch block of a request: rethrows the error being handled
  // unless the request was cut_off; else keeps it as the reason the
  // reconnect reports should it give up.
  void absorb_cut_off(const error& e) {
    if (!cut_off(e)) throw;
    last_error_ = e.what();
    last_code_ = e.reply_code();
  }

  void declare_request(const std::string& q) {
    try {
      declare(q);
    } catch (const error& e) {
      absorb_cut_off(e);
      remember_declared(q);  // declared by restore() on the next connection
    }
  }

  void start_consumer(consumer& c) {
    if (c.opts.declare) declare(c.opts.queue);
    amqp_basic_qos(conn_, chan_, 0, static_cast<std::uint16_t>(c.opts.prefetch), 0);
    check("runnel::amqp: basic.qos");
    amqp_basic_consume(conn_, chan_, amqp_cstring_bytes(c.opts.queue.c_str()), amqp_cstring_bytes(c.tag.c_str()),
                       0, 0, 0, amqp_empty_table);
    check("runnel::amqp: consuming from queue '" + c.opts.queue + "'");
  }

  void add_consumer(request& r) {
    auto c = std::make_unique<consumer>();
    c->opts = r.copts;
    c->tag = "runnel-" + std::to_string(consumers_.size());
    c->ch = r.ch;
    c->waker->owner = this;
    c->waker->wake = &core::on_channel_wake;
    try {
      start_consumer(*c);
    } catch (const error& e) {
      absorb_cut_off(e);  // registered all the same: restore() starts it on the next connection
    }
    c->ch->senders.fetch_add(1, std::memory_order_relaxed);  // relaxed: no other sender exists yet
    consumers_.push_back(std::move(c));
  }

  void add_publisher(request& r) {
    auto p = std::make_unique<publisher>();
    p->opts = r.popts;
    p->ch = r.ch;
    p->waker->owner = this;
    p->waker->wake = &core::on_channel_wake;
    p->ch->receivers.fetch_add(1, std::memory_order_relaxed);  // relaxed: as above
    publishers_.push_back(std::move(p));
  }

  // After a new channel: declarations, QoS and consumers again.
  void restore() {
    for (const auto& q : declared_) declare(q);
    for (auto& c : consumers_) {
      // Deliveries not yet handed to the pipeline belong to the old epoch.
      for (auto& d : c->pending) d.core_ = nullptr;
      c->pending.clear();
      if (!c->cancelled) start_consumer(*c);
    }
    // Publishes without an input are sent again; those with one are dropped
    // (their input comes back redelivered and is processed again).
    std::deque<unconfirmed> old;
    old.swap(unconfirmed_);
    for (auto& u : old) {
      if (u.has_input) continue;
      send_publish(u.exchange, u.routing_key, u.msg, u.persistent, std::move(u));
    }
  }

  bool take_ops() {
    bool any = false;
    while (!blocked_ && !deferred_fails_.empty()) {
      op d = std::move(deferred_fails_.front());
      deferred_fails_.pop_front();
      if (d.epoch == epoch()) apply_policy(d);
      else c_stale_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
      any = true;
    }
    op o;
    for (int i = 0; i < 4096 && ops_.try_pop(o); ++i) {
      any = true;
      if (o.epoch != epoch()) {
        c_stale_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
        continue;
      }
      if (o.kind == op::ack) {
        window_.complete(o.tag);
      } else if (o.kind == op::requeue) {
        // Never processed (the pipeline discarded it): back to the queue.
        requeue(o.tag);
      } else if (blocked_) {
        deferred_fails_.push_back(std::move(o));
      } else {
        apply_policy(o);
      }
    }
    return any;
  }

  static void set_header(message& m, const std::string& k, std::string v) {
    for (auto& h : m.headers) {
      if (h.first == k) {
        h.second = std::move(v);
        return;
      }
    }
    m.headers.emplace_back(k, std::move(v));
  }

  // A failed delivery: republish for another attempt, or dead-letter; its
  // input is acked when that publish is confirmed.
  void apply_policy(op& o) {
    if (o.consumer >= consumers_.size()) return;
    const consumer& c = *consumers_[o.consumer];
    const failure_policy& fp = c.opts.on_failure;
    unconfirmed u;
    u.has_input = true;
    u.consumer = o.consumer;
    u.epoch = o.epoch;
    u.tag = o.tag;
    // A message this consumer opened goes back to the broker sealed again
    // (one that did not open is still as it came).
    const bool reseal = c.opts.open && !o.final;
    if (!o.final && o.msg.attempt < fp.max_attempts) {
      set_header(o.msg, attempt_header, std::to_string(o.msg.attempt + 1));
      if (reseal) c.opts.open->seal(o.msg, c.opts.queue);
      u.kind = unconfirmed::retry;
      send_publish("", c.opts.queue, o.msg, true, std::move(u));
      return;
    }
    if (fp.dead_letter_exchange.empty() && fp.dead_letter_routing_key.empty()) {
      c_dead_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
      window_.complete(o.tag);
      return;
    }
    set_header(o.msg, error_header, o.reason);
    const std::string& rk = fp.dead_letter_routing_key.empty() ? o.msg.routing_key : fp.dead_letter_routing_key;
    if (reseal) c.opts.open->seal(o.msg, rk);
    u.kind = unconfirmed::dead_letter;
    send_publish(fp.dead_letter_exchange, rk, o.msg, true, std::move(u));
  }

  // Publishes m and records it as unconfirmed (with its input, if any);
  // `buffered`: into out_, which the caller writes out (write_out()) before
  // any other write to the connection.
  void send_publish(const std::string& exchange, const std::string& rk, const message& m, bool persistent,
                    unconfirmed&& u, bool buffered = false) {
    amqp_basic_properties_t props{};
    props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG;
    props.delivery_mode = persistent ? 2 : 1;
    if (!m.message_id.empty()) {
      props._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
      props.message_id = amqp_cstring_bytes(m.message_id.c_str());
    }
    std::vector<amqp_table_entry_t> hs;
    if (!m.headers.empty()) {
      hs.resize(m.headers.size());
      for (std::size_t i = 0; i < hs.size(); ++i) {
        hs[i].key = amqp_cstring_bytes(m.headers[i].first.c_str());
        hs[i].value.kind = AMQP_FIELD_KIND_UTF8;
        hs[i].value.value.bytes = amqp_cstring_bytes(m.headers[i].second.c_str());
      }
      props._flags |= AMQP_BASIC_HEADERS_FLAG;
      props.headers.num_entries = static_cast<int>(hs.size());
      props.headers.entries = hs.data();
    }
    amqp_bytes_t body{m.body.size(), const_cast<char*>(m.body.data())};
    const int st =
        buffered ? out_.append(chan_, amqp_cstring_bytes(exchange.c_str()), amqp_cstring_bytes(rk.c_str()), props,
                               body, static_cast<std::size_t>(amqp_get_frame_max(conn_)))
                 : amqp_basic_publish(conn_, chan_, amqp_cstring_bytes(exchange.c_str()),
                                      amqp_cstring_bytes(rk.c_str()), 0, 0, &props, body);
    u.seq = next_seq_++;
    if (!u.has_input) {
      u.exchange = exchange;
      u.routing_key = rk;
      u.msg = m;
      u.persistent = persistent;
    }
    unconfirmed_.push_back(std::move(u));
    c_published_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
    if (st != AMQP_STATUS_OK) {
      connected_ = false;
      throw error(std::string("runnel::amqp: publish failed: ") + amqp_error_string2(st));
    }
  }

  bool take_publishes() {
    bool any = false;
    std::vector<delivery> batch;
    for (auto& p : publishers_) {
      if (!p->ch || blocked_) continue;
      batch.clear();
      const auto got = p->ch->try_recv_n([&batch](delivery&& d) noexcept {
        try {
          batch.push_back(std::move(d));
        } catch (...) {
          // Out of memory: the delivery is destroyed unsettled... its
          // destructor acks, which would lose it; fail it instead.
          d.fail("out of memory in the publisher");
        }
      }, publishes_per_round);
      if (got && *got == 0 && !p->ch->is_closed()) arm(*p->waker, *p->ch, false);
      // Plain TCP: the batch is encoded into out_ and written with one
      // send() (publish_buffer.hpp); TLS: published one by one through the
      // library, corked.
      const bool buffered = !opts_.tls.enabled;
      const cork held(!buffered && batch.size() > 1 ? amqp_get_sockfd(conn_) : -1);
      try {
        publish_batch(*p, batch, buffered);
      } catch (...) {
        // The connection is lost (or the thread ends): what was not written
        // must never reach the next connection.
        out_.clear();
        throw;
      }
      any |= !batch.empty();
      write_out();
    }
    return any;
  }

  // Publishes one batch of results (a stale one is dropped).
  void publish_batch(publisher& pub, std::vector<delivery>& batch, bool buffered) {
    for (auto& d : batch) {
      unconfirmed u;
      if (d.core_) {
        if (d.epoch_ != epoch()) {
          c_stale_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
          d.core_ = nullptr;
          continue;
        }
        u.has_input = true;
        u.consumer = d.consumer_;
        u.epoch = d.epoch_;
        u.tag = d.tag_;
        d.core_ = nullptr;  // settled by the confirm from now on
      }
      const std::string& rk = pub.opts.routing_key.empty() ? d.routing_key : pub.opts.routing_key;
      // The attempt header belongs to the input, not to the result.
      std::erase_if(d.headers, [](const auto& h) { return h.first == attempt_header; });
      if (pub.opts.seal) pub.opts.seal->seal(d, rk);
      send_publish(pub.opts.exchange, rk, d, pub.opts.persistent, std::move(u), buffered);
      if (out_.size() >= publish_buffer::flush_at) write_out();
    }
  }

  // Writes out_ to the socket (all of it, or the connection is lost).
  void write_out() {
    if (out_.empty()) return;
    if (out_.flush(amqp_get_sockfd(conn_)) != AMQP_STATUS_OK) {
      const int e = errno;
      connected_ = false;
      throw error("runnel::amqp: publish failed: " + std::generic_category().message(e));
    }
  }

  // Holds what is written to the socket in the kernel (TCP_CORK) while it
  // lives, and sends it when it ends. rabbitmq-c writes a publish as three
  // send() calls and pushes at the last, so a batch of results would leave
  // as one small segment each, every one a pass through the TCP send and (on
  // loopback) receive path and a wake-up of the broker's reader; corked, the
  // batch leaves as a few full segments. fd < 0: nothing held.
  class cork {
   public:
    explicit cork(int fd) noexcept : fd_(fd) { set(1); }
    ~cork() { set(0); }  // uncorking sends what is held at once
    cork(const cork&) = delete;
    cork& operator=(const cork&) = delete;

   private:
    void set(int on) const noexcept {
      // A failure (not a TCP socket) only costs the batching.
      if (fd_ >= 0) (void)::setsockopt(fd_, IPPROTO_TCP, TCP_CORK, &on, sizeof on);
    }
    int fd_;
  };

  // Registers the I/O thread on a channel (as receiver or sender) unless it
  // already is; a wake-up then writes the eventfd.
  void arm(channel_waker& w, runnel::detail::channel_state<delivery>& ch, bool as_sender) {
    // Acquire: pairs with the release in on_channel_wake.
    if (w.armed.load(std::memory_order_acquire)) return;
    w.armed.store(true, std::memory_order_relaxed);  // relaxed: nobody else sees w until park
    const bool parked = as_sender ? ch.park_sender(w) : ch.park_receiver(w);
    if (!parked) {
      w.armed.store(false, std::memory_order_relaxed);  // relaxed: not registered anywhere
      // The condition already holds: look again before sleeping. Relaxed:
      // this thread reads it back.
      channel_woke_.store(true, std::memory_order_relaxed);
    }
  }

  // ---- reading ---------------------------------------------------------------

  struct partial_delivery {
    delivery d;
    std::uint64_t size = 0;
    bool have_header = false;
    std::uint32_t consumer = 0;
    bool active = false;
    void reset() {
      d.core_ = nullptr;  // an unfinished delivery of a dead channel: nothing to settle
      d = delivery{};
      size = 0;
      have_header = false;
      active = false;
    }
  };

  bool read_frames() {
    bool any = false;
    for (int i = 0; i < frames_per_round; ++i) {
      if (!opts_.tls.enabled && !amqp_frames_enqueued(conn_) && !amqp_data_in_buffer(conn_)) {
        // Nothing decoded is waiting, so the call below would recv(): only
        // when the socket may hold bytes, and once a round (a second recv
        // would mostly find the socket drained; poll() tells more cheaply).
        if (!sock_ready_) break;
        sock_ready_ = false;
        last_read_ = std::chrono::steady_clock::now();
      }
      amqp_frame_t f;
      timeval zero{0, 0};
      const int st = amqp_simple_wait_frame_noblock(conn_, &f, &zero);
      if (st == AMQP_STATUS_TIMEOUT) break;
      if (st != AMQP_STATUS_OK) {
        connected_ = false;
        throw error(std::string("runnel::amqp: connection lost: ") + amqp_error_string2(st));
      }
      any = true;
      handle_frame(f);
      if (!partial_.active) amqp_maybe_release_buffers(conn_);
    }
    return any;
  }

  static void copy_headers(const amqp_table_t& t, message& m) {
    for (int i = 0; i < t.num_entries; ++i) {
      const amqp_table_entry_t& e = t.entries[i];
      std::string k = bytes_str(e.key), v;
      switch (e.value.kind) {
        case AMQP_FIELD_KIND_UTF8:
        case AMQP_FIELD_KIND_BYTES: v = bytes_str(e.value.value.bytes); break;
        case AMQP_FIELD_KIND_I8: v = std::to_string(e.value.value.i8); break;
        case AMQP_FIELD_KIND_U8: v = std::to_string(e.value.value.u8); break;
        case AMQP_FIELD_KIND_I16: v = std::to_string(e.value.value.i16); break;
        case AMQP_FIELD_KIND_U16: v = std::to_string(e.value.value.u16); break;
        case AMQP_FIELD_KIND_I32: v = std::to_string(e.value.value.i32); break;
        case AMQP_FIELD_KIND_U32: v = std::to_string(e.value.value.u32); break;
        case AMQP_FIELD_KIND_I64: v = std::to_string(e.value.value.i64); break;
        case AMQP_FIELD_KIND_U64: v = std::to_string(e.value.value.u64); break;
        default: continue;  // other kinds are not carried
      }
      if (k == attempt_header) {
        try {
          m.attempt = static_cast<unsigned>(std::stoul(v));
        } catch (...) {
          m.attempt = 1;
        }
      }
      m.headers.emplace_back(std::move(k), std::move(v));
    }
  }

  void handle_frame(const amqp_frame_t& f) {
    if (f.frame_type == AMQP_FRAME_METHOD) {
      handle_method(f.channel, f.payload.method);
      return;
    }
    if (f.channel != chan_ || !partial_.active) return;
    if (f.frame_type == AMQP_FRAME_HEADER) {
      partial_.size = f.payload.properties.body_size;
      const auto* p = static_cast<const amqp_basic_properties_t*>(f.payload.properties.decoded);
      if (p != nullptr) {
        if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) partial_.d.message_id = bytes_str(p->message_id);
        if (p->_flags & AMQP_BASIC_HEADERS_FLAG) copy_headers(p->headers, partial_.d);
      }
      partial_.have_header = true;
      partial_.d.body.reserve(partial_.size);
    } else if (f.frame_type == AMQP_FRAME_BODY) {
      partial_.d.body.append(static_cast<const char*>(f.payload.body_fragment.bytes), f.payload.body_fragment.len);
    } else {
      return;
    }
    if (partial_.have_header && partial_.d.body.size() >= partial_.size) complete_delivery();
  }

  void complete_delivery() {
    consumer& c = *consumers_[partial_.consumer];
    c_delivered_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
    if (partial_.d.redelivered) c_redelivered_.fetch_add(1, std::memory_order_relaxed);
    window_.delivered(partial_.d.tag_);
    set_unacked();
    if (c.opts.open) {
      try {
        c.opts.open->open(partial_.d);
      } catch (const seal_error& e) {
        unopenable(e.what());
        return;
      }
    }
    c.pending.push_back(std::move(partial_.d));
    partial_.reset();
  }

  // The delivery in partial_ did not open: dead-letter it now (no stage sees
  // it); its input is acked once that publish is confirmed.
  void unopenable(std::string reason) {
    op o;
    o.kind = op::fail;
    o.final = true;
    o.consumer = partial_.consumer;
    o.epoch = partial_.d.epoch_;
    o.tag = partial_.d.tag_;
    o.reason = std::move(reason);
    o.msg = std::move(static_cast<message&>(partial_.d));
    partial_.reset();  // settled by the dead-letter publish from now on
    c_unopened_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
    if (blocked_) deferred_fails_.push_back(std::move(o));
    else apply_policy(o);
  }

  void handle_method(amqp_channel_t ch, const amqp_method_t& m) {
    switch (m.id) {
      case AMQP_BASIC_DELIVER_METHOD: {
        if (ch != chan_) return;
        const auto* d = static_cast<const amqp_basic_deliver_t*>(m.decoded);
        partial_.reset();
        partial_.active = true;
        partial_.consumer = consumer_index(d->consumer_tag);
        partial_.d.routing_key = bytes_str(d->routing_key);
        partial_.d.exchange = bytes_str(d->exchange);
        partial_.d.redelivered = d->redelivered != 0;
        partial_.d.core_ = shared_from_this();
        partial_.d.epoch_ = epoch();
        partial_.d.tag_ = d->delivery_tag;
        partial_.d.consumer_ = partial_.consumer;
        return;
      }
      case AMQP_BASIC_ACK_METHOD: {
        if (ch != chan_) return;
        const auto* a = static_cast<const amqp_basic_ack_t*>(m.decoded);
        on_confirm(a->delivery_tag, a->multiple != 0, true);
        return;
      }
      case AMQP_BASIC_NACK_METHOD: {
        if (ch != chan_) return;
        const auto* a = static_cast<const amqp_basic_nack_t*>(m.decoded);
        on_confirm(a->delivery_tag, a->multiple != 0, false);
        return;
      }
      case AMQP_BASIC_CANCEL_METHOD: {
        // The broker cancelled a consumer (its queue was deleted).
        const auto* c = static_cast<const amqp_basic_cancel_t*>(m.decoded);
        throw_fatal(error("runnel::amqp: the broker cancelled the consumer of queue '" +
                          consumers_[consumer_index(c->consumer_tag)]->opts.queue + "' (queue deleted?)", 404));
        return;
      }
      case AMQP_CHANNEL_CLOSE_METHOD: {
        const auto* c = static_cast<const amqp_channel_close_t*>(m.decoded);
        const int code = c->reply_code;
        const std::string text = bytes_str(c->reply_text);
        amqp_channel_close_ok_t ok{};
        amqp_send_method(conn_, ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        channel_open_ = false;
        error e("runnel::amqp: the broker closed the channel: " + std::to_string(code) + " " + text, code);
        // Access refused (a publish to an exchange we may not write to): a
        // reconnect would only repeat it, redelivering the inputs forever.
        if (code == AMQP_ACCESS_REFUSED) throw_fatal(std::move(e));
        throw e;
      }
      case AMQP_CONNECTION_CLOSE_METHOD: {
        const auto* c = static_cast<const amqp_connection_close_t*>(m.decoded);
        const int code = c->reply_code;
        const std::string text = bytes_str(c->reply_text);
        amqp_connection_close_ok_t ok{};
        amqp_send_method(conn_, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
        connected_ = false;
        throw error("runnel::amqp: the broker closed the connection: " + std::to_string(code) + " " + text,
                    code);
      }
      case AMQP_CONNECTION_BLOCKED_METHOD:
        set_blocked(true);
        return;
      case AMQP_CONNECTION_UNBLOCKED_METHOD:
        set_blocked(false);
        return;
      default:
        return;  // cancel-ok, flow, ...: nothing to do
    }
  }

  // A blocked broker stops reading our socket at the first publish, which
  // would then stall this thread in send() (no acks, no deliveries, no
  // heartbeats). So while blocked nothing is published: results wait in
  // their bounded publish channels (the stages feeding them park), failures
  // wait in deferred_fails_ (at most one per unacked delivery).
  void set_blocked(bool b) {
    if (b && !blocked_) c_blocks_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
    blocked_ = b;
    c_blocked_.store(b, std::memory_order_relaxed);  // relaxed: a gauge for display
  }

  [[noreturn]] void throw_fatal(error e) {
    fatal_stop_ = true;
    throw e;
  }

  // Tags are "runnel-<index>" (add_consumer); read in place, as it comes
  // with every delivery. Anything else is consumer 0.
  std::uint32_t consumer_index(amqp_bytes_t tag) const noexcept {
    const auto* p = static_cast<const char*>(tag.bytes);
    constexpr std::size_t prefix = 7;  // "runnel-"
    std::size_t i = 0;
    for (std::size_t k = prefix; k < tag.len; ++k) {
      if (p[k] < '0' || p[k] > '9' || i >= consumers_.size()) return 0;
      i = i * 10 + static_cast<std::size_t>(p[k] - '0');
    }
    return static_cast<std::uint32_t>(tag.len > prefix && i < consumers_.size() ? i : 0);
  }

  void on_confirm(std::uint64_t seq, bool multiple, bool ok) {
    for (auto& u : unconfirmed_) {
      if (u.seq > seq) break;
      if (u.seq == seq || multiple) u.confirmed = true;
    }
    while (!unconfirmed_.empty() && unconfirmed_.front().confirmed) {
      unconfirmed& u = unconfirmed_.front();
      c_confirmed_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
      if (u.has_input && u.epoch == epoch()) {
        if (ok) {
          if (u.kind == unconfirmed::retry) c_retried_.fetch_add(1, std::memory_order_relaxed);
          if (u.kind == unconfirmed::dead_letter) c_dead_.fetch_add(1, std::memory_order_relaxed);
          window_.complete(u.tag);
        } else {
          // The broker could not take the result: requeue the input.
          amqp_basic_nack(conn_, chan_, u.tag, 0, 1);
          window_.mark_sent(u.tag);
          c_nacked_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
        }
      }
      unconfirmed_.pop_front();
    }
  }

  // ---- feeding the pipeline --------------------------------------------------

  bool feed_consumers() {
    bool any = false;
    for (auto& c : consumers_) {
      requeue_abandoned(*c);
      if (c->pending.empty() || !c->ch) continue;
      const std::size_t n = c->pending.size();
      const auto k = c->ch->try_send_n(c->pending.begin(), n);
      if (!k) {
        // The pipeline dropped the channel: requeue what it will never take.
        for (auto& d : c->pending) {
          requeue(d.tag_);
          d.core_ = nullptr;
        }
        c->pending.clear();
        continue;
      }
      if (*k != 0) any = true;
      c->pending.erase(c->pending.begin(), c->pending.begin() + static_cast<std::ptrdiff_t>(*k));
      if (!c->pending.empty()) arm(*c->waker, *c->ch, true);
    }
    return any;
  }

  // The pipeline let go of the consume channel (its last receiver is gone,
  // e.g. after cancel()): cancel the consumer so the broker stops sending,
  // and requeue what is still in the channel, which nobody will take,
  // instead of holding it unacked until the connection closes.
  void requeue_abandoned(consumer& c) {
    // Acquire: pairs with the last receiver's acq_rel decrement; no receiver
    // touches the ring after it, so this thread may drain it.
    if (!c.ch || c.ch->receivers.load(std::memory_order_acquire) != 0) return;
    if (!c.cancelled) cancel_consumer(c);
    const std::uint64_t ep = epoch();
    for (;;) {
      const auto got = c.ch->try_recv_n([this, ep](delivery&& d) noexcept {
        if (d.core_ && d.epoch_ == ep) requeue(d.tag_);  // an older epoch's was requeued by the broker
        d.core_ = nullptr;  // settled here: its destructor must not ack it
      }, 256);
      if (!got || *got == 0) return;
    }
  }

  // ---- acks --------------------------------------------------------------------

  // Settles `tag` on its own with a nack that requeues it.
  // A tag that is not pending is ignored (settling it twice would close
  // the channel), as complete() ignores one.
  void requeue(std::uint64_t tag) {
    if (!window_.mark_sent(tag)) return;
    amqp_basic_nack(conn_, chan_, tag, 0, 1);
    c_nacked_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
  }

  // Busy: ack when a batch of done tags has gathered (each ack frame costs
  // the broker as much as a message); idle: ack everything at once, so acks
  // never wait for a batch to fill.
  void flush_acks(bool idle) {
    if (!idle && window_.done_waiting() < ack_batch) return;
    std::uint64_t n = 0;
    if (const auto tag = window_.advance(&n)) {
      send_ack(*tag, true);
      c_acked_.fetch_add(n, std::memory_order_relaxed);  // relaxed: a counter
    }
    // Stragglers behind a slow message: singly, when idle or when they would
    // otherwise hold back much of the prefetch window.
    if (idle || window_.done_waiting() >= ack_batch) {
      for (std::uint64_t t : window_.take_stragglers()) {
        send_ack(t, false);
        c_acked_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
      }
    }
    set_unacked();
  }

  // The I/O thread goes idle: acks every done delivery now when nothing
  // else is in flight (traffic stopped, or the rest are stragglers), when
  // they fill a batch or a quarter of the smallest prefetch (the broker
  // counts them against it), or when the oldest has waited ack_linger.
  // Otherwise holds them back, so that a stream that merely pauses between
  // deliveries sends one ack frame a batch rather than one a pause (each
  // costs the broker about as much as a message); returns how long poll()
  // may sleep before they are due (-1: nothing held).
  int idle_acks() {
    const std::size_t done = window_.done_waiting();
    if (done == 0) {
      acks_held_ = false;
      flush_acks(true);  // nothing done waits; stragglers bookkeeping only
      return -1;
    }
    const auto now = std::chrono::steady_clock::now();
    if (!acks_held_) {
      acks_held_ = true;
      acks_held_since_ = now;
    }
    std::size_t smallest_prefetch = 65535;
    for (const auto& c : consumers_)
      if (!c->cancelled) smallest_prefetch = std::min<std::size_t>(smallest_prefetch, c->opts.prefetch);
    const bool due = done >= ack_batch || 4 * done >= smallest_prefetch || window_.unsettled() == done ||
                     closing_ || now - acks_held_since_ >= ack_linger;
    if (due) {
      acks_held_ = false;
      flush_acks(true);
      return -1;
    }
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(acks_held_since_ + ack_linger - now);
    return static_cast<int>(std::max<std::chrono::milliseconds::rep>(1, left.count()));
  }

  void send_ack(std::uint64_t tag, bool multiple) {
    c_ack_frames_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
    const int st = amqp_basic_ack(conn_, chan_, tag, multiple ? 1 : 0);
    if (st != AMQP_STATUS_OK) {
      connected_ = false;
      throw error(std::string("runnel::amqp: ack failed: ") + amqp_error_string2(st));
    }
  }

  void set_unacked() {
    const std::uint64_t u = window_.unsettled();
    c_unacked_.store(u, std::memory_order_relaxed);  // relaxed: a gauge for display
    if (u > c_unacked_peak_.load(std::memory_order_relaxed)) c_unacked_peak_.store(u, std::memory_order_relaxed);
  }

  // ---- sleeping ------------------------------------------------------------------

  // How long the I/O thread may go without calling into rabbitmq-c's read
  // path: at least every half heartbeat, so that the library sends ours and
  // notices the broker's missing (it does both only inside its calls), and
  // every second otherwise.
  int read_interval_ms() const noexcept {
    const int every = opts_.heartbeat_s > 0 ? opts_.heartbeat_s * 500 : 1000;
    return std::min(every, 1000);
  }

  void sleep() {
    int linger_ms = -1;  // poll no longer than this while acks are held back
    if (connected_ && channel_open_) linger_ms = idle_acks();
    // Relaxed store + full fence: see wake().
    sleeping_.store(true, std::memory_order_relaxed);
    runnel::detail::full_fence();
    // Acquire: a wake-up seen here hands over the channel change it announced.
    bool work = !ops_.empty_approx() || channel_woke_.load(std::memory_order_acquire);
    {
      std::lock_guard lock(req_m_);
      work |= !requests_.empty() || (closing_requested_ && !closing_);
    }
    const bool live = conn_ != nullptr && connected_;
    if (live) work |= amqp_frames_enqueued(conn_) || amqp_data_in_buffer(conn_);
    if (work) {
      // An eventfd write that raced with this stays pending: the next poll
      // returns at once and reads it.
      sleeping_.store(false, std::memory_order_relaxed);  // relaxed: only avoids needless writes
      return;
    }
    pollfd fds[2];
    fds[0] = {efd_, POLLIN, 0};
    int n = 1;
    if (live) fds[n++] = {amqp_get_sockfd(conn_), POLLIN, 0};
    // Wake at least every read interval (see read_interval_ms()).
    int timeout = read_interval_ms();
    if (linger_ms >= 0) timeout = std::min(timeout, linger_ms);
    const int ready = ::poll(fds, static_cast<nfds_t>(n), timeout);
    sleeping_.store(false, std::memory_order_relaxed);  // relaxed: only avoids needless writes
    unlooked_busy_ = false;
    if (ready < 0) {
      sock_ready_ = true;  // interrupted: look at everything
      drain_eventfd();
      return;
    }
    if (n > 1 && fds[1].revents != 0) sock_ready_ = true;  // data, hang-up or error: the read reports it
    if ((fds[0].revents & POLLIN) != 0) drain_eventfd();
    if (live) read_if_due();
  }

  // A busy round ends here instead of in sleep(). Most are followed by an
  // idle one, whose sleep() polls the socket anyway; a second busy round in
  // a row looks whether the socket has bytes (one poll() instead of
  // rabbitmq-c's recv() and poll() of an empty socket), so reading keeps up
  // while the loop stays busy.
  void peek_socket() {
    if (sock_ready_ || conn_ == nullptr || !connected_ || opts_.tls.enabled) return;
    if (!unlooked_busy_) {
      unlooked_busy_ = true;
      return;
    }
    unlooked_busy_ = false;
    pollfd fd{amqp_get_sockfd(conn_), POLLIN, 0};
    if (::poll(&fd, 1, 0) != 0) sock_ready_ = true;
    else read_if_due();
  }

  // A socket that stays silent while the loop is kept awake by other work
  // is still read every read interval (heartbeats, see read_interval_ms()).
  void read_if_due() {
    if (!sock_ready_ &&
        std::chrono::steady_clock::now() - last_read_ >= std::chrono::milliseconds(read_interval_ms()))
      sock_ready_ = true;
  }

  void drain_eventfd() noexcept {
    std::uint64_t v;
    [[maybe_unused]] const auto r = ::read(efd_, &v, sizeof v);
  }

  // ---- closing ----------------------------------------------------------------

  // Stop consuming: cancel every consumer (deliveries already received still
  // go through the pipeline).
  void begin_close() {
    closing_ = true;
    close_deadline_ = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    for (auto& c : consumers_)
      if (!c->cancelled) cancel_consumer(*c);
  }

  // basic.cancel (and not again after a reconnect); deliveries already on
  // their way still arrive and are requeued or processed as usual.
  void cancel_consumer(consumer& c) {
    c.cancelled = true;
    if (connected_ && channel_open_ &&
        amqp_basic_cancel(conn_, chan_, amqp_cstring_bytes(c.tag.c_str())) == nullptr) {
      // The reply may be the broker closing the channel over an earlier
      // frame (a refused publish): rabbitmq-c has consumed that close, so
      // no later read sees it; report it here.
      error e = reply_error("runnel::amqp: cancelling the consumer of queue '" + c.opts.queue + "'",
                            amqp_get_rpc_reply(conn_));
      if (e.reply_code() == AMQP_ACCESS_REFUSED) throw_fatal(std::move(e));
      throw e;
    }
  }

  // True once nothing is left in flight.
  bool close_done() {
    for (auto& c : consumers_) {
      requeue_abandoned(*c);
      if (!c->pending.empty()) return false;
      if (c->ch) {
        c->ch->close();  // the pipeline ends once it has drained it
        if (c->ch->unpark(*c->waker)) c->waker->armed.store(false, std::memory_order_relaxed);
      }
    }
    for (auto& p : publishers_)
      if (p->ch && p->ch->size_approx() != 0) return false;
    if (!window_.empty() || !unconfirmed_.empty()) {
      return std::chrono::steady_clock::now() >= close_deadline_;
    }
    return true;
  }

  void shutdown_connection() {
    if (conn_ == nullptr) return;
    if (connected_) {
      amqp_channel_close(conn_, chan_, AMQP_REPLY_SUCCESS);
      amqp_connection_close(conn_, AMQP_REPLY_SUCCESS);
    }
    amqp_destroy_connection(conn_);
    conn_ = nullptr;
    connected_ = false;
  }

  // ---- reconnecting ------------------------------------------------------------

  void lost() {
    if (fatal_stop_) throw error(last_error_, last_code_);
    if (conn_ != nullptr) {
      amqp_destroy_connection(conn_);
      conn_ = nullptr;
    }
    connected_ = false;
    channel_open_ = false;
    partial_.reset();
    // Everything of the dead channel is void: a new epoch starts now, so late
    // acks and results of the old one are dropped.
    epoch_.fetch_add(1, std::memory_order_release);  // release: as in open_channel
    window_.reset();
    set_unacked();
    deferred_fails_.clear();  // their inputs come back redelivered
    set_blocked(false);       // a new connection is told again if the alarm holds
    backoff_ms_ = opts_.reconnect_initial_ms;
    failed_attempts_ = 0;
  }

  void reconnect() {
    // Capped exponential backoff with jitter; interruptible by close().
    std::uniform_int_distribution<int> jitter(backoff_ms_ / 2, backoff_ms_ + backoff_ms_ / 2);
    const int delay = jitter(rng_);
    pollfd fd{efd_, POLLIN, 0};
    ::poll(&fd, 1, delay);
    std::uint64_t v;
    [[maybe_unused]] const auto r = ::read(efd_, &v, sizeof v);
    if (closing_requested()) return;
    backoff_ms_ = std::min(backoff_ms_ * 2, opts_.reconnect_max_ms);
    next_ep_ = (next_ep_ + 1) % opts_.endpoints.size();
    try {
      connect(opts_.endpoints[next_ep_]);
      restore();
      c_reconnects_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a counter
    } catch (const error& e) {
      last_error_ = e.what();
      last_code_ = e.reply_code();
      if (conn_ != nullptr) {
        amqp_destroy_connection(conn_);
        conn_ = nullptr;
      }
      connected_ = false;
      channel_open_ = false;
      if (opts_.reconnect_attempts > 0 && ++failed_attempts_ >= opts_.reconnect_attempts)
        throw error("runnel::amqp: giving up reconnecting: " + last_error_, last_code_);
    }
  }

  // The I/O thread is ending (closed or fatal): end the pipeline's input,
  // stop taking results, answer waiting requests.
  void finish() noexcept {
    shutdown_connection();
    for (auto& c : consumers_) {
      for (auto& d : c->pending) d.core_ = nullptr;
      c->pending.clear();
      if (c->ch) {
        if (c->ch->unpark(*c->waker)) c->waker->armed.store(false, std::memory_order_relaxed);
        if (c->ch->senders.fetch_sub(1, std::memory_order_acq_rel) == 1) c->ch->close();
        c->ch->close();
        // Let go of the channel: deliveries still in its ring hold this core,
        // so keeping it would keep both alive once its receivers are gone.
        // Its receivers still drain it; their acks are void (the broker
        // requeues what was never acked when the connection went).
        c->ch.reset();
      }
    }
    for (auto& p : publishers_) {
      if (p->ch) {
        if (p->ch->unpark(*p->waker)) p->waker->armed.store(false, std::memory_order_relaxed);
        if (p->ch->receivers.fetch_sub(1, std::memory_order_acq_rel) == 1) p->ch->close();
        p->ch->close();
        p->ch.reset();  // as for the consumers: results left in its ring hold this core
      }
    }
    std::vector<request*> rs;
    {
      std::lock_guard lock(req_m_);
      finished_ = true;
      rs.swap(requests_);
    }
    for (request* r : rs) r->fail(std::make_exception_ptr(error("runnel::amqp: the client is closed")));
  }

  connection_options opts_;
  mpmc_queue<op> ops_;  // acks and failures from workers
  int efd_ = -1;
  // True while the I/O thread is (about to be) asleep in poll(); see wake().
  std::atomic<bool> sleeping_{false};
  // Set by a channel waker that fired (and by arm() when the condition held
  // already); taken by the I/O thread before it looks at its channels, and
  // re-checked after announcing sleep, so a wake-up while it is awake needs
  // no eventfd write.
  std::atomic<bool> channel_woke_{false};
  // Epoch of the current AMQP channel; written by the I/O thread only.
  std::atomic<std::uint64_t> epoch_{0};

  std::mutex req_m_;
  std::vector<request*> requests_;      // guarded by req_m_
  bool closing_requested_ = false;      // guarded by req_m_
  bool finished_ = false;               // guarded by req_m_
  std::exception_ptr fatal_;            // guarded by req_m_ after the thread ended
  std::thread thread_;

  // I/O thread only from here on (and the constructor's thread before it starts).
  amqp_connection_state_t conn_ = nullptr;
  amqp_channel_t chan_ = 0;
  bool connected_ = false, channel_open_ = false;
  bool closing_ = false, fatal_stop_ = false;
  std::chrono::steady_clock::time_point close_deadline_{};
  std::size_t next_ep_ = 0;
  std::vector<std::unique_ptr<consumer>> consumers_;
  std::vector<std::unique_ptr<publisher>> publishers_;
  std::vector<std::string> declared_;
  ack_window window_;
  std::deque<unconfirmed> unconfirmed_;
  publish_buffer out_;  // publishes of one batch, empty outside take_publishes()
  std::uint64_t next_seq_ = 1;
  partial_delivery partial_;
  // Plain TCP: the socket may hold unread bytes (poll() said so, or it has
  // not been asked since the last read); see read_frames().
  bool sock_ready_ = true;
  std::chrono::steady_clock::time_point last_read_{};  // the last call into rabbitmq-c's recv path
  bool unlooked_busy_ = false;  // the last round was busy and did not look at the socket (peek_socket())
  bool blocked_ = false;            // connection.blocked and not yet unblocked
  bool acks_held_ = false;          // done deliveries held back by idle_acks() since acks_held_since_
  std::chrono::steady_clock::time_point acks_held_since_{};
  std::deque<op> deferred_fails_;   // failures to publish once unblocked
  int backoff_ms_ = 100, failed_attempts_ = 0;
  std::string last_error_;
  int last_code_ = 0;
  std::minstd_rand rng_{std::random_device{}()};

  // Counters (relaxed: each independent, for stats()).
  std::atomic<std::uint64_t> c_delivered_{0}, c_redelivered_{0}, c_acked_{0}, c_nacked_{0}, c_retried_{0},
      c_dead_{0}, c_published_{0}, c_confirmed_{0}, c_stale_{0}, c_reconnects_{0}, c_unacked_{0},
      c_unacked_peak_{0}, c_blocks_{0}, c_unopened_{0}, c_ack_frames_{0};
  std::atomic<bool> c_blocked_{false};  // relaxed: a gauge for display

  friend class runnel::amqp::delivery;
};

}  // namespace detail

inline void delivery::settle() noexcept {
  if (!core_) return;
  detail::op o;
  o.epoch = epoch_;
  o.tag = tag_;
  o.consumer = consumer_;
  const message_fate fate = current_message_fate();
  if (fate == message_fate::discarded) {
    o.kind = detail::op::requeue;
  } else if (fate == message_fate::failed || std::uncaught_exceptions() > uncaught_) {
    o.kind = detail::op::fail;
    o.reason = "an exception was thrown while processing the message";
    o.msg = std::move(static_cast<message&>(*this));
  }
  auto c = std::move(core_);
  c->push(std::move(o));
}

inline void delivery::fail(std::string reason) noexcept {
  if (!core_) return;
  detail::op o;
  o.kind = detail::op::fail;
  o.epoch = epoch_;
  o.tag = tag_;
  o.consumer = consumer_;
  o.reason = std::move(reason);
  o.msg = std::move(static_cast<message&>(*this));
  auto c = std::move(core_);
  c->push(std::move(o));
}

}  // namespace runnel::amqp
