# Helpers the benchmark scripts share (sourced): logging, the processes a script started
# (stopped by pid on exit), free ports and bounded readiness polls. Set BENCH_NAME first.

log() { printf '[%s %(%H:%M:%S)T] %s\n' "${BENCH_NAME:-bench}" -1 "$*" >&2; }
die() { log "$*"; exit 1; }

# --- cleanup: kill exactly what we started, by pid -------------------------------------------
PIDS=()
stop_pid() {
  local pid=$1
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Poll URL until it answers with a status matching ACCEPT (a regex); fail if PID dies or the
# bounded timeout (READY_TIMEOUT, default 60 s) passes.
wait_ready() {
  local url=$1 pid=$2 what=$3 accept=${4:-'^(200|401)$'} deadline=$((SECONDS + ${READY_TIMEOUT:-60})) code
  while ((SECONDS < deadline)); do
    kill -0 "$pid" 2>/dev/null || { log "$what exited during startup"; return 1; }
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
    [[ "$code" =~ $accept ]] && return 0
    sleep 0.2
  done
  log "$what not ready at $url after ${READY_TIMEOUT:-60}s (last status ${code:-none})"
  return 1
}
