#!/usr/bin/env bash
# The cost of authentication on `flotilla dev`: manifest GET req/s (wrk) and single-stream
# blob pull throughput (flotilla-bench) with auth off, with Basic (--htpasswd) and with Bearer
# (--htpasswd --token-key, a token from the router's /auth/token), in the same run.
#
# The three clusters are started once, side by side, and the measurements interleave
# (off, basic, bearer, off, basic, bearer, ...) so that drift in what else the shared machine
# is doing lands on every mode alike; each figure is the median of BENCH_REPS repetitions.
# The idle clusters' CPU time during every measurement is recorded, to show they do not
# compete with the measured one. Everything started here is killed on exit.
#
# Environment (all optional):
#   BENCH_QUICK=1          tiny run: 1 MiB blob, 2 s runs, 1 repetition
#   BENCH_REPS=3           repetitions of every measurement per mode
#   BENCH_DURATION=10      seconds per pull run
#   BENCH_BIG=256MiB       size of the pulled blob
#   BENCH_WRK_CONNS=32 BENCH_WRK_DURATION=10s   wrk manifest GET settings (as run.sh)
#   BENCH_BLOB_REDIRECT=   --blob-redirect for every cluster (default: flotilla dev's own)
#   BENCH_MODES="off basic bearer"   add off2 for a second auth-off cluster as a control
#   BENCH_OUT=<repo>/benches/auth-cost.md   where the report goes
#   BENCH_WORKDIR=<mktemp>           data dirs, auth files, logs, raw results (kept)
#   READY_TIMEOUT=60       seconds to wait for each server
#   BENCH_SKIP_BUILD=1     use existing binaries; FLOTILLA_BIN / BENCH_BIN override their paths
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=${BENCH_QUICK:-0}
if [[ "$QUICK" == 1 ]]; then
  DUR=${BENCH_DURATION:-2}
  BIG=${BENCH_BIG:-1MiB}
  WRK_DUR=${BENCH_WRK_DURATION:-2s}
  REPS=${BENCH_REPS:-1}
else
  DUR=${BENCH_DURATION:-10}
  BIG=${BENCH_BIG:-256MiB}
  WRK_DUR=${BENCH_WRK_DURATION:-10s}
  REPS=${BENCH_REPS:-3}
fi
WRK_CONNS=${BENCH_WRK_CONNS:-32}
MODES=${BENCH_MODES:-off basic bearer}
REDIRECT=${BENCH_BLOB_REDIRECT:-}
OUT=${BENCH_OUT:-$ROOT/benches/auth-cost.md}
READY_TIMEOUT=${READY_TIMEOUT:-60}
WORK=${BENCH_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/flotilla-auth-cost.XXXXXX")}
REPO=flotilla-bench/auth-cost
TAG=bench
# One fixed nonce: every pull run re-pushes the identical blob, stored once.
NONCE=${BENCH_NONCE:-4242}
USER_NAME=bench
PASSWORD=bench-$RANDOM$RANDOM
MANIFEST_ACCEPT='application/vnd.oci.image.manifest.v1+json'
mkdir -p "$WORK/results"

BENCH_NAME=auth-cost.sh
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# utime + stime of a process, in clock ticks (the fields after the parenthesised name).
cpu_ticks() {
  awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$1/stat" 2>/dev/null || echo 0
}

for tool in wrk curl jq htpasswd openssl python3; do
  command -v "$tool" >/dev/null || die "$tool is needed"
done

# --- build ------------------------------------------------------------------------------------
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
FLOTILLA=${FLOTILLA_BIN:-$BIN_DIR/flotilla}
BENCH=${BENCH_BIN:-$BIN_DIR/flotilla-bench}
if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
  log "building release binaries"
  (cd "$ROOT" && cargo build --release -p flotilla -p flotilla-bench)
fi

# --- auth files -------------------------------------------------------------------------------
htpasswd -B -b -c "$WORK/htpasswd" "$USER_NAME" "$PASSWORD" 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$WORK/token-key.pem" 2>/dev/null
BASIC="Basic $(printf '%s:%s' "$USER_NAME" "$PASSWORD" | base64 -w0)"

# --- clusters ---------------------------------------------------------------------------------
declare -A URL PID
for m in $MODES; do
  args=()
  case "$m" in
    # off2: a second auth-off cluster, a control for cluster-to-cluster variance; offtoken: an
    # auth-off cluster sent the Bearer header anyway (what carrying a token costs, unchecked).
    off | off2 | offtoken) ;;
    basic) args=(--htpasswd "$WORK/htpasswd") ;;
    bearer) args=(--htpasswd "$WORK/htpasswd" --token-key "$WORK/token-key.pem") ;;
    *) die "unknown mode $m" ;;
  esac
  [[ -n "$REDIRECT" ]] && args+=(--blob-redirect "$REDIRECT")
  port=$(free_port)
  URL[$m]="http://127.0.0.1:$port"
  mkdir -p "$WORK/$m" "$WORK/results/$m"
  log "starting $m on ${URL[$m]}"
  RUST_LOG=warn "$FLOTILLA" dev --listen "127.0.0.1:$port" --data "$WORK/$m/data" "${args[@]}" \
    >"$WORK/$m/server.log" 2>&1 &
  PID[$m]=$!
  PIDS+=("${PID[$m]}")
