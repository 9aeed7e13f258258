#!/usr/bin/env bash
# The history checker at a large size (issue 17): several seeds, several fault rounds each.
# CI runs the same test at its small size (two rounds, seed 1) in `cargo test`.
#
#   SEEDS="1 2 3 4 5" ROUNDS=6 bash benches/history.sh
#
# Each run prints one `history:` line (operations, acknowledged writes, faults with times,
# violations, cross-router lagging reads); the script fails if any run found a violation.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1 2 3 4 5"}
ROUNDS=${ROUNDS:-6}
status=0
for seed in $SEEDS; do
  out=$(FLOTILLA_HISTORY_SEED=$seed FLOTILLA_HISTORY_ROUNDS=$ROUNDS \
    cargo test -q --test e2e -- history::tag --nocapture 2>&1) || status=1
  grep -E '^(history:|VIOLATION)' <<<"$out" || { echo "seed $seed: no history line"; grep -E 'panicked|timed out' -A1 <<<"$out" | head -4; }
done
exit $status
