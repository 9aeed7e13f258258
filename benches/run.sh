#!/usr/bin/env bash
# Flotilla vs CNCF Distribution, side by side on this machine, plus the machine's own limits.
#
# Builds release, measures the machine limits, then for each target in turn (so targets never
# compete for the cores): starts it, waits until /v2/ answers, runs the same workloads with
# flotilla-bench and a wrk manifest-GET run, reads the server's peak RSS, stops it. Finally
# renders BENCHMARKS.md. Everything started here is killed on exit.
#
# Environment (all optional):
#   BENCH_QUICK=1          tiny CI run: 1 MiB blobs, 2 s runs, small limit measurements
#   BENCH_DURATION=10      seconds per flotilla-bench run
#   BENCH_BIG=256MiB       size of the single-stream push/pull blob
#   BENCH_SMALL=1MiB       size of the concurrent push/pull blobs
#   BENCH_CHUNK=10MiB      chunk size of push-chunked
#   BENCH_MIX=...          mixed-pull mix (default 1MiB:20,10MiB:70,100MiB:10)
#   BENCH_BLOB_CONC=8      concurrency of the small-blob and mixed runs
#   BENCH_META_CONC=32     concurrency of manifest/tags/catalog runs
#   BENCH_WRK_CONNS=32 BENCH_WRK_DURATION=10s   wrk manifest GET settings
#   BENCH_TARGETS="flotilla-node flotilla-dev flotilla-dev-proxy distribution-fs distribution-s3"
#   BENCH_OUT=<repo>/BENCHMARKS.md   where the report goes
#   BENCH_WORKDIR=<mktemp>           data dirs, configs, logs, raw JSON results (kept)
#   READY_TIMEOUT=60       seconds to wait for each server
#   BENCH_SKIP_BUILD=1     use existing binaries; FLOTILLA_BIN / BENCH_BIN override their paths
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=${BENCH_QUICK:-0}
if [[ "$QUICK" == 1 ]]; then
  DUR=${BENCH_DURATION:-2}
  BIG=${BENCH_BIG:-1MiB}
  SMALL=${BENCH_SMALL:-1MiB}
  CHUNK=${BENCH_CHUNK:-256KiB}
  MIX=${BENCH_MIX:-1MiB:20,2MiB:70,4MiB:10}
  WRK_DUR=${BENCH_WRK_DURATION:-2s}
  LIMIT_ARGS=(--sha-bytes 64MiB --disk-bytes 64MiB --tcp-bytes 128MiB)
else
  DUR=${BENCH_DURATION:-10}
  BIG=${BENCH_BIG:-256MiB}
  SMALL=${BENCH_SMALL:-1MiB}
  CHUNK=${BENCH_CHUNK:-10MiB}
  MIX=${BENCH_MIX:-1MiB:20,10MiB:70,100MiB:10}
  WRK_DUR=${BENCH_WRK_DURATION:-10s}
  LIMIT_ARGS=()