done
for m in $MODES; do
  wait_ready "${URL[$m]}/v2/" "${PID[$m]}" "$m"
done

# The Authorization value for a mode; Bearer gets a fresh token (the default lifetime is 5
# minutes, longer than one measurement, shorter than the whole run).
authorization() {
  case "$1" in
    off | off2) echo "" ;;
    offtoken)
      if [[ -n "${URL[bearer]:-}" ]]; then
        authorization bearer
      else # a token-sized value when no bearer cluster runs
        echo "Bearer $(head -c 400 /dev/urandom | base64 -w0 | tr '+/' '-_')"
      fi
      ;;
    basic) echo "$BASIC" ;;
    bearer)
      local t
      t=$(curl -sf -H "Authorization: $BASIC" \
        "${URL[bearer]}/auth/token?service=flotilla&scope=repository:$REPO:pull,push" | jq -r .token)
      [[ -n "$t" && "$t" != null ]] || die "bearer: no token from ${URL[bearer]}/auth/token"
      echo "Bearer $t"
      ;;
  esac
}

bench_auth_args() { # $1 = authorization value
  [[ -n "$1" ]] && printf '%s\0%s\0' --authorization "$1"
  return 0
}

# Seed the manifest (tag $TAG in $REPO), and check that auth is really on where it should be:
# a request without credentials is refused, one with them served.
for m in $MODES; do
  a=$(authorization "$m")
  mapfile -d '' aa < <(bench_auth_args "$a")
  log "$m: seeding $REPO:$TAG"
  "$BENCH" run "${URL[$m]}" manifest-get --repo "$REPO" -n 1 --nonce "$NONCE" --target "$m" "${aa[@]}" \
    --json "$WORK/results/$m/seed.json" >"$WORK/results/$m/seed.txt"
  manifest="${URL[$m]}/v2/$REPO/manifests/$TAG"
  anon=$(curl -s -o /dev/null -w '%{http_code}' -H "Accept: $MANIFEST_ACCEPT" "$manifest")
  want=401
  [[ "$m" == off* ]] && want=200
  [[ "$m" == offtoken ]] && a="" # ignored there: nothing to check
  [[ "$anon" == "$want" ]] || die "$m: GET without credentials gave $anon, want $want"
  if [[ -n "$a" ]]; then
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Accept: $MANIFEST_ACCEPT" -H "Authorization: $a" "$manifest")
    [[ "$code" == 200 ]] || die "$m: GET with credentials gave $code"
  fi
done

# Run F (a function taking mode and repetition) for mode M, noting the CPU time the measured
# cluster spends (per request it is the cost of auth itself, and it barely moves when other
# work on the machine steals cores, unlike req/s) and the CPU the other clusters burn meanwhile.
measured() { # $1 = function, $2 = mode, $3 = rep
  local f=$1 m=$2 r=$3 o before=() after=() i=0 idle=0 own=0
  for o in $MODES; do before+=("$(cpu_ticks "${PID[$o]}")"); done
  "$f" "$m" "$r"
  for o in $MODES; do after+=("$(cpu_ticks "${PID[$o]}")"); done
  for o in $MODES; do
    if [[ "$o" == "$m" ]]; then
      own=$((after[i] - before[i]))
    else
      idle=$((idle + after[i] - before[i]))
    fi
    i=$((i + 1))
  done
  echo "$idle" >"$WORK/results/$m/r$r-$f-idle-ticks"
  echo "$own" >"$WORK/results/$m/r$r-$f-own-ticks"
}

