#!/usr/bin/env bash
# Write-through cost and read-through speed, in one run on one machine:
#   push of a SIZE blob to a Flotilla node with an S3 store (moto), to a node with a file://
#   store, and to CNCF Distribution 2.8 with its S3 driver on the same moto server;
#   then a cold pull (node disk wiped: read-through from S3) against a warm pull (local).
# Usage: benches/s3-writethrough.sh   (SIZE=256MiB N=3 by default; needs a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-256MiB}; N=${N:-3}
FLOTILLA=${FLOTILLA_BIN:-target/release/flotilla}
BENCH=${BENCH_BIN:-target/release/flotilla-bench}
WORK=$(mktemp -d); PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 300); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "$1 not up" >&2; exit 1; }
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench
MP=$(free_port); moto_server -H 127.0.0.1 -p "$MP" >"$WORK/moto.log" 2>&1 & PIDS+=($!)
wait_up "http://127.0.0.1:$MP/"; curl -sf -X PUT "http://127.0.0.1:$MP/bench" >/dev/null
S3="s3://bench/flotilla?endpoint=http://127.0.0.1:$MP&region=us-east-1"
P1=$(free_port); "$FLOTILLA" node --id n1 --listen 127.0.0.1:$P1 --data "$WORK/s3node" --store "$S3" >"$WORK/n1.log" 2>&1 & PIDS+=($!); N1=$!
P2=$(free_port); "$FLOTILLA" node --id n2 --listen 127.0.0.1:$P2 --data "$WORK/filenode" --store "file://$WORK/objects" >"$WORK/n2.log" 2>&1 & PIDS+=($!)
P3=$(free_port); cat >"$WORK/dist.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage:
  s3: {accesskey: bench, secretkey: bench, region: us-east-1, regionendpoint: "http://127.0.0.1:$MP", bucket: bench, secure: false, v4auth: true, rootdirectory: /distribution}
  redirect: {disable: true}
http: {addr: "127.0.0.1:$P3", secret: bench}
YML
env -u AWS_CA_BUNDLE docker-registry serve "$WORK/dist.yml" >"$WORK/dist.log" 2>&1 & PIDS+=($!)
for p in $P1 $P2 $P3; do wait_up "http://127.0.0.1:$p/v2/"; done
echo "| target | push $SIZE MiB/s |"; echo "|---|---:|"
for t in "flotilla-node-s3 $P1" "flotilla-node-file $P2" "distribution-s3 $P3"; do
  set -- $t
  "$BENCH" run "http://127.0.0.1:$2" push --size "$SIZE" -n "$N" --target "$1" --json "$WORK/$1.json" >/dev/null
  python3 -c "import json;r=json.load(open('$WORK/$1.json'));print('| $1 | %.1f |' % r['mib_per_sec'])"
done
# Cold read-through against warm local read of one blob on the S3-backed node.
head -c $((256<<20)) /dev/urandom >"$WORK/blob"; D=sha256:$(sha256sum "$WORK/blob" | cut -c1-64)
curl -sf -o /dev/null -X POST -T "$WORK/blob" "http://127.0.0.1:$P1/v2/cold/pull/blobs/uploads?digest=$D"
kill "$N1"; wait "$N1" 2>/dev/null || true; rm -rf "$WORK/s3node"
"$FLOTILLA" node --id n1 --listen 127.0.0.1:$P1 --data "$WORK/s3node" --store "$S3" >>"$WORK/n1.log" 2>&1 & PIDS+=($!)
wait_up "http://127.0.0.1:$P1/v2/"
for kind in cold warm; do
  curl -sf -o /dev/null -w "| pull 256 MiB $kind | %{speed_download} B/s |\n" "http://127.0.0.1:$P1/v2/cold/pull/blobs/$D" \
    | awk -F'|' '{printf "|%s| %.1f MiB/s |\n", $2, $3/1048576}'
done
