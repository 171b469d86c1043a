#!/usr/bin/env python3
"""Peers of bench/amqp_bench written with pika (Debian python3-pika).

  pika_peer.py pool PORT IN OUT W N      one process: BlockingConnection, a
      ThreadPoolExecutor(2) computes, results are published and inputs acked
      from the connection's thread via add_callback_threadsafe (pika's
      documented way to use it from several threads)
  pika_peer.py proc PORT IN OUT W        one single-threaded consumer: run
      two of them for the "2 processes, one connection each" peer

Work per message: W rounds of a 64-bit LCG seeded from the body; the result
is 8 bytes. Prints "first last count": wall-clock seconds of the first
delivery and of the last ack, and the messages handled.
"""
import functools
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pika

MASK = (1 << 64) - 1


def work(body, w):
    x = 1469598103934665603
    for b in body[:8]:
        x = ((x ^ b) * 1099511628211) & MASK
    for _ in range(w):
        x = (x * 6364136223846793005 + 1442695040888963407) & MASK
    return struct.pack("<Q", x)


def connect(port):
    params = pika.ConnectionParameters(host="127.0.0.1", port=port, heartbeat=30,
                                       credentials=pika.PlainCredentials("guest", "guest"))
    return pika.BlockingConnection(params)


def pool(port, qin, qout, w, n):
    conn = connect(port)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=256)
    ex = ThreadPoolExecutor(max_workers=2)
    state = {"first": None, "last": None, "done": 0}
    props = pika.BasicProperties(delivery_mode=1)

    def finish(tag, result):
        ch.basic_publish(exchange="", routing_key=qout, body=result, properties=props)
        ch.basic_ack(delivery_tag=tag)
        state["done"] += 1
        state["last"] = time.time()
        if state["done"] == n:
            ch.stop_consuming()

    def compute(tag, body):
        r = work(body, w)
        conn.add_callback_threadsafe(functools.partial(finish, tag, r))

    def on_message(_ch, method, _props, body):
        if state["first"] is None:
            state["first"] = time.time()
        ex.submit(compute, method.delivery_tag, body)

    ch.basic_consume(queue=qin, on_message_callback=on_message)
    ch.start_consuming()
    ex.shutdown()
    conn.close()
    print(state["first"], state["last"], state["done"])


def proc(port, qin, qout, w):
    conn = connect(port)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=256)
    props = pika.BasicProperties(delivery_mode=1)
    first = last = None
    done = 0
    for method, _p, body in ch.consume(qin, inactivity_timeout=1.0):
        if method is None:
            if done:
                break
            continue
        if first is None:
            first = time.time()
        ch.basic_publish(exchange="", routing_key=qout, body=work(body, w), properties=props)
        ch.basic_ack(delivery_tag=method.delivery_tag)
        done += 1
        last = time.time()
    ch.cancel()
    conn.close()
    print(first, last, done)


if __name__ == "__main__":
    mode, port, qin, qout, w = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    if mode == "pool":
        pool(port, qin, qout, w, int(sys.argv[6]))
    else:
        proc(port, qin, qout, w)
