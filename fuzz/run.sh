#!/usr/bin/env bash
# Run every fuzz target for a bounded time (seconds per target, default 60), then minimise
# its corpus. Needs the nightly toolchain and cargo-fuzz (installed if missing). New inputs
# land in fuzz/corpus/<target>/ (commit them: CI replays them through tests/fuzz_corpus.rs);
# a crash stops the script with its reproducer in fuzz/artifacts/<target>/.
#   fuzz/run.sh [SECONDS]          TARGETS="route digest" fuzz/run.sh 30
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
targets="${TARGETS:-route reference digest manifest content_range htpasswd token policy}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
for t in $targets; do
  log="artifacts/$t.log"
  mkdir -p "artifacts"
  cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -max_len=4096 >"$log" 2>&1 || {
    echo "$t: FAILED (see fuzz/$log and fuzz/artifacts/$t/)"; tail -n 30 "$log"; exit 1; }
  runs=$(grep -Eo '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1)
  cargo +nightly fuzz cmin "$t" "corpus/$t" >/dev/null 2>&1
  echo "$t: ${runs:-no summary}; corpus now $(ls "corpus/$t" | wc -l) files"
done
