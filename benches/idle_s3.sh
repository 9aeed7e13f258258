#!/usr/bin/env bash
# Object-storage requests of an idle cluster (issue 17: anti-entropy must cost O(changes)).
# Starts moto's S3 server, three nodes and a router with their default background settings,
# pushes REPOS tiny images (one shard key each), waits SETTLE_SECS, then counts every request
# moto receives during IDLE_SECS of no client traffic and reports requests per node per hour.
#
#   FLOTILLA_BIN=target/release/flotilla REPOS=1000 IDLE_SECS=600 bash benches/idle_s3.sh
#
# The count is moto's own request log (ground truth, whatever the binary's version); the
# per-operation split comes from the nodes' flotilla_node_object_store_requests_total.
set -euo pipefail
BIN=${FLOTILLA_BIN:-target/release/flotilla}
REPOS=${REPOS:-1000}
IDLE_SECS=${IDLE_SECS:-600}
SETTLE_SECS=${SETTLE_SECS:-30}
# Extra node flags, e.g. the previous defaults for a before/after comparison:
# NODE_ARGS="--catch-up-secs 30 --scrub-interval-secs 60 --scrub-remote-check-every 1"
NODE_ARGS=${NODE_ARGS:-}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ok() { for _ in $(seq 1 300); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "timeout: $1" >&2; exit 1; }

s3=$(port)
moto_server -H 127.0.0.1 -p "$s3" >"$work/moto.log" 2>&1 & pids+=($!)
wait_ok "http://127.0.0.1:$s3/"
curl -fsS -X PUT "http://127.0.0.1:$s3/idle" >/dev/null
export AWS_ACCESS_KEY_ID=idle AWS_SECRET_ACCESS_KEY=idle FLOTILLA_SECRET=idle-secret RUST_LOG=warn
store="s3://idle/reg?endpoint=http://127.0.0.1:$s3&region=us-east-1"
meta="file://$work/meta"; mkdir -p "$work/meta"
nports=()
for n in n1:r1 n2:r1 n3:r2; do
  id=${n%%:*}; rack=${n##*:}; p=$(port); nports+=("$p")
  "$BIN" node --id "$id" --rack "$rack" --listen "127.0.0.1:$p" --advertise "http://127.0.0.1:$p" \
    --data "$work/$id" --meta "$meta" --store "$store" $NODE_ARGS >"$work/$id.log" 2>&1 & pids+=($!)
done
rp=$(port)
"$BIN" router --meta "$meta" --listen "127.0.0.1:$rp" >"$work/router.log" 2>&1 & pids+=($!)
for p in "${nports[@]}"; do wait_ok "http://127.0.0.1:$p/readyz"; done
wait_ok "http://127.0.0.1:$rp/readyz"
r="http://127.0.0.1:$rp"
sleep 2 # the router's first probe round (pacing only; the pushes below retry on failure)

sha() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
echo "pushing $REPOS images..."
for i in $(seq 1 "$REPOS"); do
  repo="idle$i/app"; layer="layer-$i"; ld=$(sha "$layer")
  config="{\"architecture\":\"amd64\",\"os\":\"linux\",\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$ld\"]}}"
  cd_=$(sha "$config")
  for attempt in 1 2 3; do
    curl -fsS -o /dev/null -X POST --data-binary "$config" -H 'content-type: application/octet-stream' "$r/v2/$repo/blobs/uploads/?digest=sha256:$cd_" &&
    curl -fsS -o /dev/null -X POST --data-binary "$layer" -H 'content-type: application/octet-stream' "$r/v2/$repo/blobs/uploads/?digest=sha256:$ld" &&
    curl -fsS -o /dev/null -X PUT -H 'content-type: application/vnd.oci.image.manifest.v1+json' \
      --data-binary "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$cd_\",\"size\":${#config}},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:$ld\",\"size\":${#layer}}]}" \
      "$r/v2/$repo/manifests/v1" && break
    sleep 1
  done
done
echo "settling ${SETTLE_SECS}s..."
sleep "$SETTLE_SECS"
count() { grep -cE '"(GET|PUT|HEAD|POST|DELETE) ' "$work/moto.log" || true; }
ops() { for p in "${nports[@]}"; do curl -fsS "http://127.0.0.1:$p/metrics" | grep '^flotilla_node_object_store_requests_total' || true; done | awk '{split($1,a,"op=\""); split(a[2],b,"\""); s[b[1]]+=$2} END {for (k in s) printf "%s=%d ", k, s[k]; print ""}'; }
before=$(count); ops_before=$(ops)
echo "idle for ${IDLE_SECS}s..."
sleep "$IDLE_SECS"
after=$(count); ops_after=$(ops)
delta=$((after - before))
per_node_hour=$(python3 -c "print(round($delta * 3600 / $IDLE_SECS / 3, 1))")
echo "repos=$REPOS idle_secs=$IDLE_SECS s3_requests=$delta per_node_per_hour=$per_node_hour"
echo "node request counters before: $ops_before"
echo "node request counters after:  $ops_after"
