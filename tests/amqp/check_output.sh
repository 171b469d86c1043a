# Sourced by netcut.sh and cluster_down.sh: the final check of a worker run.
#
#   check_output LABEL PORT N PREFIX FINAL
#
# Takes every result off queue PREFIX.out (through 127.0.0.1:PORT) and counts
# each id 0..N-1 in it; reads the depth of PREFIX.dead; FINAL is the worker's
# "final:" stats line (its reconnect count). Prints the figures and PASS or
# FAIL, each line prefixed "LABEL: "; returns 0 on PASS: no id missing,
# nothing dead-lettered, and the worker reconnected at least once.
check_output() {
  /usr/bin/python3 - "$@" <<'PY'
import sys, re, pika
label, port, n, prefix, final = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
c = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
ch = c.channel()
seen = [0] * n
while True:
    m, _, body = ch.basic_get(prefix + ".out", auto_ack=True)
    if m is None:
        break
    seen[int(body)] += 1
dead = ch.queue_declare(prefix + ".dead", durable=True).method.message_count
c.close()
missing = sum(1 for k in seen if k == 0)
dups = sum(k - 1 for k in seen if k > 1)
rec = re.search(r"reconnects (\d+)", final)
reconnects = int(rec.group(1)) if rec else -1
print(f"{label}: {n} ids, missing {missing}, duplicates {dups}, dead-lettered {dead}, worker reconnects {reconnects}")
ok = missing == 0 and dead == 0 and reconnects >= 1
print(f"{label}: PASS" if ok else f"{label}: FAIL")
sys.exit(0 if ok else 1)
PY
}