wrk_run() { # $1 = mode, $2 = rep
  local m=$1 r=$2 a hdr=() f
  a=$(authorization "$m")
  [[ -n "$a" ]] && hdr=(-H "Authorization: $a")
  f="$WORK/results/$m/r$r-wrk.txt"
  log "$m #$r: wrk manifest GET -c$WRK_CONNS -d$WRK_DUR"
  wrk -t2 -c"$WRK_CONNS" -d"$WRK_DUR" --latency -H "Accept: $MANIFEST_ACCEPT" "${hdr[@]}" \
    "${URL[$m]}/v2/$REPO/manifests/$TAG" >"$f"
  # A refused request is answered fast: any non-2xx would inflate the figure, not measure auth.
  if grep -q 'Non-2xx' "$f"; then
    cat "$f" >&2
    die "$m: wrk saw non-2xx answers"
  fi
  grep -E 'Requests/sec' "$f" >&2
}

pull_run() { # $1 = mode, $2 = rep
  local m=$1 r=$2 a aa=()
  a=$(authorization "$m")
  mapfile -d '' aa < <(bench_auth_args "$a")
  log "$m #$r: pull $BIG x1 for ${DUR}s"
  "$BENCH" run "${URL[$m]}" pull --size "$BIG" --concurrency 1 --seed-blobs 1 --repo "$REPO" \
    --nonce "$NONCE" --duration "$DUR" --target "$m" "${aa[@]}" \
    --json "$WORK/results/$m/r$r-pull.json" >"$WORK/results/$m/r$r-pull.txt"
  jq -e '.errors == 0 and .requests > 0' "$WORK/results/$m/r$r-pull.json" >/dev/null \
    || die "$m: pull run had errors: $(jq -c .error_samples "$WORK/results/$m/r$r-pull.json")"
  jq -r '"\(.mib_per_sec | floor) MiB/s over \(.requests) pulls"' "$WORK/results/$m/r$r-pull.json" >&2
}

