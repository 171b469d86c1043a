// hello_channel: two threads talk through a bounded runnel channel.
//
// The producer sends a few greetings and then simply goes away: destroying
// the last sender closes the channel. The consumer's range-for receives
// every message that was sent and ends once the channel is closed and
// drained.
#include <runnel/channel.hpp>

#include <cstdio>
#include <string>
#include <thread>

int main() {
  // Room for 4 messages: a fifth send waits until the consumer catches up.
  auto [tx, rx] = runnel::make_channel<std::string>(4);

  std::thread producer([tx = std::move(tx)]() mutable {
    for (int i = 1; i <= 10; ++i) {
      // send() only fails if the channel was closed; it then hands the
      // message back instead of losing it.
      auto result = tx.send("hello #" + std::to_string(i));
      if (!result) std::printf("not sent: %s\n", result.value()->c_str());
    }
    // tx is destroyed with the lambda: the channel closes.
  });

  std::thread consumer([rx = std::move(rx)]() mutable {
    int received = 0;
    for (std::string& message : rx) {
      std::printf("got %s\n", message.c_str());
      ++received;
    }
    std::printf("channel closed after %d messages\n", received);
  });

  producer.join();
  consumer.join();
  return 0;
}