fi
BLOB_CONC=${BENCH_BLOB_CONC:-8}
META_CONC=${BENCH_META_CONC:-32}
WRK_CONNS=${BENCH_WRK_CONNS:-32}
TARGETS=${BENCH_TARGETS:-flotilla-node flotilla-dev flotilla-dev-proxy distribution-fs distribution-s3}
OUT=${BENCH_OUT:-$ROOT/BENCHMARKS.md}
READY_TIMEOUT=${READY_TIMEOUT:-60}
DIST_BIN=${DIST_BIN:-/usr/bin/docker-registry}
WORK=${BENCH_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/flotilla-bench.XXXXXX")}
mkdir -p "$WORK/results"

BENCH_NAME=run.sh
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# Peak RSS (VmHWM, KiB) of a process and its descendants, summed: later `flotilla dev` may
# spawn children, and the figure must cover everything serving requests.
peak_rss_kib() {
  local pid=$1 total=0 p v
  for p in $pid $(pgrep -P "$pid" || true); do
    v=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# --- build ------------------------------------------------------------------------------------
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
FLOTILLA=${FLOTILLA_BIN:-$BIN_DIR/flotilla}
BENCH=${BENCH_BIN:-$BIN_DIR/flotilla-bench}
if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
  log "building release binaries"
  (cd "$ROOT" && cargo build --release -p flotilla -p flotilla-bench)
fi

# --- machine ----------------------------------------------------------------------------------
log "measuring machine limits in $WORK"
"$BENCH" limits --dir "$WORK" "${LIMIT_ARGS[@]}" --json "$WORK/results/limits.json"
{
  echo "date_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "cpus=$(nproc)"
  echo "mem=$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "kernel=$(uname -sr)"
  echo "fs=$(df -hT "$WORK" | awk 'NR==2 {print $1" ("$2")"}')"
  echo "loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "rustc=$(rustc --version)"
  echo "distribution=$("$DIST_BIN" --version 2>&1 | awk '{print $NF}')"
  echo "moto=$(python3 -c 'import moto; print(moto.__version__)' 2>/dev/null || echo unknown)"
  echo "wrk=$(wrk -v 2>&1 | head -1 | awk '{print $2}')"
  echo "git=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo none)$(cd "$ROOT" && git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "flotilla_bin=$FLOTILLA"
  echo "quick=$QUICK"
  echo "duration=$DUR big=$BIG small=$SMALL chunk=$CHUNK mix=$MIX blob_conc=$BLOB_CONC meta_conc=$META_CONC"
  echo "wrk_args=-t2 -c$WRK_CONNS -d$WRK_DUR --latency"
} >"$WORK/results/machine.env"

# --- targets ----------------------------------------------------------------------------------
SERVER_PID=""
MOTO_PID=""

dist_config() { # $1 = port, $2 = storage yaml block
  cat <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
$2
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
  redirect:
    disable: true
http:
  addr: 127.0.0.1:$1
  secret: flotilla-bench
health:
  storagedriver:
    enabled: false
EOF
}

start_target() { # $1 = target, $2 = port; sets SERVER_PID
  local t=$1 port=$2 dir="$WORK/$1"
  mkdir -p "$dir"
  case "$t" in
    flotilla-node)
      RUST_LOG=warn "$FLOTILLA" node --id n1 --rack r1 --listen "127.0.0.1:$port" --data "$dir/data" \
        --store "file://$dir/objects" \
        >"$dir/server.log" 2>&1 &
      ;;
    flotilla-dev)
      RUST_LOG=warn "$FLOTILLA" dev --listen "127.0.0.1:$port" --data "$dir/data" >"$dir/server.log" 2>&1 &
      ;;
    flotilla-dev-proxy)
      RUST_LOG=warn "$FLOTILLA" dev --listen "127.0.0.1:$port" --data "$dir/data" --blob-redirect never \
        >"$dir/server.log" 2>&1 &
      ;;
    distribution-fs)
      dist_config "$port" "  filesystem:
    rootdirectory: $dir/data" >"$dir/config.yml"
      env -u AWS_CA_BUNDLE "$DIST_BIN" serve "$dir/config.yml" >"$dir/server.log" 2>&1 &
      ;;
    distribution-s3)
      local moto_port
      moto_port=$(free_port)
      moto_server -H 127.0.0.1 -p "$moto_port" >"$dir/moto.log" 2>&1 &
      MOTO_PID=$!
      PIDS+=("$MOTO_PID")
      wait_ready "http://127.0.0.1:$moto_port/" "$MOTO_PID" moto '^[1-5][0-9][0-9]$'
      curl -sf -X PUT "http://127.0.0.1:$moto_port/flotilla-bench" >/dev/null
      # Distribution 2.8 s3-aws driver: a regionendpoint forces path-style addressing;
      # AWS_CA_BUNDLE must be unset or the driver fails to start.
      dist_config "$port" "  s3:
    accesskey: dummy
    secretkey: dummy
    region: us-east-1
    regionendpoint: http://127.0.0.1:$moto_port
    bucket: flotilla-bench
    secure: false
    v4auth: true
    rootdirectory: /registry" >"$dir/config.yml"
      env -u AWS_CA_BUNDLE "$DIST_BIN" serve "$dir/config.yml" >"$dir/server.log" 2>&1 &
      ;;
    *) log "unknown target $t"; return 1 ;;
  esac
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  wait_ready "http://127.0.0.1:$port/v2/" "$SERVER_PID" "$t"
}

# One flotilla-bench run; the JSON lands in results/<target>/<name>.json.
bench() { # $1 = target, $2 = url, $3 = name, rest = args
  local t=$1 url=$2 name=$3
  shift 3
  log "$t: $name"
  "$BENCH" run "$url" "$@" --target "$t" --duration "$DUR" --json "$WORK/results/$t/$name.json" \
    | tee -a "$WORK/results/$t/bench.txt"
}

run_target() {
  local t=$1 port url
  port=$(free_port)
  url="http://127.0.0.1:$port"
  mkdir -p "$WORK/results/$t"
  log "starting $t on $url"
  start_target "$t" "$port"
  bench "$t" "$url" push-big push --size "$BIG" --concurrency 1
  bench "$t" "$url" pull-big pull --size "$BIG" --concurrency 1
  bench "$t" "$url" push-chunked-big push-chunked --size "$BIG" --chunk-size "$CHUNK" --concurrency 1
  bench "$t" "$url" push-small push --size "$SMALL" --concurrency "$BLOB_CONC"
  bench "$t" "$url" pull-small pull --size "$SMALL" --concurrency "$BLOB_CONC"
  bench "$t" "$url" mixed-pull mixed-pull --mix "$MIX" --concurrency "$BLOB_CONC" --seed-blobs 2
  bench "$t" "$url" manifest-get manifest-get --concurrency "$META_CONC"
  bench "$t" "$url" manifest-head manifest-head --concurrency "$META_CONC"
  bench "$t" "$url" tags-list tags-list --concurrency "$META_CONC"
  bench "$t" "$url" catalog catalog --concurrency 8
  # The manifest-get run above seeded flotilla-bench/manifest-get:bench.
  log "$t: wrk manifest GET -c$WRK_CONNS -d$WRK_DUR"
  wrk -t2 -c"$WRK_CONNS" -d"$WRK_DUR" --latency \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "$url/v2/flotilla-bench/manifest-get/manifests/bench" | tee "$WORK/results/$t/wrk.txt"
  peak_rss_kib "$SERVER_PID" >"$WORK/results/$t/server_peak_rss_kib"
  log "$t: server peak RSS $(cat "$WORK/results/$t/server_peak_rss_kib") KiB"
  if [[ -n "$MOTO_PID" ]]; then
    peak_rss_kib "$MOTO_PID" >"$WORK/results/$t/moto_peak_rss_kib"
    stop_pid "$MOTO_PID"
    MOTO_PID=""
  fi
  stop_pid "$SERVER_PID"
  # Pushed data is not needed once a target is measured; disk space is finite.
  rm -rf "$WORK/$t/data" "$WORK/$t/objects"
}

for t in $TARGETS; do
  run_target "$t"
done

log "rendering $OUT"
python3 "$ROOT/benches/render_report.py" "$WORK/results" "$OUT" "$0"
log "done; raw results in $WORK/results"
