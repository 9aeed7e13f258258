#!/usr/bin/env bash
# Pull time of one image (BENCH_SIZE, default 200 MiB of random bytes in one layer) into the
# local Docker engine: `flotilla agent pull` against `docker pull` through the router, in the
# same run, on a healthy cluster and with the key's primary replica killed (kill -9).
#
# The cluster is real processes on loopback: three `flotilla node`s (n1, n2 in rack r1, n3 in
# r2) with a file:// object store and the embedded metadata store, one `flotilla router`
# (blobs proxied, its default). Each pull starts with the image removed from the engine;
# the two kinds of pull alternate, BENCH_REPS times each (the agent first once the primary
# is dead), and the report gives every time, the median and how many sources the agent
# failed over. Everything started here is stopped on exit, the images removed.
#
# Environment (all optional):
#   BENCH_SIZE=200        MiB of the image's layer
#   BENCH_REPS=3          pulls of each kind per cluster state
#   BENCH_WORKDIR=<mktemp under the repo's target/>   data dirs and logs (kept)
#   BENCH_SKIP_BUILD=1    use the existing release binary; FLOTILLA_BIN overrides its path
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE=${BENCH_SIZE:-200}
REPS=${BENCH_REPS:-3}
BIN=${FLOTILLA_BIN:-$ROOT/target/release/flotilla}
if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
  (cd "$ROOT" && cargo build --release -p flotilla)
fi
mkdir -p "$ROOT/target"
WORK=${BENCH_WORKDIR:-$(mktemp -d "$ROOT/target/agent-pull.XXXXXX")}
mkdir -p "$WORK"
SECRET=bench-agent-pull-secret
PIDS=()
declare -A NODE_PID

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

ROUTER_PORT=$(free_port)
ROUTER=127.0.0.1:$ROUTER_PORT
REPO=agentbench/pull/app
IMAGE=$ROUTER/$REPO:v1

cleanup() {
  docker rmi --force "$IMAGE" >/dev/null 2>&1 || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_ready() { # URL
  for _ in $(seq 300); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "not ready: $1" >&2; exit 1
}

for spec in n1:r1 n2:r1 n3:r2; do
  id=${spec%%:*}; rack=${spec##*:}; port=$(free_port)
  FLOTILLA_SECRET=$SECRET "$BIN" node --id "$id" --rack "$rack" --listen "127.0.0.1:$port" \
    --data "$WORK/$id" --meta "file://$WORK/meta" --store "file://$WORK/objects" \
    2>"$WORK/$id.log" &
  PIDS+=($!); NODE_PID[$id]=$!
  wait_ready "http://127.0.0.1:$port/readyz"
done
FLOTILLA_SECRET=$SECRET "$BIN" router --listen "$ROUTER" --meta "file://$WORK/meta" \
  2>"$WORK/router.log" &
PIDS+=($!)
wait_ready "http://$ROUTER/readyz"

# The image: one layer of random bytes (incompressible, so the pushed layer is SIZE MiB).
mkdir -p "$WORK/rootfs"
head -c "$((SIZE * 1024 * 1024))" /dev/urandom > "$WORK/rootfs/payload"
tar -C "$WORK/rootfs" -cf "$WORK/rootfs.tar" .
docker import "$WORK/rootfs.tar" "$IMAGE" >/dev/null
WANT=$(docker image inspect --format '{{.Id}}' "$IMAGE")
docker push "$IMAGE" >"$WORK/push.log"
docker rmi "$IMAGE" >/dev/null

now() { date +%s.%N; }
one() { # KIND -> seconds on stdout
  docker rmi --force "$IMAGE" >/dev/null 2>&1 || true
  local t0 t1
  t0=$(now)
  case $1 in
    docker) docker pull "$IMAGE" >/dev/null ;;
    agent) "$BIN" agent pull --router "http://$ROUTER" --work-dir "$WORK/agent" "$REPO:v1" \
      >/dev/null 2>>"$WORK/agent.log" ;;
  esac
  t1=$(now)
  local got
  got=$(docker image inspect --format '{{.Id}}' "$IMAGE")
  [[ "$got" == "$WANT" ]] || { echo "$1 pulled $got, pushed $WANT" >&2; exit 1; }
  python3 -c "print(f'{$t1 - $t0:.2f}')"
}
median() { python3 -c 'import statistics,sys; print(f"{statistics.median(map(float, sys.argv[1:])):.2f}")' "$@"; }

declare -A TIMES
measure() { # STATE KIND...  (the kinds in the order each repetition runs them)
  local state=$1; shift
  for _ in $(seq "$REPS"); do
    for kind in "$@"; do
      TIMES[$state,$kind]+="$(one "$kind") "
    done
  done
}

failovers() { grep -c "source failed" "$WORK/agent.log" || true; }
measure healthy docker agent
HEALTHY_FAILOVERS=$(failovers)
PRIMARY=$(curl -fs "http://$ROUTER/admin/v1/shards/agentbench/pull" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["replicas"][0])')
kill -9 "${NODE_PID[$PRIMARY]}"
# The agent first: right after the kill the router still lists the dead primary first
# (a docker pull through the router then ejects it for 5 s, and the agent is told to try it last).
measure "primary-dead" agent docker
DEAD_FAILOVERS=$(( $(failovers) - HEALTHY_FAILOVERS ))

echo "image: ${SIZE} MiB (one layer), $REPS pulls of each kind per state, seconds"
echo "killed primary: $PRIMARY; work dir: $WORK"
echo "agent sources that failed (and were failed over): healthy $HEALTHY_FAILOVERS, primary dead $DEAD_FAILOVERS"
printf '%-14s %-7s %-8s %s\n' state kind median runs
for state in healthy primary-dead; do
  for kind in docker agent; do
    # shellcheck disable=SC2086
    printf '%-14s %-7s %-8s %s\n' "$state" "$kind" "$(median ${TIMES[$state,$kind]})" "${TIMES[$state,$kind]}"
  done
done
