#!/usr/bin/env bash
# Reseed throughput against the raw read throughput of the same S3 server, in one run:
# a 3-node cluster (n1, n2 in r1; n3 in r2) + router + seeder on moto S3; BLOBS blobs of SIZE
# pushed into one service/mode; one of its replicas is wiped and restarted under the same id;
# the seeder rebuilds it from S3. Then every blob object is read straight from moto with the
# same concurrency (boto3), for the raw figure, and read + sha256 + write + fsync, for the
# figure of the same work done by a plain client. Needs a release build.
# Usage: benches/reseed.sh        (BLOBS=400 SIZE=5MiB CONC=4 by default: 2000 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
BLOBS=${BLOBS:-400}; SIZE=${SIZE:-5MiB}; CONC=${CONC:-4}
FLOTILLA=${FLOTILLA_BIN:-target/release/flotilla}
BENCH=${BENCH_BIN:-target/release/flotilla-bench}
WORK=$(mktemp -d); PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 600); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "$1 not up" >&2; exit 1; }
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench FLOTILLA_SECRET=bench RUST_LOG=warn
MP=$(free_port); moto_server -H 127.0.0.1 -p "$MP" >"$WORK/moto.log" 2>&1 & PIDS+=($!)
for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$MP/" && break; sleep 0.1; done
curl -sf -X PUT "http://127.0.0.1:$MP/bench" >/dev/null
S3="s3://bench/flotilla?endpoint=http://127.0.0.1:$MP&region=us-east-1"
META="file://$WORK/meta"
declare -A PORT RACK=([n1]=r1 [n2]=r1 [n3]=r2) PID
start_node() {
  "$FLOTILLA" node --id "$1" --rack "${RACK[$1]}" --listen "127.0.0.1:${PORT[$1]}" --data "$WORK/$1" \
    --meta "$META" --store "$S3" >>"$WORK/$1.log" 2>&1 &
  PID[$1]=$!; PIDS+=($!)
}
for n in n1 n2 n3; do PORT[$n]=$(free_port); start_node "$n"; done
RP=$(free_port)
"$FLOTILLA" router --listen "127.0.0.1:$RP" --meta "$META" >"$WORK/router.log" 2>&1 & PIDS+=($!)
"$FLOTILLA" seeder --meta "$META" --store "$S3" --seed-concurrency "$CONC" >"$WORK/seeder.log" 2>&1 & PIDS+=($!)
wait_up "http://127.0.0.1:$RP/readyz"
until [ "$(curl -s "http://127.0.0.1:$RP/admin/v1/nodes" | python3 -c 'import json,sys; print(sum(n["live"] for n in json.load(sys.stdin)))')" = 3 ]; do sleep 0.2; done
echo "pushing $BLOBS x $SIZE through the router..."
"$BENCH" run "http://127.0.0.1:$RP" push -c 4 -n "$BLOBS" --size "$SIZE" --repo reseed/bench/data --json "$WORK/push.json" >/dev/null
VICTIM=$(curl -s "http://127.0.0.1:$RP/admin/v1/shards/reseed/bench" | python3 -c 'import json,sys; print(json.load(sys.stdin)["replicas"][0])')
echo "wiping $VICTIM and restarting it under the same id"
kill -9 "${PID[$VICTIM]}"; wait "${PID[$VICTIM]}" 2>/dev/null || true; rm -rf "${WORK:?}/$VICTIM"
start_node "$VICTIM"
python3 - "$RP" "$VICTIM" <<'PY'
import json, sys, time, urllib.request
rp, node = sys.argv[1], sys.argv[2]
deadline = time.time() + 1800
while time.time() < deadline:
    r = json.load(urllib.request.urlopen(f"http://127.0.0.1:{rp}/admin/v1/reseed"))
    recs = [x for x in r.get("reseeds", []) if x.get("node") == node]
    if recs and recs[0].get("status") == "done" and recs[0].get("finished_ms"):
        x = recs[0]
        secs = (x["finished_ms"] - x["started_ms"]) / 1000
        print(f"| reseed of {node} | {x['objects_done']} objects, {x['bytes_done']/2**20:.0f} MiB in {secs:.1f} s "
              f"| {x['bytes_done']/2**20/secs:.1f} MiB/s | {x['objects_done']/secs:.1f} objects/s |")
        sys.exit(0)
    time.sleep(0.5)
sys.exit("reseed did not finish")
PY
# Two references on the same S3 server with the same threads (boto3): read and discard
# (the raw figure), and read + sha256 + write + fsync (what a reseed must do per byte, done
# by the simplest client).
python3 - "$MP" "$CONC" "$WORK/raw-store" <<'PY'
import hashlib, os, sys, time, boto3
from concurrent.futures import ThreadPoolExecutor
port, conc, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.makedirs(out, exist_ok=True)
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                  aws_access_key_id="bench", aws_secret_access_key="bench")
keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix="flotilla/blobs/")
        for o in p.get("Contents", [])]
def discard(k):
    body = s3.get_object(Bucket="bench", Key=k)["Body"]
    return sum(len(c) for c in iter(lambda: body.read(1 << 20), b""))
def store(k):
    body = s3.get_object(Bucket="bench", Key=k)["Body"]
    h, n, hexd = hashlib.sha256(), 0, k.rsplit("/", 1)[1]
    with open(os.path.join(out, hexd), "wb") as f:
        for chunk in iter(lambda: body.read(1 << 20), b""):
            h.update(chunk)
            f.write(chunk)
            n += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    assert h.hexdigest() == hexd, k
    return n
for label, fn in [("raw S3 read", discard), ("raw S3 read + sha256 + write + fsync", store)]:
    t = time.time()
    with ThreadPoolExecutor(conc) as ex:
        total = sum(ex.map(fn, keys))
    secs = time.time() - t
    print(f"| {label} (boto3, {conc} threads) | {len(keys)} objects, {total/2**20:.0f} MiB in {secs:.1f} s "
          f"| {total/2**20/secs:.1f} MiB/s | {len(keys)/secs:.1f} objects/s |")
PY