# The order rotates every round, so no mode always runs first (or right after another).
read -ra MODE_LIST <<<"$MODES"
for r in $(seq 1 "$REPS"); do
  n=${#MODE_LIST[@]}
  order=()
  for i in $(seq 0 $((n - 1))); do order+=("${MODE_LIST[$(((i + r - 1) % n))]}"); done
  for m in "${order[@]}"; do measured wrk_run "$m" "$r"; done
  for m in "${order[@]}"; do measured pull_run "$m" "$r"; done
done

# --- report -----------------------------------------------------------------------------------
CMD="BENCH_QUICK=$QUICK BENCH_REPS=$REPS BENCH_MODES='$MODES' benches/auth-cost.sh"
export WORK MODES REPS OUT CMD QUICK BIG DUR WRK_CONNS WRK_DUR REDIRECT
export GIT_REV="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo none)$(cd "$ROOT" && git diff --quiet 2>/dev/null || echo ' (dirty)')"
export TICK_HZ="$(getconf CLK_TCK)"
python3 - <<'EOF'
import json, os, re, statistics, subprocess, time

work, modes, reps = os.environ["WORK"], os.environ["MODES"].split(), int(os.environ["REPS"])
def wrk(m, r):
    t = open(f"{work}/results/{m}/r{r}-wrk.txt").read()
    return float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
def pull(m, r):
    return json.load(open(f"{work}/results/{m}/r{r}-pull.json"))["mib_per_sec"]
def idle(m, r, f):
    return int(open(f"{work}/results/{m}/r{r}-{f}-idle-ticks").read())
def cpu_us(m, r):
    t = open(f"{work}/results/{m}/r{r}-wrk.txt").read()
    n = int(re.search(r"(\d+) requests in", t).group(1))
    return int(open(f"{work}/results/{m}/r{r}-wrk_run-own-ticks").read()) / hz * 1e6 / n
hz = int(os.environ["TICK_HZ"])

R = range(1, reps + 1)
rows = {m: ([wrk(m, r) for r in R], [cpu_us(m, r) for r in R], [pull(m, r) for r in R]) for m in modes}
med = {m: tuple(statistics.median(x) for x in v) for m, v in rows.items()}
base = med.get("off")
# Paired ratios: within each round against that round's auth-off figure (the mean of off and
# off2 when both run), then the median over rounds; drifts of the machine between rounds cancel.
refs = [m for m in ("off", "off2") if m in modes]
def paired(m, i):
    xs = []
    for k, r in enumerate(R):
        ref = statistics.mean(rows[o][i][k] for o in refs)
        xs.append(rows[m][i][k] / ref)
    return statistics.median(xs)
prat = {m: tuple(paired(m, i) for i in range(3)) for m in modes} if refs else {}
def ratio(m, i):
    return f"{prat[m][i]:.3f}" if prat else "-"
idle_max = max(idle(m, r, f) for m in modes for r in R for f in ("wrk_run", "pull_run")) / hz
# Cost as a fraction: less req/s or MiB/s, or more CPU per GET.
costs = {}
if prat:
    for m in modes:
        if not m.startswith("off"):
            costs[(m, "manifest GET req/s")] = 1 - prat[m][0]
            costs[(m, "server CPU per GET")] = prat[m][1] - 1
            costs[(m, "pull MiB/s")] = 1 - prat[m][2]
def spread(xs):
    return (max(xs) - min(xs)) / statistics.median(xs) * 100

nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(": ", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
lines = [
    "# Cost of authentication: `flotilla dev` with auth off, Basic and Bearer",
    "",
    "Generated by `benches/auth-cost.sh`; do not edit by hand.",
    "",
    f"- command: `{os.environ['CMD']}`",
    f"- date (UTC): {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
    f"- nproc: {nproc} ({cpu}); loadavg at the end: {' '.join(open('/proc/loadavg').read().split()[:3])}",
    f"- git: {os.environ['GIT_REV']}",
    f"- manifest GET: `wrk -t2 -c{os.environ['WRK_CONNS']} -d{os.environ['WRK_DUR']} --latency` on one tag "
    "(with `-H 'Authorization: ...'` for Basic and Bearer)",
    f"- pull: `flotilla-bench run URL pull --size {os.environ['BIG']} --concurrency 1 -d {os.environ['DUR']}` "
    f"(blob redirect: {os.environ['REDIRECT'] or 'flotilla dev default'}; credentials go to the router, "
    "not to the node the signed URL names)",
    "- Basic: `--htpasswd` (bcrypt, successful checks cached 60 s); Bearer: `--htpasswd --token-key` "
    "(EC P-256), a token for `repository:REPO:pull,push` fetched before every measurement",
    f"- modes interleaved ({', '.join(modes)}, the order rotated every round), {reps} round(s); figures are "
    "medians; ratio = the median over rounds of mode / that round's auth-off figure "
    f"({' and '.join(refs)}{', their mean' if len(refs) > 1 else ''})"
    + ("; off2 is a second cluster with auth off, a control: its ratio is what cluster-to-cluster "
       "variance alone produces" if "off2" in modes else "")
    + ("; offtoken is an auth-off cluster sent the Bearer header: what carrying a token costs "
       "before anything checks it" if "offtoken" in modes else ""),
    "- server CPU per GET: the measured `flotilla dev` process's user+system time during the wrk run "
    "over the requests wrk completed (router and nodes are one process; wrk is not counted)",
    f"- the idle clusters used at most {idle_max:.2f} CPU-s during any one measurement",
    "",
    "| mode | manifest GET req/s | ratio | server CPU µs/GET | ratio | 256 MiB pull MiB/s | ratio |"
    if os.environ["BIG"] == "256MiB" else
    f"| mode | manifest GET req/s | ratio | server CPU µs/GET | ratio | {os.environ['BIG']} pull MiB/s | ratio |",
    "|---|---:|---:|---:|---:|---:|---:|",
]
for m in modes:
    w, c, p = med[m]
    lines.append(f"| {m} | {w:,.0f} | {ratio(m, 0)} | {c:.1f} | {ratio(m, 1)} | {p:,.0f} | {ratio(m, 2)} |")
lines += ["", "Every repetition (req/s; µs/GET; MiB/s):", ""]
for m in modes:
    w, c, p = rows[m]
    lines.append(f"- {m}: " + ", ".join(f"{x:,.0f}" for x in w) + "; " + ", ".join(f"{x:.1f}" for x in c)
                 + "; " + ", ".join(f"{x:,.0f}" for x in p))
if "off" in rows:
    w, c, p = rows["off"]
    lines += ["", f"Spread of `off` alone across repetitions (max-min over median): req/s {spread(w):.1f}%, "
              f"CPU/GET {spread(c):.1f}%, pull {spread(p):.1f}%; a difference smaller than that is noise."]
if costs:
    (m, what), worst = max(costs.items(), key=lambda kv: kv[1])
    lines += ["", f"Largest cost of auth: {worst * 100:.1f}% ({m}, {what}; budget 5%)." if worst > 0
              else "Auth cost nothing measurable: no mode was slower than off."]
text = "\n".join(lines) + "\n"
open(os.environ["OUT"], "w").write(text)
print(text, end="")
EOF
log "done; raw results in $WORK/results"
