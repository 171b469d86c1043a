#!/bin/sh
# A tiny run of the scaling demo (the CI check of the linked-in example):
# every implementation on 1 and 2 cores, then the JSON, CSV and SVG it wrote
# are parsed back. Usage: check_scaling_demo.sh <scaling_demo> <output prefix>
set -eu
demo=$1
out=$2
"$demo" --cores 1,2 --oversubscribe --messages 3000 --repetitions 2 --peers --ordered \
  --json "$out.json" --csv "$out.csv" --plot "$out.svg"
"${PYTHON:-python3}" - "$out" <<'PY'
import csv, json, sys, xml.etree.ElementTree as ET
out = sys.argv[1]
rep = json.load(open(out + ".json"))
impls = {r["implementation"] for r in rep["results"]}
assert {"runnel", "loop", "mutex+threads"} <= impls, impls
for r in rep["results"]:
    assert r["messages"] == 3000, r
    assert r["messages_per_second"]["median"] > 0, r
rows = list(csv.reader(open(out + ".csv")))
assert len(rows) == 1 + len(rep["results"]), rows
assert all(len(r) == len(rows[0]) for r in rows), rows
svg = ET.parse(out + ".svg").getroot()
ns = "{http://www.w3.org/2000/svg}"
series = {g.get("data-implementation") for g in svg.iter(ns + "g") if g.get("class") == "series"}
assert series == impls, (series, impls)
print("scaling demo outputs parsed back:", sorted(series))
PY
